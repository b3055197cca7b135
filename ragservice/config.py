"""Settings of `kaito-rag`: command-line flags over the environment a RAGEngine pod gets (upstream names)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from kaito.presets.contract import PORT, VECTOR_DB_DIR, RAGEnvironment
from pydantic import BaseModel, Field, model_validator

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_STORAGE_DIR = VECTOR_DB_DIR


class Limits(BaseModel):
    """Request size limits: bad input gets 413/400, never an out-of-memory crash. Each can be changed
    with `KAITO_RAG_<FIELD>` in the environment, e.g. KAITO_RAG_MAX_DOCUMENTS=5000."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_documents: int = 1000
    max_text_chars: int = 2_000_000
    max_doc_ids: int = 10_000


class Settings(BaseModel):
    host: str = "0.0.0.0"
    port: int = PORT
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
    embedding_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where a local model runs: cuda (ONNX Runtime's CUDA provider, else torch on CUDA), cpu, "
                            "or auto (cuda when either is available)")
    remote_embedding_protocol: Literal["auto", "openai", "huggingface"] = Field(
        "auto", description="openai: POST {input, model} to /v1/embeddings; huggingface: POST {inputs} (text-embeddings-"
                            "inference's /embed); auto: from the URL's path, else the first shape the service accepts")
    vector_db: Literal["faiss", "qdrant"] = Field("faiss", description="the vector store (upstream's VECTOR_DB_TYPE)")
    vector_db_url: str | None = Field(None, description="a Qdrant server; unset: Qdrant's embedded mode in storage_dir")
    vector_db_key: str | None = None
    vector_index: Literal["auto", "flat", "ivf"] = Field(
        "auto", description="FAISS index of the default store: flat (exact), ivf (approximate: IVF-Flat), or auto "
                            "(ivf from 100,000 chunks in an index)")
    rerank_batch_size: int = Field(5, ge=1, description="nodes per LLM rerank prompt (upstream's default)")
    rerank_top_n: int = Field(3, ge=1, description="nodes kept by an LLM rerank unless the request says (upstream's)")
    guardrails_enabled: bool = False
    guardrails_policy: Path | None = Field(None, description="the guardrails.yaml policy file (hot reloaded)")
    guardrails_fail_open: bool = Field(True, description="a scanner that fails passes the response through unscanned "
                                                         "(false: the request fails with 500)")
    guardrails_hot_reload: bool = True
    guardrails_stream_holdback: int = Field(128, ge=1, le=65536, description="characters of a streamed answer held "
                                            "back unsent, so a match up to this long is caught across chunks")
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.embedding_source == "remote" and not self.remote_embedding_url:
            raise ValueError("remote embeddings need REMOTE_EMBEDDING_URL (--remote-embedding-url)")
        if self.guardrails_enabled and self.guardrails_policy is None:
            raise ValueError("output guardrails need a policy file: OUTPUT_GUARDRAILS_POLICY_PATH (--guardrails-policy)")
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
    """Settings fields found in the environment: the RAGEngine pod's contract (upstream's names, read
    with the same model the operator renders them from), plus the KAITO_RAG_<LIMIT> size limits."""
    env = dict(os.environ if env is None else env)
    found = RAGEnvironment.from_env(env).model_dump(exclude_none=True)
    limits = {field: env[f"KAITO_RAG_{field.upper()}"] for field in Limits.model_fields
              if env.get(f"KAITO_RAG_{field.upper()}")}
    if limits:
        found["limits"] = limits
    return found
