"""RAG benchmark: indexing chunks/s and retrieve latency at 10,000 chunks, kaito-rag against a plain
LlamaIndex + FAISS + sentence-transformers baseline doing the same work in the same run.

  kaito-rag   a `kaito-rag` process (ONNX Runtime embeddings, length-sorted batches, query batching,
              hybrid FAISS + BM25 retrieval, durable SQLite writes), driven over HTTP with httpx
  baseline    in this process: `VectorStoreIndex` over `FaissVectorStore(IndexFlatIP)` with
              `HuggingFaceEmbedding` (sentence-transformers, LlamaIndex defaults), `as_retriever()`

The corpus is generated (seeded): documents of 15-110 words, one chunk each. The machine is shared, so
the two targets are interleaved: indexing alternates batches of 250 documents (kaito-rag over HTTP,
then the baseline) over the first --baseline-chunks documents (the baseline is slow), then kaito-rag
indexes the rest; for the baseline's retrieval the remaining chunks are inserted with kaito-rag's
vectors (same model), so both search the whole corpus. Retrieval: --queries requests at concurrency 1
and 8, in alternating rounds (kaito-rag: one asyncio httpx client; baseline: threads). Quality: the share
of answerable questions (some document has the asked topic, place and verb) with such a document in the
top 5, for both. Targets: indexing >= 2x the baseline; p50 <= 20 ms and p99 <= 50 ms at concurrency 1;
throughput at 8 >= 1.5x that at 1. `--embedding-backend onnx-int8` measures kaito-rag's int8 option.

    python benchmarks/rag_bench.py                      # 10,000 chunks
    python benchmarks/rag_bench.py --chunks 2000 --baseline-chunks 500 --queries 100   # quick look
    python benchmarks/rag_bench.py --embedding-backend onnx-int8                       # -> results/rag-onnx-int8.md
    python benchmarks/rag_bench.py --chunks 1000000     # -> results/rag-1m.md (see `large`)

Above 10,000 chunks (`large`): kaito-rag indexes the first 10,000 documents over HTTP (embedded text),
the rest are written into the same index's database with synthetic vectors (each a stored vector plus
noise, cosine about 0.9 to it: clustered like real embeddings), and kaito-rag is restarted on it, so it
builds its approximate (IVF) index and the keyword index from the database as it would after a restart.
Reported: that build's time and the server's RSS, retrieve p50/p99 at concurrency 1 over HTTP (hybrid,
with and without a metadata filter), and, in-process on the same vectors, recall@10 of kaito-rag's IVF
index against exact FAISS search (`faiss.knn`) for the benchmark's questions embedded with MiniLM.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import csv
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

import procs  # benchmarks/ is on sys.path: scripts run from their folder
from procs import free_port

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
BATCH = 500  # documents per /index call

TOPICS = ["harbour", "glacier", "violin", "copper mine", "orchard", "lighthouse", "railway", "observatory",
          "bakery", "library", "vineyard", "shipyard", "monastery", "bridge", "market", "reservoir", "quarry",
          "windmill", "theatre", "greenhouse", "printing press", "clock tower", "salt marsh", "silk farm"]
PLACES = ["Tromso", "Valparaiso", "Kyoto", "Nairobi", "Tallinn", "Cusco", "Hobart", "Leipzig", "Oaxaca", "Bergen",
          "Dakar", "Porto", "Hanoi", "Quebec", "Tbilisi", "Galway", "Asmara", "Perth", "Lyon", "Manaus"]
VERBS = ["was rebuilt", "was opened", "was flooded", "was sold", "was restored", "was expanded", "was closed",
         "was painted", "was surveyed", "was moved"]
FILLER = ("local records say that the work took many seasons and that the town paid for most of it, while "
          "visitors still come to see the old stones, the narrow paths and the view over the water at dusk "
          "when the light turns gold and the streets grow quiet again after the long day").split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        topic, place, verb = rng.choice(TOPICS), rng.choice(PLACES), rng.choice(VERBS)
        year = rng.randint(1700, 2030)
        words = rng.randint(5, 100)
        start = rng.randint(0, len(FILLER) - 1)
        filler = " ".join(FILLER[(start + k) % len(FILLER)] for k in range(words))
        text = f"Record {i}: the {topic} of {place} {verb} in {year}; {filler}."
        docs.append({"doc_id": f"doc-{i}", "text": text, "metadata": {"topic": topic, "place": place}})
    return docs


def queries(docs: list[dict], n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = rng.choice(docs)["metadata"]
        out.append(f"When was the {d['topic']} of {d['place']} {rng.choice(VERBS).split()[1]}?")
    return out


def hit_rate(found: list[list[str]], qs: list[str], docs: list[dict]) -> float:
    """Share of the answerable questions with an answering document in their top 5."""
    answers = {}
    for d in docs:
        m = d["metadata"]
        verb = d["text"].split(m["place"] + " was ")[1].split()[0]
        answers.setdefault(f"When was the {m['topic']} of {m['place']} {verb}?", set()).add(d["doc_id"])
    scored = [bool(set(ids) & answers[q]) for ids, q in zip(found, qs) if q in answers]
    return sum(scored) / max(1, len(scored))


async def http_latency_run(url: str, qs: list[str], concurrency: int, extra: dict | None = None) -> dict[str, float]:
    """`latency_run` for the server: one asyncio client with `concurrency` requests in flight (a thread per
    request would measure the client's GIL more than the server). `extra`: more request fields."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def call(q: str) -> float:
            t = time.perf_counter()
            r = await client.post("/retrieve", json={"index_name": "bench", "query": q, "max_node_count": 5,
                                                     **(extra or {})})
            r.raise_for_status()
            return time.perf_counter() - t

        for q in qs[:5]:
            await call(q)  # warm-up
        pending = list(qs)
        lat: list[float] = []

        async def worker() -> None:
            while pending:
                lat.append(await call(pending.pop()))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return lat, time.perf_counter() - start


def summary(lat: list[float], wall: float) -> dict[str, float]:
    ms = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "rps": len(lat) / wall}


