"""One index on disk and in memory.

Durable state is one SQLite database per index (`<storage>/indexes/<name>/index.sqlite`, WAL journal,
`synchronous=FULL`): documents and their chunks with the embedding vectors. A write is acknowledged only
after its transaction commits, so a `kill -9` afterwards loses nothing and a crash before it leaves the
previous state (no torn files).

`Store` is that durable part, plus the documents' metadata in memory with an inverted index of it for
filters. Its two implementations keep the search structures, built from SQLite when the index opens and
changed after every committed write (so deletes and updates really remove vectors and words), keyed by
chunk row id:
- `IndexStore` (the default): FAISS and tantivy in memory.
  - FAISS: exact inner product (`IndexIDMap2(IndexFlatIP)`), or IVF-Flat (`IndexIVFFlat`, approximate:
    `nprobe` of `nlist` inverted lists are scanned) from `ANN_THRESHOLD` chunks with `vector_index="auto"`
    (from `IVF_MIN` with `"ivf"`). Vectors are unit length: inner product = cosine similarity.
  - tantivy: the BM25 keyword index over the chunk texts (English stemming), updated with every write,
    never rebuilt. (It replaced an SQLite FTS5 table: 0.06 ms a query instead of 3-5 ms at 10,000 chunks.
    Databases written with that table lose it when opened.)
- `QdrantStore` (qdrant.py): Qdrant's dense + BM25 sparse vectors and its own fused hybrid query.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import tantivy
from kaito.presets.cpu import available_cpus

from .models import document_problem, text_problem

log = logging.getLogger("kaito.ragservice")

DB_FILE = "index.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT UNIQUE NOT NULL, text TEXT NOT NULL,
    metadata TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL, node_id TEXT NOT NULL, text TEXT NOT NULL,
    vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id);
DROP TRIGGER IF EXISTS chunks_ai;
DROP TRIGGER IF EXISTS chunks_ad;
DROP TABLE IF EXISTS chunks_fts;
"""
COLUMNS = {"meta": ("key", "value"), "documents": ("seq", "doc_id", "text", "metadata", "hash"),
           "chunks": ("id", "doc_id", "node_id", "text", "vector")}  # what kaito-rag reads of each table
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.)
ANN_THRESHOLD = 100_000  # chunks from which vector_index="auto" searches an IVF index instead of all vectors
IVF_MIN = 20_000  # the least chunks an IVF index is trained on (below: exact, whatever the setting)
IVF_RECALL_PROBES = 32  # inverted lists scanned per query, per 4,096 lists (recall@10 0.999 measured at 1M)
# One query searches 10^4-10^5 vectors: a single thread does it in about a millisecond, while waking an
# OpenMP team on a busy machine costs tens of milliseconds at the tail. Concurrency comes from requests.
faiss.omp_set_num_threads(1)


class StoreError(ValueError):
    pass


def check_documents(docs: list[PreparedDoc]) -> None:
    """Every document fit to store (`document_problem`), before anything is written: StoreError otherwise."""
    for d in docs:
        if problem := document_problem(d.doc_id, d.text, d.metadata):
            raise StoreError(f"document {d.doc_id!r}: {problem}")


def _row_text(value) -> str:
    """A TEXT column read as bytes: its UTF-8 text (ValueError when it is not that)."""
    if not isinstance(value, bytes):
        raise ValueError(f"a {type(value).__name__} where text belongs")
    return value.decode()


@dataclass
class PreparedDoc:
    """A document ready to store: chunked and embedded outside any lock."""

    doc_id: str
    text: str
    metadata: dict
    hash: str
    node_ids: list[str] = field(default_factory=list)
    chunk_texts: list[str] = field(default_factory=list)
    vectors: np.ndarray | None = None


@dataclass
class StoredDoc:
    doc_id: str
    text: str
    metadata: dict
    hash: str


@dataclass
class Scope:
    """What one search looks at: the chunk ids a metadata filter admits (None: all) and how many candidates
    each ranking contributes to the fusion."""

    allowed: list[int] | None
    depth: int
    query: str = ""


