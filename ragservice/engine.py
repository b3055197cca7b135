"""The RAG engine: the indexes of one storage root, chunking, embedding and hybrid retrieval.

Slow work (chunking, embedding, search) runs on worker threads so the event loop keeps serving; writes
to one index are serialised by the index's lock, and whole-index operations (create, delete, load) by
the engine's lock.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path

from .chunking import Chunker
from .config import Settings
from .embedding import LocalEmbedding, QueryBatcher, RemoteEmbedding
from .store import DB_FILE, Hit, IndexStore, PreparedDoc, Store, StoredDoc, StoreError, backup, fsync_dir, read_only

log = logging.getLogger("kaito.ragservice")
NAME_MAX, PATH_MAX = 255, 4096  # bytes in a file name, in a path (Linux)


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    pass


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stopwords() -> frozenset[str]:
    try:
        from llama_index.core.utils import globals_helper

        return frozenset(globals_helper.stopwords)
    except Exception:  # nltk data missing: BM25 still works, common words only cost a little more
        return frozenset()


class RagEngine:
    def __init__(self, settings: Settings, embedder=None) -> None:
        self.settings = settings
        self.root = settings.storage_dir.resolve()
        self.indexes_dir = self.root / "indexes"
        self.indexes_dir.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder or self._make_embedder()
        self.queries = QueryBatcher(self.embedder)
        self.chunker = Chunker(settings.chunk_size, settings.chunk_overlap)
        self.stopwords = _stopwords()
        self.lock = threading.RLock()
        self.indexes: dict[str, Store] = {}
        self.store_class, self.store_options = self._store_kind()
        self._load_all()

    def _store_kind(self) -> tuple[type[Store], dict]:
        s = self.settings
        if s.vector_db == "qdrant":
            from .qdrant import QdrantStore

            return QdrantStore, {"url": s.vector_db_url, "api_key": s.vector_db_key}
        return IndexStore, {"vector_index": s.vector_index}

    def open_store(self, folder: Path, name: str) -> Store:
        return self.store_class(folder, name, self.embedder.dim, self.embedder.model_id, **self.store_options)

    def _make_embedder(self):
        s = self.settings
        if s.embedding_source == "remote":
            return RemoteEmbedding(s.remote_embedding_url, s.remote_embedding_key, protocol=s.remote_embedding_protocol)
        return LocalEmbedding(s.embedding_model, batch_size=s.embed_batch_size, backend=s.embedding_backend,
                              device=s.embedding_device)

    def _load_all(self) -> None:
        for folder in sorted(self.indexes_dir.iterdir()):
            if folder.name.startswith("."):  # scratch of a create or delete cut short by a crash
                shutil.rmtree(folder, ignore_errors=True)
            elif (folder / DB_FILE).exists():
                self.indexes[folder.name] = self.open_store(folder, folder.name)
        # Millions of long-lived objects (documents, metadata) would make every full garbage collection
        # walk them (pauses of a second at a million chunks): what is loaded now is left out of them.
        gc.collect()
        gc.freeze()
        log.info("indexes loaded", extra={"count": len(self.indexes), "root": str(self.root)})

    def close(self) -> None:
        self.queries.close()
        with self.lock:
            for store in self.indexes.values():
                store.close()
            self.indexes.clear()
        self.embedder.close()

    # --- paths -------------------------------------------------------------------------------------

    def safe_path(self, path: str | None, default: str) -> Path:
        """A persist/load folder inside the storage root (relative paths are relative to it), never
        inside the live `indexes/` folder, with names a file system takes (NAME_MAX, PATH_MAX bytes)."""
        p = Path(path or default)
        if any(len(part.encode()) > NAME_MAX for part in p.parts) or len(str(self.root / p).encode()) >= PATH_MAX:
            raise StoreError(f"path {path!r} is too long: at most {NAME_MAX} bytes a name, {PATH_MAX - 1} in all")
        resolved = (p if p.is_absolute() else self.root / p).resolve()
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise StoreError(f"path {path!r} is outside the storage directory {self.root}")
        if resolved.is_relative_to(self.indexes_dir):
            raise StoreError(f"path {path!r} is inside the live index folder {self.indexes_dir}")
        return resolved

    # --- indexes ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.indexes)

    def get(self, name: str) -> Store:
        try:
            return self.indexes[name]
        except KeyError:
            raise NotFound(f"No such index: '{name}' exists.") from None

    def delete_index(self, name: str) -> None:
        with self.lock:
            store = self.get(name)
            store.close()
            del self.indexes[name]
            trash = self.indexes_dir / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            store.folder.rename(trash)  # atomic: a crash leaves the index either whole or gone
            fsync_dir(self.indexes_dir)
            shutil.rmtree(trash, ignore_errors=True)

    def persist(self, name: str, path: str | None) -> Path:
        store = self.get(name)
        target = self.safe_path(path, f"snapshots/{name}")
        try:
            store.backup_to(target / DB_FILE)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:  # a file where a folder belongs
            raise StoreError(f"cannot persist to {path!r}: {e.strerror}") from e
        return target

    def load(self, name: str, path: str | None, overwrite: bool) -> Path:
        source = self.safe_path(path, f"snapshots/{name}")
        if not (source / DB_FILE).is_file():
            raise NotFound(f"No persisted index found at {source}")
        with self.lock:
            if name in self.indexes and not overwrite:
                raise Conflict(f"Index '{name}' already exists; use overwrite=true to replace it")
            scratch = self.indexes_dir / f".load-{name}-{uuid.uuid4().hex[:8]}"
            scratch.mkdir()
            try:
                src = sqlite3.connect(read_only(source / DB_FILE), uri=True)
                try:
                    Store.check(src, source / DB_FILE, name, self.embedder.dim)  # the database and its vectors fit
                    backup(src, scratch / DB_FILE)
                except sqlite3.DatabaseError as e:
                    raise StoreError(f"{source / DB_FILE} is not a kaito-rag index: {e}") from e
                finally:
                    src.close()
                if name in self.indexes:
                    old = self.indexes.pop(name)
                    old.close()
                    trash = self.indexes_dir / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
                    old.folder.rename(trash)
                    scratch.rename(old.folder)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    scratch.rename(self.indexes_dir / name)
                fsync_dir(self.indexes_dir)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            self.indexes[name] = self.open_store(self.indexes_dir / name, name)
        return source

    # --- documents -------------------------------------------------------------------------------

    def prepare(self, docs: list[PreparedDoc]) -> list[PreparedDoc]:
        """Chunks and embeds (all chunks of the request in one length-sorted embedding call)."""
        spans = []
        texts: list[str] = []
        for d in docs:
            chunks = self.chunker.split(d.text, d.metadata)
            d.node_ids = [c.node_id for c in chunks]
            d.chunk_texts = [c.text for c in chunks]
            spans.append((len(texts), len(texts) + len(chunks)))
            texts.extend(d.chunk_texts)
        vectors = self.embedder.embed(texts)
        for d, (a, b) in zip(docs, spans):
            d.vectors = vectors[a:b]
        return docs

    def index(self, name: str, docs: list[PreparedDoc]) -> list[StoredDoc]:
        for d in docs:
            self.chunker.check(d.metadata)
        store = self.indexes.get(name)
        todo = [d for d in docs if store is None or d.doc_id not in store]
        self.prepare(todo)
        with self.lock:
            store = self.indexes.get(name)
            if store is None:
                store = self.store_class.create(self.indexes_dir, name, self.embedder.dim, self.embedder.model_id,
                                                todo, **self.store_options)
                self.indexes[name] = store
                return [StoredDoc(d.doc_id, d.text, d.metadata, d.hash) for d in todo]
        # documents another writer deleted since the first look need chunks and vectors after all
        self.prepare([d for d in docs if d.vectors is None and d.doc_id not in store])
        return store.add(docs)

    def update(self, name: str, docs: list[PreparedDoc]):
        store = self.get(name)
        for d in docs:
            self.chunker.check(d.metadata)
        current = store.get([d.doc_id for d in docs])
        changed, unchanged, not_found = [], [], []
        for d in docs:
            have = current.get(d.doc_id)
            if have is None:
                not_found.append(d)
            elif have.hash == d.hash and have.metadata == d.metadata:
                unchanged.append(have)
            else:
                changed.append(d)
        self.prepare(changed)
        missing = set(store.update(changed))  # deleted by another writer meanwhile
        not_found += [d for d in changed if d.doc_id in missing]
        return [d for d in changed if d.doc_id not in missing], unchanged, not_found

    # --- retrieval -------------------------------------------------------------------------------

    async def retrieve(self, name: str, query: str, k: int, metadata_filter: dict | None = None) -> list[Hit]:
        """Hybrid retrieval: the keyword search runs on a worker thread while the query is embedded."""
        store = self.get(name)
        (scope, keyword), vector = await asyncio.gather(
            asyncio.to_thread(store.keyword_search, query, k, metadata_filter, self.stopwords),
            self.queries.embed(query))
        return await asyncio.to_thread(store.search, vector, k, scope, keyword)


def new_doc(text: str, metadata: dict | None, doc_id: str | None) -> PreparedDoc:
    h = text_hash(text)
    return PreparedDoc(doc_id=doc_id or h, text=text, metadata=dict(metadata or {}), hash=h)
