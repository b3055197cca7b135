"""kaito-rag's index store in-process (SQLite, FAISS and the tantivy keyword index; vectors are random unit
rows, the embedding model is not needed here): the in-memory search structures follow every write and are
rebuilt from SQLite when an index opens."""

import sqlite3
import zlib

import numpy as np
import pytest
from kaito.ragservice.store import IndexStore, PreparedDoc

DIM = 8


def doc(doc_id: str, *chunks: str, metadata: dict | None = None) -> PreparedDoc:
    rng = np.random.default_rng(zlib.crc32("".join(chunks).encode()))
    vectors = rng.standard_normal((len(chunks), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return PreparedDoc(doc_id, " ".join(chunks), metadata or {}, doc_id + str(len(chunks)),
                       node_ids=[f"{doc_id}-{i}" for i in range(len(chunks))], chunk_texts=list(chunks),
                       vectors=vectors)


def keyword_docs(store: IndexStore, query: str, metadata_filter: dict | None = None) -> list[str]:
    _, ranking = store.keyword_search(query, 5, metadata_filter)
    owner = {cid: d for d, ids in store.doc_chunks.items() for cid in ids}
    assert all(cid in owner for cid in ranking), "the keyword index returned a chunk that is gone"
    return [owner[cid] for cid in ranking]


@pytest.fixture
def store(tmp_path):
    s = IndexStore(tmp_path, "t", DIM, "random")
    yield s
    s.close()


def test_keyword_index_follows_adds_updates_and_deletes(store, tmp_path):
    store.add([doc("a", "The aurora glowed over Tromso.", "Walruses rest on the ice."),
               doc("b", "A lighthouse keeper counted walruses.", metadata={"kind": "log"})])
    assert keyword_docs(store, "aurora") == ["a"]
    assert sorted(keyword_docs(store, "walrus")) == ["a", "b"]  # stemmed: walruses
    assert keyword_docs(store, "walrus", {"kind": "log"}) == ["b"]

    assert store.update([doc("a", "Glaciers calve into the fjord.")]) == []
    assert keyword_docs(store, "aurora") == [] and keyword_docs(store, "glacier") == ["a"]
    assert keyword_docs(store, "walrus") == ["b"]
    assert store.delete(["b", "zzz"]) == (["b"], ["zzz"])
    assert keyword_docs(store, "walrus") == [] and keyword_docs(store, "lighthouse") == []
    assert store.vectors.ntotal == 1

    store.close()
    reopened = IndexStore(tmp_path, "t", DIM, "random")  # rebuilt from SQLite
    try:
        assert keyword_docs(reopened, "glaciers fjord") == ["a"] and keyword_docs(reopened, "walrus") == []
        hits = reopened.search(np.ones(DIM, dtype=np.float32) / np.sqrt(DIM), 3,
                               *reopened.keyword_search("glacier", 3, None))
        assert [h.doc_id for h in hits] == ["a"] and hits[0].text == "Glaciers calve into the fjord."
    finally:
        reopened.close()


def test_queries_are_words_not_syntax(store):
    store.add([doc("t", "Ticket QZ-88123: the gate's hinge AND the latch squeak (loudly).")])
    for query in ['QZ-88123', 'hinge AND NOT "latch"', "latch)", "text:hinge", "*", "squeak^2 OR"]:
        assert keyword_docs(store, query) in (["t"], []), query
    assert keyword_docs(store, "qz 88123") == ["t"]
    assert keyword_docs(store, "*") == []


def test_an_index_written_with_the_fts5_table_opens_without_it(tmp_path):
    """Databases from before the tantivy keyword index carry an FTS5 table and triggers: they are dropped
    at open and the documents are searchable."""
    store = IndexStore(tmp_path, "old", DIM, "random")
    store.add([doc("old", "Copper mines of Cusco were surveyed.")])
    store.close()
    conn = sqlite3.connect(tmp_path / "index.sqlite")
    conn.executescript("""
        CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='id');
        CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
            INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text); END;
        INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild');""")
    conn.close()
    store = IndexStore(tmp_path, "old", DIM, "random")
    try:
        names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert not {"chunks_fts", "chunks_ai"} & names, names
        assert keyword_docs(store, "copper") == ["old"]
        store.add([doc("new", "Copper roofs turn green.")])  # no trigger left to write to a missing table
        assert set(keyword_docs(store, "copper")) == {"old", "new"}
    finally:
        store.close()