# --- kaito-rag ---------------------------------------------------------------------------------------------

class Rag:
    def __init__(self, storage: Path, log: Path, backend: str, timeout: float = 300) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = procs.start([str(BIN / "kaito-rag"), "--host", "127.0.0.1", "--port", str(port), "--storage-dir",
                                 str(storage), "--embedding-backend", backend], port, log, timeout=timeout)

    def rss_gib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
        return float("nan")

    def stop(self) -> None:
        procs.stop(self.proc, 30)


def bench(docs, qs, baseline_chunks: int, workdir: Path, backend: str) -> tuple[dict, dict]:
    """Both targets, interleaved so that they see the same background load: indexing alternates batches
    of kaito-rag and of the baseline over the first `baseline_chunks` documents, then kaito-rag indexes the
    rest alone; retrieval alternates rounds at concurrency 1 and 8."""
    rag = Rag(workdir / "storage", workdir / "kaito-rag.log", backend)
    try:
        baseline = Baseline()
        client = httpx.Client(base_url=rag.url, timeout=600)
        ours, theirs = [], []
        step = 250
        for start in tqdm(range(0, len(docs), step), desc="indexing", unit="batch"):
            batch = docs[start:start + step]
            t = time.perf_counter()
            client.post("/index", json={"index_name": "bench", "documents": batch}).raise_for_status()
            ours.append((len(batch), time.perf_counter() - t))
            if start < baseline_chunks:
                theirs.append((len(batch), baseline.index(batch)))
        n_sub = min(baseline_chunks, len(docs))
        rag_result = {"index_chunks_s": len(docs) / sum(dt for _, dt in ours),
                      "index_chunks_s_subset": n_sub / sum(dt for _, dt in ours[:len(theirs)])}
        base_result = {"index_chunks_s": n_sub / sum(dt for _, dt in theirs)}
        baseline.add_vectors(docs, export_vectors(workdir / "storage", len(docs)), n_sub)
        rounds = 3
        runs: dict[tuple[str, int], tuple[list, float]] = {}
        for part in range(rounds):
            chunk = qs[part::rounds]
            for c in (1, 8):
                for name, (lat, wall) in (("rag", asyncio.run(http_latency_run(rag.url, chunk, c))),
                                          ("base", baseline.latency(chunk, c))):
                    prev = runs.get((name, c), ([], 0.0))
                    runs[(name, c)] = (prev[0] + lat, prev[1] + wall)
        for (name, c), (lat, wall) in runs.items():
            for k, v in summary(lat, wall).items():
                (rag_result if name == "rag" else base_result)[f"c{c}_{k}"] = v
        found = [[h["doc_id"] for h in client.post("/retrieve", json={"index_name": "bench", "query": q,
                                                                      "max_node_count": 5}).json()["results"]]
                 for q in qs]
        rag_result["hit5"] = hit_rate(found, qs, docs)
        base_result["hit5"] = hit_rate([baseline.doc_ids(q) for q in qs], qs, docs)
    finally:
        rag.stop()
    return rag_result, base_result


