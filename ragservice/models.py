"""HTTP schemas of the RAG service: the same names and fields as upstream KAITO's RAGEngine API, so its
clients (and the generated `kaito-rag-client`) work unchanged. These models are the only definition of
the API: FastAPI builds `/openapi.json` from them.

Requests are validated strictly: JSON types are not coerced (`"max_node_count": "5"` or `true` is a
422, as the schema says), and what the schema cannot say is checked too (`content_problem`): text is
valid Unicode without NUL (kaito-serve's rule), free-form JSON (metadata, filters, LLM parameters) holds
finite numbers and nests at most MAX_JSON_DEPTH levels, a document's metadata is at most
MAX_METADATA_BYTES of JSON. Such content is a 400 naming where (`CONTENT_ERROR`); the same rules decide
which stored rows an index serves when it opens (`document_problem`), so whatever is stored can be
listed and retrieved."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from kaito.runtime.protocol import text_problem
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Index names become folder names: letters, digits, `.`, `_`, `-`, not starting with a dot.
INDEX_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"
MAX_JSON_DEPTH = 32  # nesting of free-form JSON: far more than metadata needs, far less than serializers allow
MAX_METADATA_BYTES = 32_768  # a document's metadata as stored JSON; each item becomes one keyword-index term
MAX_QUERY_CHARS = 100_000  # the embedding model reads the first 256 word pieces; BM25 every word
CONTENT_ERROR = "invalid_content"  # the pydantic error type of content_problem: answered 400, not 422


Fault = tuple[str, str]  # where (a dotted path inside the value; "" for the value itself), what is wrong


def json_fault(value: Any, depth: int = 0) -> Fault | None:
    """What makes a JSON value unfit to store or send on, or None: text with a lone surrogate or NUL
    (`text_problem`, keys included), a number that is not finite (NaN and Infinity are not JSON), nesting
    deeper than MAX_JSON_DEPTH. The text itself is never echoed."""
    if isinstance(value, str):
        return ("", problem) if (problem := text_problem(value)) else None
    if isinstance(value, float) and not math.isfinite(value):
        return "", f"{value} is not a JSON number"
    if isinstance(value, (dict, list)):
        if depth >= MAX_JSON_DEPTH:
            return "", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and (problem := text_problem(key)):
                return "", f"a key: {problem}"
            if found := json_fault(item, depth + 1):
                return _path(str(key), found[0]), found[1]
    return None


def metadata_fault(metadata: dict) -> Fault | None:
    if found := json_fault(metadata):
        return found
    if (size := len(json.dumps(metadata))) > MAX_METADATA_BYTES:
        return "", f"{size} bytes of JSON; the limit is {MAX_METADATA_BYTES}"
    return None


def _path(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def problem(fault: Fault | None, where: str = "") -> str | None:
    """A fault as a message: `where.inside: what`."""
    if fault is None:
        return None
    path = _path(where, fault[0])
    return f"{path}: {fault[1]}" if path else fault[1]


def content_problem(value: Any) -> str | None:
    return problem(json_fault(value))


def document_problem(doc_id: str, text: str, metadata: dict) -> str | None:
    """What keeps a document out of an index (a request's or a stored row), or None."""
    return problem(json_fault(doc_id), "doc_id") or problem(json_fault(text), "text") or \
        problem(metadata_fault(metadata), "metadata")


def content_error(fault: Fault) -> PydanticCustomError:
    """A fault as a validation error; the server answers it 400 with the field's place (`where` in ctx)."""
    return PydanticCustomError(CONTENT_ERROR, "{problem}", {"problem": fault[1], "where": fault[0]})


def _checked(check):
    def validate(value):
        if value is not None and (fault := check(value)):
            raise content_error(fault)
        return value

    return AfterValidator(validate)


Text = Annotated[str, _checked(json_fault)]
JSONObject = Annotated[dict[str, Any], _checked(json_fault)]
Metadata = Annotated[dict[str, Any], _checked(metadata_fault)]


class Request(BaseModel):
    model_config = ConfigDict(strict=True)


class Document(Request):
    doc_id: Text = Field("", description="defaults to the SHA-256 of the text")
    text: Text
    metadata: Metadata | None = Field(default_factory=dict, description=f"a JSON object: at most {MAX_JSON_DEPTH} "
                                      f"levels deep, {MAX_METADATA_BYTES} bytes as JSON")
    hash_value: str | None = None
    is_truncated: bool = False


class IndexRequest(Request):
    index_name: str = Field(pattern=INDEX_NAME)
    documents: list[Document]


class ListDocumentsResponse(BaseModel):
    documents: list[Document]
    count: int = Field(description="documents in this page")
    total_items: int = Field(description="documents matching the filter")


class UpdateDocumentRequest(Request):
    documents: list[Document]


class UpdateDocumentResponse(BaseModel):
    updated_documents: list[Document]
    unchanged_documents: list[Document]
    not_found_documents: list[Document]


class DeleteDocumentRequest(Request):
    doc_ids: list[Text]


class DeleteDocumentResponse(BaseModel):
    deleted_doc_ids: list[str]
    not_found_doc_ids: list[str]


class NodeWithScore(BaseModel):
    doc_id: str
    node_id: str
    text: str
    score: float = Field(description="the fused hybrid score in (0, 1] (the LLM's relevance after a rerank)")
    metadata: dict[str, Any] | None = None
    vector_score: float | None = Field(None, description="cosine similarity to the query, when the chunk was "
                                                         "among the vector search's candidates")
    text_score: float | None = Field(None, description="BM25 score, when it was among the keyword candidates")


class RetrieveRequest(Request):
    index_name: Text
    query: Text = Field(max_length=MAX_QUERY_CHARS)
    max_node_count: int = Field(5, ge=1, le=300)
    top_k: int | None = Field(None, ge=1, le=300, description="max_node_count by /query's name for it")
    metadata_filter: JSONObject | None = None

    @model_validator(mode="after")
    def _top_k(self) -> RetrieveRequest:
        if self.top_k is not None:
            if "max_node_count" in self.model_fields_set and self.max_node_count != self.top_k:
                raise ValueError("max_node_count and top_k are one setting: give one of them")
            self.max_node_count = self.top_k
        return self


class RetrieveResponse(BaseModel):
    query: str
    results: list[NodeWithScore]
    count: int


class QueryRequest(Request):
    index_name: Text
    query: Text = Field(max_length=MAX_QUERY_CHARS)
    top_k: int = Field(5, ge=1, le=300)
    llm_params: JSONObject | None = Field(default_factory=dict,
                                          description="sent to the LLM, e.g. temperature, max_tokens, top_p")
    rerank_params: JSONObject | None = Field(
        default_factory=dict, description="LLM rerank of the retrieved nodes (upstream's LLMRerank): top_n (nodes "
                                          "kept, <= top_k), choice_batch_size (nodes per LLM prompt); empty: no rerank")

    @model_validator(mode="after")
    def _check(self) -> QueryRequest:
        params = self.rerank_params or {}
        for key in ("top_n", "choice_batch_size"):
            if key in params and (not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 1):
                raise ValueError(f"Invalid type: '{key}' must be a positive integer.")
        if params.get("top_n", 0) > self.top_k:
            raise ValueError("Invalid configuration: 'top_n' for reranking cannot exceed 'top_k' from the RAG query.")
        unknown = set(params) - {"top_n", "choice_batch_size"}
        if unknown:
            raise ValueError(f"unknown rerank_params {sorted(unknown)}: top_n and choice_batch_size are known")
        return self


class QueryResponse(BaseModel):
    response: str
    source_nodes: list[NodeWithScore]
    metadata: dict[str, Any] | None = None


class ChatRequest(Request):
    """An OpenAI chat completion request plus the RAG fields; everything else passes through to the LLM."""

    model_config = ConfigDict(extra="allow")

    messages: list[JSONObject]
    model: Text | None = None
    index_name: Text | None = None
    context_token_ratio: float = Field(0.5, ge=0.2, le=0.8,
                                       description="share of the free context window that retrieved chunks may fill")
    stream: bool | None = False
    n: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    @model_validator(mode="after")
    def _extra(self) -> ChatRequest:
        if fault := json_fault(self.model_extra):
            raise content_error(fault)
        return self


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
