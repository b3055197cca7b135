"""kaito-rag's index store in-process (SQLite, FAISS and the tantivy keyword index; vectors are random unit
rows, the embedding model is not needed here): the in-memory search structures follow every write and are
rebuilt from SQLite when an index opens."""

import sqlite3
import zlib

import numpy as np
import pytest
from kaito.ragservice.store import IndexStore, PreparedDoc, StoreError

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
    ranking = [cid for cid, score in ranking]
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


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Clustered unit vectors (like embeddings: nearest neighbours are meaningfully nearer than the rest)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 50 + 1, dim)).astype(np.float32)
    rows = centres[rng.integers(0, len(centres), n)] + 0.25 * rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_ivf_index_finds_what_exact_search_finds_and_follows_deletes(monkeypatch):
    """From IVF_MIN vectors an "ivf" index switches to IVF-Flat: recall@10 against exact search stays high,
    removed ids are gone, and a filter still finds its (few) chunks."""
    from kaito.ragservice import store as store_module

    monkeypatch.setattr(store_module, "IVF_MIN", 2_000)
    dim, n = 32, 6_000
    rows = unit_rows(n, dim, 1)
    ids = np.arange(1, n + 1, dtype=np.int64)
    ivf = store_module.VectorIndex(dim, "ivf")
    ivf.add(ids[:1000], rows[:1000])
    assert not ivf.approximate  # too few to train on
    ivf.add(ids[1000:], rows[1000:])
    assert ivf.approximate and ivf.ntotal == n
    exact = store_module.VectorIndex(dim, "flat")
    exact.add(ids, rows)
    rng = np.random.default_rng(2)  # queries near the data, as questions are near their answers
    queries = rows[rng.integers(0, n, 50)] + 0.1 * rng.standard_normal((50, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    recall = np.mean([len(set(ivf.search(q, 10, None)[0]) & set(exact.search(q, 10, None)[0])) / 10 for q in queries])
    assert recall >= 0.95, recall
    ivf.remove(ids[:3000])
    assert ivf.ntotal == n - 3000 and all(i > 3000 for i in ivf.search(queries[0], 10, None)[0])
    few = [3001, 4500, 5999]
    found, scores = ivf.search(queries[0], 10, few)
    assert sorted(found) == few and scores == sorted(scores, reverse=True)


def test_metadata_filters_use_exact_types_and_follow_updates(store):
    store.add([doc("a", "alpha text", metadata={"n": 1, "tag": "x"}), doc("b", "beta text", metadata={"n": True}),
               doc("c", "gamma text", metadata={"n": 1.0, "tag": "x"})])
    owner = {cid: d for d, ids in store.doc_chunks.items() for cid in ids}
    assert [owner[c] for c in store.allowed_chunks({"n": 1})] == ["a"]
    assert [owner[c] for c in store.allowed_chunks({"n": True})] == ["b"]
    assert sorted(owner[c] for c in store.allowed_chunks({"tag": "x"})) == ["a", "c"]
    assert store.allowed_chunks({"tag": "x", "n": 1.0}) == store.doc_chunks["c"]
    assert store.allowed_chunks({"missing": 1}) == []
    store.update([doc("a", "alpha again", metadata={"n": 2})])
    assert list(store.docs) == ["a", "b", "c"]  # an update keeps the document's place (listing order)
    store.delete(["c"])
    assert store.allowed_chunks({"tag": "x"}) == [] and store.allowed_chunks({"n": 2}) == store.doc_chunks["a"]


def test_hits_carry_the_vector_and_keyword_scores(store):
    store.add([doc("a", "The aurora glowed over Tromso."), doc("b", "Walruses rest on the ice.")])
    vector = store.vectors.index.reconstruct(store.doc_chunks["a"][0])
    hits = store.search(vector, 2, *store.keyword_search("aurora", 2, None))
    assert hits[0].doc_id == "a" and hits[0].score == 1.0
    assert abs(hits[0].vector_score - 1.0) < 1e-5 and hits[0].text_score > 0
    assert hits[1].text_score is None and hits[1].vector_score < hits[0].vector_score


BAD_ROWS = {  # doc_id -> (text, metadata JSON, its chunk's vector as bytes or None for a good one)
    "not-json": ("x", "{not json", None),
    "not-an-object": ("x", "[1, 2]", None),
    "nan": ("x", '{"x": NaN}', None),
    "too-deep": ("x", '{"a": ' * 40 + "1" + "}" * 40, None),
    "nul": ("nul \x00 text", "{}", None),
    "short-vector": ("x", "{}", b"\x00" * 12),
    "nan-vector": ("x", "{}", np.full(DIM, np.nan, dtype=np.float32).tobytes()),
}


def test_invalid_stored_rows_are_skipped_reported_and_replaceable(tmp_path, caplog):
    """Rows written straight into an index's database that kaito-rag would never write: the index opens
    without them (logged, counted in `skipped`), what it serves lists and searches, indexing a skipped id
    again replaces its row and deleting one removes it."""
    store = IndexStore(tmp_path, "t", DIM, "random")
    store.add([doc("good", "The aurora glowed over Tromso.", metadata={"k": 1})])
    store.close()
    with sqlite3.connect(tmp_path / "index.sqlite") as conn:
        for doc_id, (text, meta, vector) in BAD_ROWS.items():
            conn.execute("INSERT INTO documents(doc_id, text, metadata, hash) VALUES (?, ?, ?, 'h')", (doc_id, text, meta))
            conn.execute("INSERT INTO chunks(doc_id, node_id, text, vector) VALUES (?, 'n', ?, ?)",
                         (doc_id, text, vector or np.ones(DIM, dtype=np.float32).tobytes()))
        conn.execute("INSERT INTO documents(doc_id, text, metadata, hash) VALUES ('not-utf8', CAST(x'ff' AS TEXT), "
                     "'{}', 'h')")
        conn.execute("INSERT INTO chunks(doc_id, node_id, text, vector) VALUES ('nobody', 'n', 'x', x'00')")
    with caplog.at_level("WARNING", logger="kaito.ragservice"):
        store = IndexStore(tmp_path, "t", DIM, "random")
    try:
        assert list(store.docs) == ["good"] and set(store.skipped) == {*BAD_ROWS, "not-utf8"}, store.skipped
        assert "not a JSON number" in store.skipped["nan"] and "deeper than 32" in store.skipped["too-deep"]
        assert "vector" in store.skipped["short-vector"] and "not finite" in store.skipped["nan-vector"]
        assert [r.orphan_chunks for r in caplog.records if hasattr(r, "orphan_chunks")] == [1]
        docs, total = store.list(0, 100, None)
        assert [d.doc_id for d in docs] == ["good"] and total == 1 and store.chunk_count == 1
        assert keyword_docs(store, "x aurora") == ["good"]
        with pytest.raises(StoreError, match="doc_id: text must not contain NUL"):
            store.add([doc("a\x00", "nul in the id")])
        store.add([doc("nan", "Replaced with a good row.")])
        assert store.delete(["too-deep", "nothing"]) == (["too-deep"], ["nothing"])
        assert "nan" in store.docs and "nan" not in store.skipped and "too-deep" not in store.skipped
    finally:
        store.close()
    reopened = IndexStore(tmp_path, "t", DIM, "random")
    try:
        assert list(reopened.docs) == ["good", "nan"] and "too-deep" not in reopened.skipped
        assert keyword_docs(reopened, "replaced") == ["nan"]
    finally:
        reopened.close()


def test_only_a_kaito_rag_database_is_an_index(tmp_path):
    conn = sqlite3.connect(tmp_path / "foreign.sqlite")
    conn.executescript("CREATE TABLE meta(key, value); CREATE TABLE chunks(x); CREATE TABLE documents(doc_id, text);")
    with pytest.raises(StoreError, match="is not a kaito-rag index: no such column"):
        IndexStore.check(conn, tmp_path / "foreign.sqlite", "f", DIM)
    conn.executescript("DROP TABLE chunks; DROP TABLE documents; CREATE TABLE documents(seq, doc_id, text, metadata, "
                       "hash); CREATE TABLE chunks(id, doc_id, node_id, text, vector);")
    with pytest.raises(StoreError, match="gives no vector dimension"):
        IndexStore.check(conn, tmp_path / "foreign.sqlite", "f", DIM)
    conn.execute("INSERT INTO meta VALUES ('dim', '16')")
    with pytest.raises(StoreError, match="holds 16-dimensional vectors"):
        IndexStore.check(conn, tmp_path / "foreign.sqlite", "f", DIM)
    conn.close()