def export_vectors(storage: Path, n: int) -> np.ndarray:
    """kaito-rag's stored vectors in document order (for the baseline's retrieval index)."""
    import sqlite3

    conn = sqlite3.connect(storage / "indexes" / "bench" / "index.sqlite")
    rows = conn.execute("SELECT doc_id, vector FROM chunks").fetchall()
    conn.close()
    out = np.zeros((n, 384), dtype=np.float32)
    for doc_id, blob in rows:
        out[int(doc_id.split("-")[1])] = np.frombuffer(blob, dtype=np.float32)
    return out


# --- a million chunks -------------------------------------------------------------------------------------

EMBEDDED = 10_000  # documents embedded for real in `large`; the others get synthetic vectors


def synthetic_rows(db: Path, docs: list[dict], start: int, seed: int = 3) -> np.ndarray:
    """Appends docs[start:] to the index database with synthetic vectors (a stored real vector plus noise
    of norm 0.5: cosine about 0.9 to it) in one transaction, as kaito-rag writes them; returns every
    vector of the index in chunk-id order."""
    import json
    import sqlite3
    import uuid

    conn = sqlite3.connect(db)
    real = np.vstack([np.frombuffer(b, dtype=np.float32) for (b,) in conn.execute("SELECT vector FROM chunks ORDER BY id")])
    rng = np.random.default_rng(seed)
    out = [real]
    with conn:
        for lo in tqdm(range(start, len(docs), 50_000), desc="synthetic rows", unit="50k"):
            part = docs[lo:lo + 50_000]
            rows = real[rng.integers(0, len(real), len(part))]
            rows = rows + rng.standard_normal(rows.shape).astype(np.float32) * (0.5 / np.sqrt(rows.shape[1]))
            rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
            conn.executemany("INSERT INTO documents(doc_id, text, metadata, hash) VALUES (?, ?, ?, ?)",
                             [(d["doc_id"], d["text"], json.dumps(d["metadata"]), d["doc_id"]) for d in part])
            conn.executemany("INSERT INTO chunks(doc_id, node_id, text, vector) VALUES (?, ?, ?, ?)",
                             [(d["doc_id"], str(uuid.uuid4()), d["text"], r.tobytes()) for d, r in zip(part, rows)])
            out.append(rows)
    conn.close()
    return np.vstack(out)


