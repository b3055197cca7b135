"""The fine-tuning run: transformers' Trainer on a PEFT LoRA (or QLoRA) model, with checkpoints that a
rerun resumes from, progress on the terminal and on Prometheus, and the adapter folder kaito-serve loads."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kaito.presets.contract import TUNING_DONE_MARKER
from kaito.presets.cpu import available_cpus
from kaito.presets.weights import metrics_collector

from .config import ConfigError, TrainingConfig
from .data import IGNORE_INDEX, Row, check_template, tokenize

log = logging.getLogger("kaito.tuning")
CHECKPOINTS = "checkpoints"


@dataclass
class Job:
    model_path: str
    config: TrainingConfig
    train_rows: list[Row]
    eval_rows: list[Row]
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    progress: bool = True
    model: Any = field(default=None, repr=False)  # the trained PEFT model, once run() is done

    @property
    def output_dir(self) -> Path:
        return Path(self.config.TrainingArguments.output_dir)


# -- model ------------------------------------------------------------------------------------------


def _hub_kwargs(config: TrainingConfig) -> dict:
    """ModelConfig's loading options, as transformers' from_pretrained takes them."""
    mc = config.ModelConfig
    return {"local_files_only": mc.local_files_only, "revision": mc.revision, "cache_dir": mc.cache_dir,
            "trust_remote_code": mc.trust_remote_code}


def load_tokenizer(model_path: str, config: TrainingConfig):
    from transformers import AutoTokenizer

    mc = config.ModelConfig
    try:
        tok = AutoTokenizer.from_pretrained(model_path, **_hub_kwargs(config))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of {model_path}: {e}") from None
    if mc.chat_template:
        text = mc.chat_template
        if not any(c in text for c in "{}\n") and Path(text).expanduser().is_file():
            text = Path(text).expanduser().read_text()
        elif not any(c in text for c in "{}"):
            raise ConfigError(f"ModelConfig.chat_template {mc.chat_template!r} is neither a file nor a template")
        tok.chat_template = text
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def linear_modules(model_path: str, config: TrainingConfig) -> list[str]:
    """Names of the model's linear layers but the output head, read from config.json on the meta
    device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = config.ModelConfig
    try:
        hf_config = AutoConfig.from_pretrained(model_path, **_hub_kwargs(config))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the model config of {model_path}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=mc.trust_remote_code)
    head = model.get_output_embeddings()
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head]


