"""HTTP schemas of the RAG service: the same names and fields as upstream KAITO's RAGEngine API, so its
clients (and the generated `kaito-rag-client`) work unchanged. These models are the only definition of
the API: FastAPI builds `/openapi.json` from them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Index names become folder names: letters, digits, `.`, `_`, `-`, not starting with a dot.
INDEX_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"


class Document(BaseModel):
    doc_id: str = Field("", description="defaults to the SHA-256 of the text")
    text: str
    metadata: dict[str, Any] | None = Field(default_factory=dict)
    hash_value: str | None = None
    is_truncated: bool = False


class IndexRequest(BaseModel):
    index_name: str = Field(pattern=INDEX_NAME)
    documents: list[Document]


class ListDocumentsResponse(BaseModel):
    documents: list[Document]
    count: int = Field(description="documents in this page")
    total_items: int = Field(description="documents matching the filter")


class UpdateDocumentRequest(BaseModel):
    documents: list[Document]


class UpdateDocumentResponse(BaseModel):
    updated_documents: list[Document]
    unchanged_documents: list[Document]
    not_found_documents: list[Document]


class DeleteDocumentRequest(BaseModel):
    doc_ids: list[str]


class DeleteDocumentResponse(BaseModel):
    deleted_doc_ids: list[str]
    not_found_doc_ids: list[str]


class NodeWithScore(BaseModel):
    doc_id: str
    node_id: str
    text: str
    score: float
    metadata: dict[str, Any] | None = None


class RetrieveRequest(BaseModel):
    index_name: str
    query: str
    max_node_count: int = Field(5, ge=1, le=300)
    metadata_filter: dict[str, Any] | None = None


class RetrieveResponse(BaseModel):
    query: str
    results: list[NodeWithScore]
    count: int


class QueryRequest(BaseModel):
    index_name: str
    query: str
    top_k: int = Field(5, ge=1, le=300)
    llm_params: dict[str, Any] | None = Field(default_factory=dict,
                                              description="sent to the LLM, e.g. temperature, max_tokens, top_p")
    rerank_params: dict[str, Any] | None = Field(default_factory=dict, description="accepted for compatibility")


class QueryResponse(BaseModel):
    response: str
    source_nodes: list[NodeWithScore]
    metadata: dict[str, Any] | None = None


class ChatRequest(BaseModel):
    """An OpenAI chat completion request plus the RAG fields; everything else passes through to the LLM."""

    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]]
    model: str | None = None
    index_name: str | None = None
    context_token_ratio: float = Field(0.5, ge=0.2, le=0.8,
                                       description="share of the free context window that retrieved chunks may fill")
    stream: bool | None = False
    n: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class ChatCompletionResponse(BaseModel):
    """An OpenAI `chat.completion` with the chunks the answer was grounded on."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    source_nodes: list[NodeWithScore] | None = None


class HealthStatus(BaseModel):
    status: str
    detail: str | None = None


class MessageResponse(BaseModel):
    message: str


class ErrorResponse(BaseModel):
    detail: str