def large(docs: list[dict], embedded: int, qs: list[str], workdir: Path, backend: str) -> dict:
    from kaito.ragservice.embedding import LocalEmbedding
    from kaito.ragservice.store import VectorIndex
    import faiss

    storage = workdir / "storage"
    rag = Rag(storage, workdir / "kaito-rag.log", backend)
    try:
        client = httpx.Client(base_url=rag.url, timeout=600)
        for lo in tqdm(range(0, embedded, BATCH), desc="indexing (embedded)", unit="batch"):
            client.post("/index", json={"index_name": "bench", "documents": docs[lo:lo + BATCH]}).raise_for_status()
    finally:
        rag.stop()
    t = time.perf_counter()
    vectors = synthetic_rows(storage / "indexes" / "bench" / "index.sqlite", docs, embedded)
    result = {"write_s": time.perf_counter() - t}
    t = time.perf_counter()
    rag = Rag(storage, workdir / "kaito-rag-1m.log", backend, timeout=3600)
    result["open_s"] = time.perf_counter() - t
    try:
        result["rss_gib"] = rag.rss_gib()
        client = httpx.Client(base_url=rag.url, timeout=600)
        topic = docs[0]["metadata"]["topic"]
        for name, extra in (("all", None), ("filtered", {"metadata_filter": {"topic": topic}})):
            lat, wall = asyncio.run(http_latency_run(rag.url, qs, 1, extra))
            result.update({f"{name}_{k}": v for k, v in summary(lat, wall).items()})
        hits = client.post("/retrieve", json={"index_name": "bench", "query": qs[0], "max_node_count": 10,
                                              "metadata_filter": {"topic": topic}}).json()["results"]
        result["filter_ok"] = len(hits) == 10 and all(h["metadata"]["topic"] == topic for h in hits)
    finally:
        rag.stop()
    embedder = LocalEmbedding("all-MiniLM-L6-v2")
    xq = embedder.embed(qs)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    _, exact = faiss.knn(xq, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    result["exact_ms"] = (time.perf_counter() - t) * 1000 / len(qs)
    ivf = VectorIndex(vectors.shape[1], "auto")  # the server's index, built the same way
    ivf.add(np.arange(1, len(vectors) + 1, dtype=np.int64), vectors)
    del vectors
    faiss.omp_set_num_threads(1)
    lat, found = [], []
    for q in xq:
        t = time.perf_counter()
        found.append(ivf.search(q, 10, None)[0])
        lat.append(time.perf_counter() - t)
    result["ivf_ms"] = float(np.median(lat) * 1000)
    result["recall10"] = float(np.mean([len(set(f) & set((e + 1).tolist())) / 10 for f, e in zip(found, exact)]))
    result["nlist"], result["nprobe"] = getattr(ivf.index, "nlist", 0), ivf.nprobe
    result["sweep"] = {}
    for probes in (16, 32, 64, 128, 256) if ivf.approximate else ():  # recall against nprobe
        ivf.nprobe = probes
        result["sweep"][probes] = float(np.mean([len(set(ivf.search(q, 10, None)[0]) & set((e + 1).tolist())) / 10
                                                 for q, e in zip(xq, exact)]))
    return result


def report_large(r: dict, args, out: Path) -> str:
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    per_m = 1_000_000 / args.chunks
    md = [f"# RAG benchmark, {args.chunks:,} chunks ({args.embedded:,} embedded, the rest synthetic vectors), "
          f"{args.queries} queries, {os.cpu_count()} CPUs", "",
          "| | measured |", "|---|---|",
          f"| write the {args.chunks - args.embedded:,} synthetic rows into the index database (s) | {r['write_s']:.0f} |",
          f"| kaito-rag start on the index: IVF train + add, keyword index, metadata index (s) | {r['open_s']:.0f} |",
          f"| kaito-rag RSS after start (GiB; per million chunks) | {r['rss_gib']:.2f}; {r['rss_gib'] * per_m:.2f} |",
          f"| retrieve p50 / p99 at concurrency 1, hybrid (ms) | {r['all_p50_ms']:.1f} / {r['all_p99_ms']:.1f} |",
          f"| the same with a metadata filter (1 topic of 24) (ms) | {r['filtered_p50_ms']:.1f} / "
          f"{r['filtered_p99_ms']:.1f} |",
          f"| filtered results all match the filter | {ok(r['filter_ok'])} |",
          f"| vector search in-process: IVF (nlist {r['nlist']}, nprobe {r['nprobe']}) p50 / exact FAISS mean (ms) | "
          f"{r['ivf_ms']:.2f} / {r['exact_ms']:.1f} |",
          f"| recall@10 of the IVF index against exact search | {r['recall10']:.3f} |",
          "| recall@10 by nprobe | " + ", ".join(f"{p}: {v:.3f}" for p, v in r["sweep"].items()) + " |",
          "", "| target | measured | met |", "|---|---|---|",
          f"| recall@10 >= 0.95 | {r['recall10']:.3f} | {ok(r['recall10'] >= 0.95)} |",
          f"| retrieve p50 <= 20 ms at concurrency 1 | {r['all_p50_ms']:.1f} ms | {ok(r['all_p50_ms'] <= 20)} |",
          f"| retrieve p99 <= 50 ms at concurrency 1 | {r['all_p99_ms']:.1f} ms | {ok(r['all_p99_ms'] <= 50)} |", "",
          "Latency is over HTTP and includes embedding the question (MiniLM on ONNX Runtime) and the keyword "
          "search; the exact FAISS figure is a batched brute-force search on all cores."]
    text = "\n".join(md) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rag-{args.chunks // 1000}k.md" if args.chunks < 1_000_000 else out / "rag-1m.md").write_text(text)
    return text


# --- baseline ----------------------------------------------------------------------------------------------

class Baseline:
    """Plain LlamaIndex: VectorStoreIndex over FaissVectorStore(IndexFlatIP), HuggingFaceEmbedding
    (sentence-transformers, LlamaIndex's defaults), SentenceSplitter as kaito-rag's, `as_retriever()`."""

    def __init__(self) -> None:
        import faiss
        from llama_index.core import Settings, StorageContext, VectorStoreIndex
        from llama_index.core.node_parser import SentenceSplitter
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
        from llama_index.vector_stores.faiss import FaissVectorStore

        from kaito.ragservice.embedding import resolve_local_model

        Settings.llm = None  # no OpenAI fallback
        embed = HuggingFaceEmbedding(model_name=resolve_local_model("all-MiniLM-L6-v2"), device="cpu")
        store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(384))
        self.store = VectorStoreIndex([], storage_context=StorageContext.from_defaults(vector_store=store),
                                      embed_model=embed)
        self.splitter = SentenceSplitter(chunk_size=256, chunk_overlap=32)

    def index(self, docs: list[dict]) -> float:
        from llama_index.core import Document

        t = time.perf_counter()
        batch = [Document(text=d["text"], id_=d["doc_id"], metadata=d["metadata"]) for d in docs]
        self.store.insert_nodes(self.splitter.get_nodes_from_documents(batch))
        return time.perf_counter() - t

    def add_vectors(self, docs: list[dict], vectors: np.ndarray, skip: int) -> None:
        from llama_index.core.schema import TextNode

        rest = [TextNode(text=d["text"], id_=f"n-{d['doc_id']}", metadata=d["metadata"], embedding=vectors[i].tolist())
                for i, d in enumerate(docs) if i >= skip]
        if rest:
            self.store.insert_nodes(rest)
        self.retriever = self.store.as_retriever(similarity_top_k=5)

    def doc_ids(self, q: str) -> list[str]:
        return [n.node.ref_doc_id or n.node.node_id.removeprefix("n-") for n in self.retriever.retrieve(q)]

    def latency(self, qs: list[str], concurrency: int) -> tuple[list[float], float]:
        for q in qs[:5]:
            self.retriever.retrieve(q)  # warm-up
        lat: list[float] = []

        def one(q: str) -> None:
            t = time.perf_counter()
            self.retriever.retrieve(q)
            lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, qs))
        return lat, time.perf_counter() - start


