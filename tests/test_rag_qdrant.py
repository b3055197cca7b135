"""kaito-rag's Qdrant store (vectorDB engine qdrant) on Qdrant's embedded mode, in-process: writes land in
SQLite first and then in the collection, hybrid search is Qdrant's own fused dense + BM25 query with the
same metadata filters as the default store, and opening an index repairs a collection that missed or
kept points across a crash. The server mode (url + api key) talks to a Qdrant server with the same
client calls; no server runs here."""

import numpy as np
import pytest
from kaito.ragservice.qdrant import QdrantStore, sparse
from kaito.ragservice.store import IndexStore
from qdrant_client.models import PointStruct
from test_rag_store import DIM, doc


@pytest.fixture
def store(tmp_path):
    s = QdrantStore(tmp_path, "q", DIM, "random")
    yield s
    s.close()


def hits(store, vector, query, k=3, metadata_filter=None):
    return store.search(vector, k, *store.keyword_search(query, k, metadata_filter))


def test_hybrid_search_filters_and_scores(store):
    store.add([doc("a", "The aurora glowed over Tromso.", metadata={"kind": "sky"}),
               doc("b", "Walruses rest on the ice near Tromso.", metadata={"kind": "sea"}),
               doc("c", "A lighthouse keeper counted walruses.", metadata={"kind": "sea", "n": 1})])
    a = store.client.retrieve(store.collection, [store.doc_chunks["a"][0]], with_vectors=True)[0].vector["dense"]
    top = hits(store, np.asarray(a, dtype=np.float32), "aurora")
    assert top[0].doc_id == "a" and top[0].score == pytest.approx(1.0)  # first for both: the vector and the word
    assert top[0].vector_score == pytest.approx(1.0, abs=1e-4) and top[0].text_score > 0
    walrus = hits(store, np.ones(DIM, dtype=np.float32) / np.sqrt(DIM), "walruses", k=3, metadata_filter={"kind": "sea"})
    assert {h.doc_id for h in walrus} == {"b", "c"} and all(h.metadata["kind"] == "sea" for h in walrus)
    assert hits(store, np.ones(DIM, dtype=np.float32), "x", metadata_filter={"n": True}) == []  # 1 is not True


def test_updates_and_deletes_reach_the_collection(store):
    store.add([doc("a", "Copper mines of Cusco."), doc("b", "Silk farms of Kyoto.")])
    store.update([doc("a", "Glaciers calve into the fjord.")])
    store.delete(["b"])
    assert store.chunk_count == 1 and store.client.count(store.collection).count == 1
    assert [h.doc_id for h in hits(store, np.ones(DIM, dtype=np.float32), "glaciers fjord")] == ["a"]
    assert hits(store, np.ones(DIM, dtype=np.float32), "silk kyoto")[0].text_score is None


def test_opening_repairs_the_collection_from_sqlite(tmp_path):
    store = QdrantStore(tmp_path, "q", DIM, "random")
    store.add([doc("a", "The aurora glowed."), doc("b", "Walruses rest.")])
    lost = store.doc_chunks["b"][0]
    store.client.delete(store.collection, [lost], wait=True)  # as if the process died between the two writes
    store.client.upsert(store.collection, points=[PointStruct(id=999, vector={"dense": [0.1] * DIM, "bm25": sparse("ghost")})])
    store.close()
    store = QdrantStore(tmp_path, "q", DIM, "random")
    try:
        assert sorted(int(p.id) for p in store.client.scroll(store.collection, limit=10)[0]) == \
            sorted(store.doc_chunks["a"] + [lost])
        assert [h.doc_id for h in hits(store, np.ones(DIM, dtype=np.float32), "walruses", k=1)] == ["b"]
    finally:
        store.close()
    faiss_store = IndexStore(tmp_path, "q", DIM, "random")  # the same database opens as the default store
    try:
        assert faiss_store.chunk_count == 2
    finally:
        faiss_store.close()


def test_bm25_sparse_vectors_stem_and_drop_stopwords():
    v = sparse("The walruses and the walrus")
    assert len(v.indices) == 1 and v.values[0] > 1  # one stem, counted twice
    assert sparse("the and of", query=True).indices == []