def resolve_target_modules(config: TrainingConfig, names: list[str]) -> list[str] | str:
    """The LoRA target modules: as configured (checked against the model), or every linear layer."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = config.LoraConfig.target_modules
    if wanted is None or wanted == "all-linear":
        return suffixes
    if isinstance(wanted, str):  # PEFT: a regular expression over full module names
        if not any(re.fullmatch(wanted, n) for n in names):
            raise ConfigError(f"LoraConfig.target_modules {wanted!r} matches no module of the model; "
                              f"its linear modules are {', '.join(suffixes)}")
        return wanted
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"LoraConfig.target_modules: the model has no module {', '.join(map(repr, missing))}; "
                          f"its linear modules are {', '.join(suffixes)}")
    return list(wanted)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(config: TrainingConfig):
    import torch

    name = config.ModelConfig.torch_dtype
    if name == "auto":
        return "auto"
    if name:
        return getattr(torch, name)
    if _device() == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: fp32 is faster than bf16 without AMX, and exact


def load_model(model_path: str, config: TrainingConfig, target_modules):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    mc = config.ModelConfig
    kwargs: dict[str, Any] = {"dtype": _dtype(config), **_hub_kwargs(config)}
    if mc.attn_implementation:
        kwargs["attn_implementation"] = mc.attn_implementation
    if _device() == "cuda":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))} if world > 1 else mc.device_map
    q = config.quantization
    if q is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("method qlora needs bitsandbytes (pip install 'kaito[tune]')") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(**q.model_dump(exclude={"quant_method"}, exclude_none=True))
        if _device() == "cpu":
            log.warning("qlora on CPU: bitsandbytes runs, but slowly", extra={"device": "cpu"})
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weights load in seconds; the Monitor shows the training
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if q is not None:
        if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
            raise RuntimeError("the model was not quantised, refusing to train plain LoRA for method qlora")
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(config.TrainingArguments.kwargs().get("gradient_checkpointing")))
    lora = config.LoraConfig.kwargs()
    lora["target_modules"] = target_modules
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    model.config.use_cache = False
    if _device() == "cpu":
        torch.set_num_threads(available_cpus())
    return model


# -- batches and loss -------------------------------------------------------------------------------


def collator(config: TrainingConfig, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    dc = config.DataCollator
    if dc.packing:
        # one row per batch, positions restarting at each example: attention stays inside examples
        # (transformers builds the block-diagonal mask from position_ids) and no token is padding
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=dc.pad_to_multiple_of, return_tensors="pt")


def completion_loss(model, inputs: dict, num_items_in_batch=None):
    """Cross-entropy on the label tokens, computing the output head only at the positions that
    predict one (`logits_to_keep`): with a large vocabulary and masked prompts, most of the head's
    work is skipped."""
    import torch

    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)  # a cache would turn off packed-sequence masking
    picked = targets[:, keep]
    loss = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), picked.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (picked != IGNORE_INDEX).sum()
    if torch.is_tensor(count):
        count = count.to(loss.device)
    return loss / count, outputs


def make_trainer(model, tokenizer, args, train_ds, eval_ds, data_collator, callbacks):
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = completion_loss(model, dict(inputs), num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return CompletionTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=data_collator, processing_class=tokenizer,
                             callbacks=callbacks)


# -- progress and metrics ---------------------------------------------------------------------------


class Monitor:
    """Steps, loss, tokens/s and ETA: on the terminal (a rich bar, or one line per log step when the
    output is not a terminal), on a Prometheus /metrics endpoint, and in metrics.json at the end."""

    def __init__(self, port: int | None, host: str, progress: bool) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        self.registry.register(metrics_collector())  # the base model's download, if it was fetched
        g = lambda name, doc: Gauge(f"kaito_tune_{name}", doc, registry=self.registry)
        self.g = {
            "step": g("step", "optimizer steps done"), "max_steps": g("max_steps", "optimizer steps in the run"),
            "epoch": g("epoch", "epochs done"), "loss": g("loss", "last logged training loss"),
            "eval_loss": g("eval_loss", "last evaluation loss"), "learning_rate": g("learning_rate", "learning rate"),
            "tokens": g("tokens", "training tokens processed"),
            "tokens_per_second": g("tokens_per_second", "training tokens per second in this process"),
            "eta_seconds": g("eta_seconds", "estimated seconds left"),
        }
        self.server = None
        if port is not None:
            from prometheus_client import start_http_server

            try:
                self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as e:
                log.warning("metrics endpoint not started", extra={"port": port, "error": str(e)})
        self.progress = progress
        self.bar = None
        self.t0 = time.monotonic()
        self.tokens0 = 0
        self.step0 = 0
        self.values: dict[str, float] = {}

    def callback(self):
        from transformers import TrainerCallback

        mon = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                mon.begin(state)

            def on_step_end(self, args, state, control, **kw):
                mon.step(state)

            def on_log(self, args, state, control, logs=None, **kw):
                mon.log(state, logs or {})

            def on_train_end(self, args, state, control, **kw):
                mon.end()

        return _Cb()

    def begin(self, state) -> None:
        self.t0, self.step0, self.tokens0 = time.monotonic(), state.global_step, state.num_input_tokens_seen
        self.g["max_steps"].set(state.max_steps)
        if self.progress and state.is_world_process_zero:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                    TextColumn("ETA"), TimeRemainingColumn(), console=console)
                self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step,
                                              loss="-", tps="-")
                self.bar.start()

    def rates(self, state) -> tuple[float, float]:
        dt = max(time.monotonic() - self.t0, 1e-6)
        tps = (state.num_input_tokens_seen - self.tokens0) / dt
        done = state.global_step - self.step0
        eta = (state.max_steps - state.global_step) * dt / done if done else float("nan")
        return tps, eta

    def step(self, state) -> None:
        tps, eta = self.rates(state)
        self.values.update(step=state.global_step, epoch=state.epoch or 0.0, tokens=state.num_input_tokens_seen,
                           tokens_per_second=tps, eta_seconds=eta)
        for k in ("step", "epoch", "tokens", "tokens_per_second", "eta_seconds"):
            if not math.isnan(self.values[k]):
                self.g[k].set(self.values[k])
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, tps=f"{tps:,.0f}")

    def log(self, state, logs: dict) -> None:
        for key in ("loss", "eval_loss", "learning_rate"):
            if key in logs:
                self.values[key] = float(logs[key])
                self.g[key].set(float(logs[key]))
        if "loss" not in logs and "eval_loss" not in logs:
            return
        if self.bar is not None:
            if "loss" in logs:
                self.bar.update(self.task, loss=f"{logs['loss']:.4f}")
            if "eval_loss" in logs:
                self.bar.console.print(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
        elif self.progress and state.is_world_process_zero:
            tps, eta = self.rates(state)
            what = " ".join(f"{k} {logs[k]:.4f}" for k in ("loss", "eval_loss") if k in logs)
            eta_s = "-" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
            print(f"step {state.global_step}/{state.max_steps} {what} tokens/s {tps:,.0f} ETA {eta_s}", flush=True)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self) -> None:
        self.end()
        if self.server is not None:
            self.server.shutdown()


# -- the run ----------------------------------------------------------------------------------------


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer_state.json was written); torn ones are removed."""
    found = []
    for p in ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else []:
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for _step, p in sorted(found, reverse=True):
        if (p / "trainer_state.json").is_file():
            return p
        log.warning("removing an incomplete checkpoint", extra={"path": str(p)})
        shutil.rmtree(p, ignore_errors=True)
    return None