@dataclass
class Hit:
    doc_id: str
    node_id: str
    text: str
    score: float  # the fused score, (0, 1]
    metadata: dict
    vector_score: float | None = None  # cosine similarity, when the chunk was among the dense candidates
    text_score: float | None = None  # BM25 score, when it was among the keyword candidates


def meta_key(key: str, value) -> tuple[str, str, str]:
    """A metadata item as the inverted indexes key it: exact type and value (1 is not True, nor 1.0)."""
    return key, type(value).__name__, json.dumps(value, sort_keys=True)


def meta_term(key: str, value) -> str:
    return "\x1f".join(meta_key(key, value))


def matches(metadata: dict, wanted: dict | None) -> bool:
    """Every key of the filter is present with exactly that value (types included: 1 is not True)."""
    if not wanted:
        return True
    for key, value in wanted.items():
        if key not in metadata:
            return False
        have = metadata[key]
        if type(have) is not type(value) or have != value:
            return False
    return True


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def read_only(path: Path) -> str:
    """The SQLite URI that opens a database read-only (any characters in its path)."""
    return f"{path.as_uri()}?mode=ro"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(conn: sqlite3.Connection, target: Path) -> None:
    """A consistent copy of a database at `target`, written beside it, fsynced, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        dst = sqlite3.connect(tmp)
        conn.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        dst.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


class KeywordIndex:
    """BM25 over chunk texts in memory (tantivy; English stemming, Lucene's BM25). Changes are made under
    the owning store's lock; searches read the last committed snapshot without it."""

    def __init__(self) -> None:
        schema = tantivy.SchemaBuilder()
        schema.add_text_field("text", tokenizer_name="en_stem")
        schema.add_integer_field("id", stored=True, indexed=True)
        schema.add_text_field("meta", tokenizer_name="raw")  # one term per metadata item (`meta_term`)
        self.schema = schema.build()
        self.index = tantivy.Index(self.schema)
        self.writer = self.index.writer(heap_size=50_000_000, num_threads=1)
        self.searcher = self.index.searcher()

    def change(self, added: list[tuple[int, str, dict]], removed: list[int]) -> None:
        """Chunks (id, text, its document's metadata) added and chunk ids removed, then committed."""
        for cid in removed:
            self.writer.delete_documents_by_term("id", cid)
        for cid, text, metadata in added:
            self.writer.add_document(tantivy.Document(id=cid, text=text, meta=[meta_term(k, v) for k, v in
                                                                               metadata.items()]))
        self.writer.commit()
        self.index.reload()
        self.searcher = self.index.searcher()

    def search(self, terms: list[str], depth: int, metadata_filter: dict | None) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) for any of the terms (each analysed like the texts), among the chunks whose
        metadata has every item of the filter (posting lists of the `meta` terms: fast at any size), best
        first."""
        searcher = self.searcher
        query = self.index.parse_query(" ".join(f'"{t}"' for t in terms), ["text"])
        if metadata_filter:
            query = tantivy.Query.boolean_query([(tantivy.Occur.Must, query)] + [
                (tantivy.Occur.Must, tantivy.Query.term_query(self.schema, "meta", meta_term(k, v)))
                for k, v in metadata_filter.items()])
        return [(searcher.doc(address)["id"][0], score)
                for score, address in searcher.search(query, depth, count=False).hits]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.wait_merging_threads()  # ends the writer
            self.writer = None


class VectorIndex:
    """FAISS over unit vectors keyed by chunk id: exact (`IndexIDMap2(IndexFlatIP)`) until the index is
    large enough for `kind`, then IVF-Flat (trained once on a sample when it switches, or when it opens
    at that size; `nprobe` scales with `nlist`, and with a metadata filter by the share it admits)."""

    def __init__(self, dim: int, kind: str = "auto") -> None:
        self.dim, self.kind = dim, kind
        self.index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.nprobe = 0  # 0: exact

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def approximate(self) -> bool:
        return self.nprobe > 0

    def _wants_ivf(self, n: int) -> bool:
        return (self.kind == "ivf" and n >= IVF_MIN) or (self.kind == "auto" and n >= ANN_THRESHOLD)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not self.approximate and self._wants_ivf(self.ntotal + len(ids)):
            self._to_ivf(ids, vectors)
        else:
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove_ids(ids)

    def _to_ivf(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Every vector so far plus the new ones into a trained IVF-Flat index."""
        if self.ntotal:
            old_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            old = self.index.index.reconstruct_n(0, self.ntotal)
            ids, vectors = np.concatenate([old_ids, ids]), np.vstack([old, vectors])
        n = len(ids)
        nlist = int(min(65536, n // 40, max(256, 4 * np.sqrt(n))))  # k-means wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = 10
        sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(available_cpus())  # training and assignment: every CPU the pod may use, once
        try:
            ivf.train(vectors[np.sort(sample)])
            ivf.add_with_ids(vectors, ids)
        finally:
            faiss.omp_set_num_threads(threads)
        self.index, self.nprobe = ivf, max(16, IVF_RECALL_PROBES * nlist // 4096)

    def search(self, vector: np.ndarray, depth: int, allowed: list[int] | None) -> tuple[list[int], list[float]]:
        sel = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)) if allowed is not None else None
        if self.approximate:
            nprobe = self.nprobe
            if allowed is not None:  # a filter leaves fewer vectors in each list: scan more lists
                nprobe = int(min(self.index.nlist, nprobe * np.sqrt(max(1.0, self.ntotal / max(1, len(allowed))))))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        scores, ids = self.index.search(vector.reshape(1, -1), depth, params=params)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        return [i for i, _ in found], [s for _, s in found]


class Store:
    """The durable part of an index (SQLite) and its documents' metadata in memory. Thread-safe: `lock`
    serialises the database connection and the search structures; callers do the slow work (chunking,
    embedding) before taking it. Subclasses keep the search structures (`_open_search`, `_follow`,
    `_keywords`, `_search`, `chunk_count`, `_close_search`)."""

    def __init__(self, folder: Path, name: str, dim: int, embedding_id: str, **options) -> None:
        self.folder, self.name, self.dim, self.options = folder, name, dim, options
        self.lock = threading.RLock()
        self.conn = _connect(folder / DB_FILE)
        self._local = threading.local()  # per-thread read connections: searches run outside the lock
        self._readers: list[sqlite3.Connection] = []
        self.conn.executescript(SCHEMA)
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany("INSERT INTO meta VALUES (?, ?)",
                                      [("dim", str(dim)), ("embedding", embedding_id), ("name", name)])
        elif int(meta["dim"]) != dim:
            self.conn.close()
            raise StoreError(f"index {name!r} holds {meta['dim']}-dimensional vectors from "
                             f"{meta.get('embedding')!r}; the configured embedding model gives {dim}")
        self.embedding_id = meta.get("embedding", embedding_id)
        self.docs: dict[str, tuple[str, dict]] = {}  # doc_id -> (hash, metadata)
        self.doc_chunks: dict[str, list[int]] = {}
        self.meta_index: dict[tuple[str, str, str], set[int]] = {}  # metadata item -> chunk ids
        self.skipped: dict[str, str] = {}  # doc_id -> why its stored rows are not served (`_load`)
        self.conn.text_factory = bytes  # decoded by `_load`, so that text that is not UTF-8 is a bad row
        try:
            ids, vectors, texts, metas = self._load()
        finally:
            self.conn.text_factory = str
        for doc_id, chunks in self.doc_chunks.items():
            self._index_meta(self.docs[doc_id][1], chunks, add=True)
        try:
            self._open_search(ids, vectors, texts, metas)
        except BaseException:
            self.conn.close()
            raise

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str], list[dict]]:
        """The documents and chunks of the database that can be served, as the search structures take them.
        A document whose row breaks the rules of new documents (`document_problem`, text that is not UTF-8,
        metadata that is not a JSON object), or one of whose chunks does not fit (its text, a vector of
        another size or not finite), is skipped with its chunks, as are chunks of no document: logged,
        counted (`skipped`, the rag_skipped_documents metric), and left in the database, where indexing
        that doc_id again replaces it and deleting it removes it."""
        for row in self.conn.execute("SELECT doc_id, text, metadata, hash FROM documents ORDER BY seq"):
            doc_id = row[0].decode(errors="replace") if isinstance(row[0], bytes) else str(row[0])
            try:
                doc_id, text, meta_json, h = map(_row_text, row)
                metadata = json.loads(meta_json)
                problem = document_problem(doc_id, text, metadata) if isinstance(metadata, dict) else \
                    "metadata: not a JSON object"
            except (ValueError, RecursionError) as e:
                problem = f"{type(e).__name__}: {e}"
            if problem:
                self.skipped[doc_id] = problem
            else:
                self.docs[doc_id], self.doc_chunks[doc_id] = (h, metadata), []
        count = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        ids = np.empty(count, dtype=np.int64)
        vectors = np.empty((count, self.dim), dtype=np.float32)  # filled in place: no copy of a million rows
        texts, metas, owners, orphans, n = [], [], [], 0, 0
        for cid, doc_id, text, blob in self.conn.execute("SELECT id, doc_id, text, vector FROM chunks"):
            doc_id = doc_id.decode(errors="replace") if isinstance(doc_id, bytes) else str(doc_id)
            if doc_id not in self.docs:
                orphans += doc_id not in self.skipped
                continue
            try:
                text = _row_text(text)
                if problem := text_problem(text):
                    raise ValueError(f"chunk {cid}: {problem}")
                if not isinstance(blob, bytes) or len(blob) != 4 * self.dim:
                    raise ValueError(f"chunk {cid}: not a {self.dim}-dimensional float32 vector")
            except ValueError as e:
                self.skipped[doc_id] = str(e)
                continue
            ids[n], vectors[n] = cid, np.frombuffer(blob, dtype=np.float32)
            texts.append(text)
            metas.append(self.docs[doc_id][1])
            owners.append(doc_id)
            self.doc_chunks[doc_id].append(cid)
            n += 1
        ids, vectors = ids[:n], vectors[:n]
        for row in np.flatnonzero(~np.isfinite(vectors).all(axis=1)).tolist():
            self.skipped[owners[row]] = f"chunk {ids[row]}: a vector that is not finite"
        if self.skipped or orphans:
            for doc_id in self.skipped:
                self.docs.pop(doc_id, None)
                self.doc_chunks.pop(doc_id, None)
            keep = [i for i, owner in enumerate(owners) if owner in self.docs]
            if len(keep) < n:
                ids, vectors = ids[keep], vectors[keep]
                texts, metas = [texts[i] for i in keep], [metas[i] for i in keep]
            log.warning("index opened without its invalid rows", extra={
                "index": self.name, "skipped_documents": len(self.skipped), "orphan_chunks": orphans,
                "why": dict(list(self.skipped.items())[:10])})
        return ids, vectors, texts, metas

    # --- the search structures (subclasses) -------------------------------------------------------

    def _open_search(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str], metas: list[dict]) -> None:
        """The search structures of the chunks in the database: ids, vectors, texts, their documents' metadata."""
        raise NotImplementedError

    def _follow(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str], metas: list[dict],
                removed: list[int]) -> None:
        """After a commit: the chunks added (ids, vectors, texts, metadata) and removed."""
        raise NotImplementedError

    def _keywords(self, terms: list[str], depth: int, metadata_filter: dict | None) -> list[tuple[int, float]]:
        raise NotImplementedError

    def _search(self, vector: np.ndarray, depth: int, scope: Scope,
                keyword: list[tuple[int, float]]) -> list[tuple[int, float, float | None, float | None]]:
        """(chunk id, fused score in (0, 1], vector score, text score), best first."""
        raise NotImplementedError

    @property
    def chunk_count(self) -> int:
        raise NotImplementedError

    def _close_search(self) -> None:
        pass

    # --- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def create(cls, indexes_dir: Path, name: str, dim: int, embedding_id: str, docs: list[PreparedDoc],
               **options) -> Store:
        """A new index appears on disk whole: written in a scratch folder, committed, then renamed."""
        scratch = indexes_dir / f".new-{name}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir(parents=True)
        try:
            Store._write(scratch, name, dim, embedding_id, docs)
            target = indexes_dir / name
            os.rename(scratch, target)
            fsync_dir(indexes_dir)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return cls(target, name, dim, embedding_id, **options)

    @staticmethod
    def _write(folder: Path, name: str, dim: int, embedding_id: str, docs: list[PreparedDoc]) -> None:
        """The database of a new index, without building search structures (they are built on open)."""
        check_documents(docs)
        conn = _connect(folder / DB_FILE)
        try:
            conn.executescript(SCHEMA)
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO meta VALUES (?, ?)",
                                 [("dim", str(dim)), ("embedding", embedding_id), ("name", name)])
                for d in docs:
                    if d.vectors is None:
                        continue
                    conn.execute("INSERT OR IGNORE INTO documents(doc_id, text, metadata, hash) VALUES (?, ?, ?, ?)",
                                 (d.doc_id, d.text, json.dumps(d.metadata), d.hash))
                    conn.executemany("INSERT INTO chunks(doc_id, node_id, text, vector) VALUES (?, ?, ?, ?)",
                                     [(d.doc_id, n, t, np.asarray(v, dtype=np.float32).tobytes())
                                      for n, t, v in zip(d.node_ids, d.chunk_texts, d.vectors)])
        finally:
            conn.close()

    @staticmethod
    def check(conn: sqlite3.Connection, where: Path, name: str, dim: int) -> None:
        """A kaito-rag index database (its tables with their columns) with vectors of this dimension;
        StoreError naming `where` otherwise."""
        try:
            for table, columns in COLUMNS.items():
                conn.execute(f"SELECT {', '.join(columns)} FROM {table} LIMIT 0")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{where} is not a kaito-rag index: {e}") from e
        if not str(meta.get("dim")).isdigit():
            raise StoreError(f"{where} is not a kaito-rag index: its meta table gives no vector dimension")
        if int(meta["dim"]) != dim:
            raise StoreError(f"index {name!r} holds {meta['dim']}-dimensional vectors from "
                             f"{meta.get('embedding')!r}; the configured embedding model gives {dim}")

    def close(self) -> None:
        with self.lock:
            self._close_search()
            self.conn.close()
            for reader in self._readers:
                reader.close()
            self._readers.clear()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (WAL readers see the last commit and never block writers)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(read_only(self.folder / DB_FILE), uri=True, check_same_thread=False)
            self._local.conn = conn
            with self.lock:
                self._readers.append(conn)
        return conn

    def backup_to(self, target: Path) -> None:
        with self.lock:
            backup(self.conn, target)

    # --- reads -----------------------------------------------------------------------------------

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.docs

    def get(self, doc_ids: list[str]) -> dict[str, StoredDoc]:
        if not doc_ids:
            return {}
        with self.lock:
            rows = self.conn.execute(
                "SELECT doc_id, text, metadata, hash FROM documents WHERE doc_id IN (SELECT value FROM json_each(?))",
                (json.dumps(doc_ids),)).fetchall()
        return {r[0]: StoredDoc(r[0], r[1], json.loads(r[2]), r[3]) for r in rows}

    def list(self, offset: int, limit: int, metadata_filter: dict | None) -> tuple[list[StoredDoc], int]:
        with self.lock:
            wanted = [d for d, (_, meta) in self.docs.items() if matches(meta, metadata_filter)]
            page = wanted[offset:offset + limit]
            found = self.get(page)
        return [found[d] for d in page if d in found], len(wanted)

    def allowed_chunks(self, metadata_filter: dict | None) -> list[int] | None:
        """The chunk ids a metadata filter admits (None: no filter), from the inverted index."""
        if not metadata_filter:
            return None
        sets = sorted((self.meta_index.get(meta_key(k, v), set()) for k, v in metadata_filter.items()), key=len)
        return list(set.intersection(*sets)) if sets else []

    def keyword_search(self, query: str, k: int, metadata_filter: dict | None,
                       stopwords: frozenset[str] = frozenset()) -> tuple[Scope, list[tuple[int, float]]]:
        """The first half of a hybrid search, which needs no query vector (so it runs while the query is
        embedded): the chunks the metadata filter admits and the keyword ranking among them of the query's
        words minus stopwords, as (chunk id, BM25 score)."""
        with self.lock:  # memory state changes together with writes
            allowed = self.allowed_chunks(metadata_filter)
            total = self.chunk_count if allowed is None else len(allowed)
        scope = Scope(allowed, min(max(3 * k, 20), total), query)
        terms = [t for t in dict.fromkeys(re.findall(r"\w+", query.lower())) if t not in stopwords]
        if scope.depth == 0 or not terms:
            return scope, []
        # a snapshot outside the lock: a chunk deleted meanwhile is not found when the rows are fetched
        return scope, self._keywords(terms, scope.depth, metadata_filter)

    def search(self, vector: np.ndarray, k: int, scope: Scope, keyword: list[tuple[int, float]]) -> list[Hit]:
        """The second half: the vector search over the same scope, fused with the keyword ranking."""
        if scope.depth == 0:
            return []
        best = self._search(vector, scope.depth, scope, keyword)[:k]
        docs = self.docs
        rows = {r[0]: r[1:] for r in self._reader().execute(
            "SELECT id, doc_id, node_id, text FROM chunks WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps([cid for cid, *_ in best]),))}
        return [Hit(rows[cid][0], rows[cid][1], rows[cid][2], score, docs.get(rows[cid][0], ("", {}))[1],
                    dense, sparse) for cid, score, dense, sparse in best if cid in rows]

    # --- writes (each one transaction; memory follows only after the commit) ----------------------

    def add(self, docs: list[PreparedDoc]) -> list[StoredDoc]:
        """Stores the documents whose ids are new (replacing rows of that id skipped at open); returns what
        is stored for every id asked for."""
        check_documents(docs)
        with self.lock:
            new = [d for d in docs if d.doc_id not in self.docs and d.vectors is not None]
            added: dict[str, list[int]] = {}
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                for d in new:
                    self.conn.execute("DELETE FROM chunks WHERE doc_id=?", (d.doc_id,))
                    self.conn.execute("DELETE FROM documents WHERE doc_id=?", (d.doc_id,))
                    self.conn.execute("INSERT INTO documents(doc_id, text, metadata, hash) VALUES (?, ?, ?, ?)",
                                      (d.doc_id, d.text, json.dumps(d.metadata), d.hash))
                    added[d.doc_id] = self._insert_chunks(d)
            for d in new:
                self.skipped.pop(d.doc_id, None)
            self._index(new, added)
            existing = self.get([d.doc_id for d in docs if d.doc_id not in added])
        return [StoredDoc(d.doc_id, d.text, d.metadata, d.hash) if d.doc_id in added else existing[d.doc_id]
                for d in docs if d.doc_id in added or d.doc_id in existing]

    def update(self, docs: list[PreparedDoc]) -> list[str]:
        """Replaces text, metadata and chunks of existing documents; returns the ids not found."""
        check_documents(docs)
        with self.lock:
            present = [d for d in docs if d.doc_id in self.docs]
            added: dict[str, list[int]] = {}
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                for d in present:
                    self.conn.execute("UPDATE documents SET text=?, metadata=?, hash=? WHERE doc_id=?",
                                      (d.text, json.dumps(d.metadata), d.hash, d.doc_id))
                    self.conn.execute("DELETE FROM chunks WHERE doc_id=?", (d.doc_id,))
                    added[d.doc_id] = self._insert_chunks(d)
            gone = self._forget([d.doc_id for d in present], keep_place=True)
            self._index(present, added, gone)
        return [d.doc_id for d in docs if d.doc_id not in added]

    def delete(self, doc_ids: list[str]) -> tuple[list[str], list[str]]:
        """Deletes the documents (and rows of those ids skipped at open); returns (deleted, not found)."""
        with self.lock:
            present = [d for d in dict.fromkeys(doc_ids) if d in self.docs or d in self.skipped]
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                for d in present:
                    self.conn.execute("DELETE FROM chunks WHERE doc_id=?", (d,))
                    self.conn.execute("DELETE FROM documents WHERE doc_id=?", (d,))
            for d in present:
                self.skipped.pop(d, None)
            gone = self._forget(present)
            self._index([], {}, gone)
        return present, [d for d in dict.fromkeys(doc_ids) if d not in present]

    def _insert_chunks(self, d: PreparedDoc) -> list[int]:
        ids = []
        for node_id, text, vector in zip(d.node_ids, d.chunk_texts, d.vectors):
            cur = self.conn.execute("INSERT INTO chunks(doc_id, node_id, text, vector) VALUES (?, ?, ?, ?)",
                                    (d.doc_id, node_id, text, np.asarray(vector, dtype=np.float32).tobytes()))
            ids.append(cur.lastrowid)
        return ids

    def _index_meta(self, metadata: dict, chunk_ids: list[int], add: bool) -> None:
        for key, value in metadata.items():
            item = meta_key(key, value)
            if add:
                self.meta_index.setdefault(item, set()).update(chunk_ids)
            elif item in self.meta_index:
                self.meta_index[item].difference_update(chunk_ids)
                if not self.meta_index[item]:
                    del self.meta_index[item]

    def _forget(self, doc_ids: list[str], keep_place: bool = False) -> list[int]:
        """Drops committed-away documents (or, keep_place: their chunks and metadata, the documents keeping
        their place in the listing order) from memory; returns their chunk ids."""
        gone = []
        for d in doc_ids:
            chunks = self.doc_chunks.pop(d, [])
            self._index_meta((self.docs[d] if keep_place else self.docs.pop(d, ("", {})))[1], chunks, add=False)
            gone += chunks
        return gone

    def _index(self, docs: list[PreparedDoc], chunk_ids: dict[str, list[int]], gone: list[int] = ()) -> None:
        """Memory follows a committed write: the maps, the metadata index and the search structures."""
        ids, rows, texts, metas = [], [], [], []
        for d in docs:
            self.docs[d.doc_id] = (d.hash, d.metadata)
            self.doc_chunks[d.doc_id] = chunk_ids[d.doc_id]
            self._index_meta(d.metadata, chunk_ids[d.doc_id], add=True)
            ids.extend(chunk_ids[d.doc_id])
            rows.append(np.asarray(d.vectors, dtype=np.float32))
            texts.extend(d.chunk_texts)
            metas.extend([d.metadata] * len(chunk_ids[d.doc_id]))
        vectors = np.vstack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
        if ids or gone:
            self._follow(np.asarray(ids, dtype=np.int64), vectors, texts, metas, list(gone))


def fuse(dense: list[tuple[int, float]], keyword: list[tuple[int, float]]) -> list[tuple[int, float, float | None,
                                                                                       float | None]]:
    """Reciprocal rank fusion of two rankings of (chunk id, score): (id, fused score scaled to (0, 1] - 1.0
    for a chunk first in both -, its dense score, its keyword score), best first."""
    fused: dict[int, float] = {}
    for ranking in (dense, keyword):
        for rank, (cid, _) in enumerate(ranking):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
    dense_scores, keyword_scores = dict(dense), dict(keyword)
    scale = (RRF_K + 1) / 2
    return [(cid, min(1.0, score * scale), dense_scores.get(cid), keyword_scores.get(cid))
            for cid, score in sorted(fused.items(), key=lambda kv: -kv[1])]


class IndexStore(Store):
    """The default store: FAISS (`VectorIndex`) and tantivy (`KeywordIndex`) in memory.
    Option: vector_index = auto | flat | ivf."""

    def _open_search(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str], metas: list[dict]) -> None:
        self.vectors = VectorIndex(self.dim, self.options.get("vector_index", "auto"))
        self.keywords = KeywordIndex()
        if len(ids):
            self.vectors.add(ids, vectors)
            self.keywords.change(list(zip(ids.tolist(), texts, metas)), [])

    def _follow(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str], metas: list[dict],
                removed: list[int]) -> None:
        if removed:
            self.vectors.remove(np.asarray(removed, dtype=np.int64))
        if len(ids):
            self.vectors.add(ids, vectors)
        self.keywords.change(list(zip(ids.tolist(), texts, metas)), removed)

    @property
    def chunk_count(self) -> int:
        return self.vectors.ntotal

    def _keywords(self, terms: list[str], depth: int, metadata_filter: dict | None) -> list[tuple[int, float]]:
        return self.keywords.search(terms, depth, metadata_filter)

    def _search(self, vector, depth, scope, keyword):
        with self.lock:  # FAISS changes together with writes
            ids, scores = self.vectors.search(vector, min(depth, self.vectors.ntotal), scope.allowed)
        return fuse(list(zip(ids, scores)), keyword)

    def _close_search(self) -> None:
        self.keywords.close()
