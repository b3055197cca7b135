"""`QdrantStore`: an index whose search structures live in Qdrant (upstream's `vectorDB: {engine: qdrant}`).

SQLite stays the durable record (store.Store: documents, chunks and their vectors, every write committed
before it is acknowledged); Qdrant holds one collection per index with two named vectors per chunk:
`dense` (the embedding, cosine) and `bm25` (a sparse vector of the chunk's stemmed words weighted by
BM25's term-frequency part; the collection's IDF modifier makes Qdrant apply the inverse document
frequency). A search is Qdrant's own hybrid query: both prefetched, fused by reciprocal rank.

Qdrant runs embedded (`QdrantClient(path=<index folder>/qdrant)`, when no URL is configured) or as a
server (`url` + `api_key`, collection `kaito-<index name>`). When an index opens, the collection is made
to match SQLite (points missing after a crash are added, points of uncommitted or deleted chunks are
removed), so a `kill -9` at any moment loses no acknowledged write.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from functools import lru_cache

import numpy as np
from qdrant_client import QdrantClient, models

from .store import RRF_K, Store

K1, B, AVG_WORDS = 1.2, 0.75, 64  # BM25's term-frequency saturation, length normalisation, a typical chunk
UPSERT_BATCH = 256


@lru_cache(maxsize=1)
def _analyzer():
    from llama_index.core.utils import globals_helper
    from nltk.stem.snowball import SnowballStemmer

    try:
        stop = frozenset(globals_helper.stopwords)
    except Exception:  # nltk data missing: common words only cost a little more
        stop = frozenset()
    return SnowballStemmer("english").stem, stop


def terms(text: str) -> list[str]:
    stem, stop = _analyzer()
    return [stem(w) for w in re.findall(r"\w+", text.lower()) if w not in stop]


def sparse(text: str, query: bool = False) -> models.SparseVector:
    """BM25's term-frequency weights of the text's stemmed words (1 each for a query), keyed by a hash."""
    counts = Counter(terms(text))
    length = sum(counts.values()) or 1
    weights: dict[int, float] = {}
    for term, tf in counts.items():
        w = 1.0 if query else tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / AVG_WORDS))
        index = zlib.crc32(term.encode()) & 0x7FFFFFFF
        weights[index] = weights.get(index, 0.0) + w
    return models.SparseVector(indices=list(weights), values=list(weights.values()))


class QdrantStore(Store):
    """Options: url (a Qdrant server; None: embedded in the index folder), api_key."""

    def _open_search(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str], metas: list[dict]) -> None:
        url = self.options.get("url")
        if url:
            self.client = QdrantClient(url=url, api_key=self.options.get("api_key"), timeout=60)
            self.collection = f"kaito-{self.name}"
        else:
            self.client = QdrantClient(path=str(self.folder / "qdrant"))
            self.collection = "chunks"
        if not self.client.collection_exists(self.collection):
            self.client.create_collection(
                self.collection,
                vectors_config={"dense": models.VectorParams(size=self.dim, distance=models.Distance.COSINE)},
                sparse_vectors_config={"bm25": models.SparseVectorParams(modifier=models.Modifier.IDF)})
        have = set(self._point_ids())
        wanted = dict(zip(ids.tolist(), range(len(ids))))
        stale = sorted(have - set(wanted))
        missing = [cid for cid in wanted if cid not in have]
        if stale:
            self.client.delete(self.collection, models.PointIdsList(points=stale), wait=True)
        rows = [wanted[cid] for cid in missing]
        self._upsert(ids[rows], vectors[rows], [texts[i] for i in rows])
        self.count = len(wanted)

    def _point_ids(self) -> list[int]:
        out, offset = [], None
        while True:
            points, offset = self.client.scroll(self.collection, limit=10_000, offset=offset, with_payload=False,
                                                with_vectors=False)
            out += [int(p.id) for p in points]
            if offset is None:
                return out

    def _upsert(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str]) -> None:
        for lo in range(0, len(ids), UPSERT_BATCH):
            self.client.upsert(self.collection, wait=True, points=[
                models.PointStruct(id=int(cid), vector={"dense": vec.tolist(), "bm25": sparse(text)})
                for cid, vec, text in zip(ids[lo:lo + UPSERT_BATCH], vectors[lo:lo + UPSERT_BATCH],
                                          texts[lo:lo + UPSERT_BATCH])])

    def _follow(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str], metas: list[dict],
                removed: list[int]) -> None:
        if removed:
            self.client.delete(self.collection, models.PointIdsList(points=removed), wait=True)
        self._upsert(ids, vectors, texts)
        self.count += len(ids) - len(removed)

    @property
    def chunk_count(self) -> int:
        return self.count

    def _keywords(self, words: list[str], depth: int, metadata_filter: dict | None) -> list[tuple[int, float]]:
        return []  # the keyword side is part of Qdrant's hybrid query (`_search`)

    def _search(self, vector, depth, scope, keyword):
        query_words = sparse(scope.query, query=True)
        where = None if scope.allowed is None else models.Filter(must=[models.HasIdCondition(has_id=scope.allowed)])
        dense = vector.astype(np.float32).tolist()
        prefetch = [models.Prefetch(query=dense, using="dense", limit=depth, filter=where)]
        if query_words.indices:
            prefetch.append(models.Prefetch(query=query_words, using="bm25", limit=depth, filter=where))
        fused = self.client.query_points(self.collection, prefetch=prefetch,
                                         query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)), limit=depth).points
        top = [int(p.id) for p in fused]
        if not top:
            return []
        only = models.Filter(must=[models.HasIdCondition(has_id=top)])
        requests = [models.QueryRequest(query=dense, using="dense", filter=only, limit=len(top))]
        if query_words.indices:
            requests.append(models.QueryRequest(query=query_words, using="bm25", filter=only, limit=len(top)))
        side = [{int(p.id): p.score for p in r.points} for r in self.client.query_batch_points(self.collection,
                                                                                                  requests)]
        vector_scores, text_scores = side[0], side[1] if len(side) > 1 else {}
        best = 2 / RRF_K  # first in both rankings
        return [(int(p.id), min(1.0, p.score / best), vector_scores.get(int(p.id)), text_scores.get(int(p.id)))
                for p in fused]

    def _close_search(self) -> None:
        self.client.close()