def peak_memory_bytes() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(job: Job, tokenizer, target_modules) -> dict[str, Any]:
    """Train, save the adapter folder and write the completion marker last; returns the metrics."""
    from transformers import PrinterCallback, TrainingArguments, set_seed

    cfg = job.config
    out = job.output_dir
    ckpt_dir = out / CHECKPOINTS
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.resolved()
    resolved["training_config"]["LoraConfig"]["target_modules"] = target_modules
    resolved_file = out / "training_config.yaml"
    resume = last_checkpoint(ckpt_dir)
    if resume is not None and resolved_file.is_file() and yaml.safe_load(resolved_file.read_text()) != resolved:
        raise ConfigError(f"{out} holds checkpoints of a run with another config ({resolved_file}); "
                          "give another output dir, or remove its checkpoints folder to start over")

    targs = cfg.TrainingArguments.kwargs()
    targs.update(output_dir=str(ckpt_dir), disable_tqdm=True, include_num_input_tokens_seen=True,
                 remove_unused_columns=False)
    if _device() == "cpu":
        targs.setdefault("dataloader_pin_memory", False)
    if job.eval_rows:
        targs.setdefault("eval_strategy", "epoch")
    else:
        targs["eval_strategy"] = "no"
    if _device() == "cuda" and "bf16" not in targs and "fp16" not in targs:
        import torch

        dtype = _dtype(cfg)
        targs["bf16"] = dtype == torch.bfloat16 or (dtype == "auto" and torch.cuda.is_bf16_supported())
        targs["fp16"] = dtype == torch.float16
    try:
        args = TrainingArguments(**targs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"TrainingArguments: {e}") from None
    resolved_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
    set_seed(args.seed)

    max_len = cfg.DatasetConfig.max_seq_length
    only = cfg.DataCollator.completion_only_loss
    train_ds = [tokenize(r, tokenizer, max_len, only) for r in job.train_rows]
    eval_ds = [tokenize(r, tokenizer, max_len, only) for r in job.eval_rows] or None

    model = job.model = load_model(job.model_path, cfg, target_modules)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("model ready", extra={"trainable_params": trainable, "params": total, "rows": len(train_ds)})

    monitor = Monitor(job.metrics_port, job.metrics_host, job.progress)
    try:
        trainer = make_trainer(model, tokenizer, args, train_ds, eval_ds, collator(cfg, tokenizer),
                               [monitor.callback()])
        trainer.remove_callback(PrinterCallback)  # the Monitor reports progress
        if resume is not None and job.progress and trainer.is_world_process_zero():
            print(f"resuming from {resume}", flush=True)
        started = time.monotonic()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runtime = time.monotonic() - started
        state = trainer.state
        eval_loss = None
        if eval_ds:
            last = [h for h in state.log_history if "eval_loss" in h]
            done = last and last[-1].get("step") == state.global_step
            eval_loss = float(last[-1]["eval_loss"] if done else trainer.evaluate()["eval_loss"])
        tokens = state.num_input_tokens_seen - monitor.tokens0
        metrics = {
            "method": cfg.method,
            "train_loss": float(result.training_loss),
            "eval_loss": eval_loss,
            "steps": state.global_step,
            "epochs": state.epoch,
            "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
            "tokens": int(state.num_input_tokens_seen),
            "tokens_this_run": int(tokens),
            "tokens_per_second": tokens / runtime if runtime else None,
            "train_runtime_s": runtime,
            "peak_memory_bytes": peak_memory_bytes(),
            "trainable_params": trainable,
            "params": total,
            "train_rows": len(train_ds),
            "eval_rows": len(eval_ds or []),
            "device": _device(),
        }
        if trainer.is_world_process_zero():
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            (out / TUNING_DONE_MARKER).write_text(f"Fine-Tuning completed at {stamp}\n")  # last: the image pusher waits for it
        return metrics
    finally:
        monitor.close()


def prepare(job_model: str, config: TrainingConfig, rows: list[Row]):
    """Everything that can be checked without the weights: tokenizer, chat template, every row
    tokenised, the target modules. Returns (tokenizer, target_modules)."""
    tokenizer = load_tokenizer(job_model, config)
    if any(r.messages is not None for r in rows):
        check_template(tokenizer)
    for r in rows:
        tokenize(r, tokenizer, config.DatasetConfig.max_seq_length, config.DataCollator.completion_only_loss)
    targets = resolve_target_modules(config, linear_modules(job_model, config))
    return tokenizer, targets
