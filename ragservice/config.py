"""Settings of `kaito-rag`: command-line flags over the environment a RAGEngine pod gets (upstream names)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_STORAGE_DIR = "/mnt/rag-storage"


class Limits(BaseModel):
    """Request size limits: bad input gets 413/400, never an out-of-memory crash. Each can be changed
    with `KAITO_RAG_<FIELD>` in the environment, e.g. KAITO_RAG_MAX_DOCUMENTS=5000."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_documents: int = 1000
    max_text_chars: int = 2_000_000
    max_doc_ids: int = 10_000


class Settings(BaseModel):
    host: str = "0.0.0.0"
    port: int = 5000
    storage_dir: Path = Path(DEFAULT_STORAGE_DIR)
    api_key: str | None = None
    embedding_source: Literal["local", "remote"] = "local"
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    remote_embedding_url: str | None = None
    remote_embedding_key: str | None = None
    llm_url: str | None = None
    llm_key: str | None = None
    context_window: int | None = Field(None, gt=0)
    chunk_size: int = Field(256, ge=32, description="tokens per chunk (MiniLM reads 256 word pieces)")
    chunk_overlap: int = Field(32, ge=0)
    embed_batch_size: int = Field(64, ge=1)
    embedding_backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.embedding_source == "remote" and not self.remote_embedding_url:
            raise ValueError("remote embeddings need REMOTE_EMBEDDING_URL (--remote-embedding-url)")
        return self

    @property
    def llm_base(self) -> str | None:
        """The LLM server's root URL, whatever form LLM_INFERENCE_URL was given in."""
        if not self.llm_url:
            return None
        url = self.llm_url.rstrip("/")
        for suffix in ("/chat/completions", "/completions", "/v1"):
            if url.endswith(suffix):
                url = url[: -len(suffix)]
        return url.rstrip("/")


def from_env(env: dict[str, str] | None = None) -> dict:
    """Settings fields found in the environment (upstream RAGEngine names)."""
    env = os.environ if env is None else env
    names = {
        "embedding_source": "EMBEDDING_SOURCE_TYPE",
        "embedding_model": "LOCAL_EMBEDDING_MODEL_ID",
        "remote_embedding_url": "REMOTE_EMBEDDING_URL",
        "remote_embedding_key": "REMOTE_EMBEDDING_ACCESS_SECRET",
        "llm_url": "LLM_INFERENCE_URL",
        "llm_key": "LLM_ACCESS_SECRET",
        "context_window": "LLM_CONTEXT_WINDOW",
        "storage_dir": "DEFAULT_VECTOR_DB_PERSIST_DIR",
        "api_key": "KAITO_API_KEY",
        "embedding_backend": "KAITO_RAG_EMBEDDING_BACKEND",
    }
    found = {field: env[var] for field, var in names.items() if env.get(var)}
    limits = {field: env[f"KAITO_RAG_{field.upper()}"] for field in Limits.model_fields
              if env.get(f"KAITO_RAG_{field.upper()}")}
    if limits:
        found["limits"] = limits
    if "embedding_source" in found:
        found["embedding_source"] = found["embedding_source"].lower()
    return found