# --- report ------------------------------------------------------------------------------------------------

def report(rag: dict, base: dict, args, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    stem = "rag" if args.embedding_backend == "auto" else f"rag-{args.embedding_backend}"
    keys = ["index_chunks_s", "c1_p50_ms", "c1_p99_ms", "c1_rps", "c8_p50_ms", "c8_p99_ms", "c8_rps", "hit5"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", *keys, "index_chunks_s_subset"])
        w.writerow(["kaito-rag", *[f"{rag[k]:.2f}" for k in keys], f"{rag['index_chunks_s_subset']:.2f}"])
        w.writerow(["baseline", *[f"{base[k]:.2f}" for k in keys], f"{base['index_chunks_s']:.2f}"])
    index_ratio = rag["index_chunks_s_subset"] / base["index_chunks_s"]
    scaling = rag["c8_rps"] / rag["c1_rps"]
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    md = [f"# RAG benchmark ({args.chunks} chunks, {args.queries} queries per concurrency, {os.cpu_count()} CPUs, "
          f"kaito-rag embedding backend {args.embedding_backend})", "",
          "| | kaito-rag | baseline (LlamaIndex + FAISS + sentence-transformers) |", "|---|---|---|",
          f"| indexing, first {args.baseline_chunks} chunks (chunks/s) | {rag['index_chunks_s_subset']:.1f} | "
          f"{base['index_chunks_s']:.1f} |",
          f"| indexing, all {args.chunks} chunks (chunks/s) | {rag['index_chunks_s']:.1f} | - |"]
    for c in (1, 8):
        md += [f"| retrieve p50 / p99 at concurrency {c} (ms) | {rag[f'c{c}_p50_ms']:.1f} / {rag[f'c{c}_p99_ms']:.1f} | "
               f"{base[f'c{c}_p50_ms']:.1f} / {base[f'c{c}_p99_ms']:.1f} |",
               f"| retrieve throughput at concurrency {c} (req/s) | {rag[f'c{c}_rps']:.1f} | {base[f'c{c}_rps']:.1f} |"]
    md += [f"| answering document in the top 5 (answerable questions) | {rag['hit5']:.1%} | {base['hit5']:.1%} |"]
    md += ["", "| target | measured | met |", "|---|---|---|",
           f"| indexing >= 2x baseline | {index_ratio:.2f}x | {ok(index_ratio >= 2)} |",
           f"| retrieve p50 <= 20 ms at concurrency 1 | {rag['c1_p50_ms']:.1f} ms | {ok(rag['c1_p50_ms'] <= 20)} |",
           f"| retrieve p99 <= 50 ms at concurrency 1 | {rag['c1_p99_ms']:.1f} ms | {ok(rag['c1_p99_ms'] <= 50)} |",
           f"| throughput at 8 >= 1.5x at 1 | {scaling:.2f}x | {ok(scaling >= 1.5)} |", "",
           "kaito-rag is measured over HTTP (a real client against the server process, durable writes "
           "included); the baseline in-process, without HTTP or persistence."]
    text = "\n".join(md) + "\n"
    (out / f"{stem}.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        names = ["kaito-rag", "baseline"]
        axes[0].bar(names, [rag["index_chunks_s_subset"], base["index_chunks_s"]], color=["C0", "C7"])
        axes[0].set_title(f"indexing (chunks/s, first {args.baseline_chunks})")
        for i, (name, r) in enumerate(zip(names, (rag, base))):
            axes[1].bar([i * 3, i * 3 + 1], [r["c1_p50_ms"], r["c1_p99_ms"]], color=["C0", "C7"][i], label=name)
            axes[2].bar([i * 3, i * 3 + 1], [r["c1_rps"], r["c8_rps"]], color=["C0", "C7"][i], label=name)
        axes[1].set_xticks([0, 1, 3, 4], ["p50", "p99", "p50", "p99"])
        axes[1].set_title("retrieve latency at concurrency 1 (ms)")
        axes[2].set_xticks([0, 1, 3, 4], ["c=1", "c=8", "c=1", "c=8"])
        axes[2].set_title("retrieve throughput (req/s)")
        for ax in axes[1:]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=100)
    except ImportError:
        pass
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=10_000)
    p.add_argument("--baseline-chunks", type=int, default=2000, help="documents the baseline indexes itself")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--embedding-backend", default="auto", choices=["auto", "onnx", "onnx-int8", "torch"],
                   help="kaito-rag's --embedding-backend (auto: ONNX Runtime, exact vectors)")
    p.add_argument("--embedded", type=int, default=EMBEDDED, help="above this many chunks: documents embedded for "
                   "real, the rest get synthetic vectors")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    docs = corpus(args.chunks)
    qs = queries(docs, args.queries)
    workdir = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    if args.chunks > args.embedded:
        try:
            print(report_large(large(docs, args.embedded, queries(docs[:args.embedded], args.queries), workdir,
                                     args.embedding_backend), args, args.out))
        finally:
            if not os.environ.get("KAITO_BENCH_KEEP"):
                shutil.rmtree(workdir, ignore_errors=True)
        return 0
    try:
        rag, base = bench(docs, qs, args.baseline_chunks, workdir, args.embedding_backend)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(rag, base, args, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
