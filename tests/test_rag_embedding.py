"""kaito-rag's local embedding backends against sentence-transformers on the packaged all-MiniLM-L6-v2:
the default ONNX Runtime graph gives the same vectors; the opt-in int8 graph stays within its tolerance and
keeps the planted facts first."""

import numpy as np
import pytest
from test_ragservice import FACTS, FILLER

TEXTS = ["hello", "The capital of France is Paris.", "def add(a, b):\n    return a + b",
         "Grüße aus Köln, 東京 and Zürich 🎉", "   spaced    out   ",
         "A text longer than the model reads, so it is truncated the same way on every backend. " * 40,
         *FILLER[:10]]


@pytest.fixture(scope="module")
def onnx():
    from kaito.ragservice.embedding import LocalEmbedding

    return LocalEmbedding("all-MiniLM-L6-v2", backend="auto")


def reference(embedder, texts):
    """sentence-transformers itself (PyTorch), one text at a time: no batch or padding effects."""
    return np.vstack([embedder.model.encode([t], normalize_embeddings=True) for t in texts])


def test_onnx_backend_gives_the_sentence_transformers_vectors(onnx):
    assert onnx.backend == "onnx" and onnx.dim == 384
    vectors = onnx.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = (vectors * reference(onnx, TEXTS)).sum(axis=1)
    assert cos.min() >= 0.9999, cos
    # the same text gives the same vector in any batch
    np.testing.assert_allclose(onnx.embed(TEXTS[1:2])[0], vectors[1], atol=1e-5)


def test_int8_backend_stays_within_tolerance_and_ranks_planted_facts_first(onnx):
    from kaito.ragservice.embedding import LocalEmbedding

    int8 = LocalEmbedding("all-MiniLM-L6-v2", backend="onnx-int8")
    assert int8.backend == "onnx-int8"
    cos = (int8.embed(TEXTS) * onnx.embed(TEXTS)).sum(axis=1)
    assert cos.min() >= 0.97, cos
    docs = [text for text, _ in FACTS.values()] + FILLER
    doc_vectors = int8.embed(docs)
    for i, (_, question) in enumerate(FACTS.values()):
        assert int(np.argmax(doc_vectors @ int8.embed([question])[0])) == i, question


def test_unknown_backend_is_refused():
    from kaito.ragservice.config import Settings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="onnx-int8"):
        Settings(embedding_backend="fast")


def test_device_placement_prefers_onnx_cuda_then_torch_cuda():
    """Where a local model runs, given what the machine has (the choice itself: that it then runs on a GPU
    is not tested here, there is none)."""
    from kaito.ragservice.embedding import EmbeddingError, placement

    cpu, cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    both_gpu = ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert placement("cuda", "auto", cuda, True).onnx_providers == both_gpu
    assert placement("cuda", "onnx", cuda, False) == placement("cuda", "auto", cuda, False)
    assert placement("cuda", "auto", cpu, True) == placement("cuda", "torch", cuda, True)  # torch on CUDA
    assert placement("cuda", "auto", cpu, True).onnx_providers is None
    assert placement("cuda", "auto", cpu, True).torch_device == "cuda"
    assert placement("auto", "auto", cuda, False).onnx_providers == both_gpu
    assert placement("auto", "auto", cpu, False).onnx_providers == ("CPUExecutionProvider",)  # this machine
    assert placement("auto", "onnx-int8", cuda, False).onnx_providers == ("CPUExecutionProvider",)
    assert placement("cpu", "torch", cuda, True).torch_device == "cpu"
    for args, message in ((("cuda", "onnx", cpu, True), "onnxruntime-gpu"), (("cuda", "auto", cpu, False), "neither"),
                          (("cuda", "onnx-int8", cuda, True), "CPU only")):
        with pytest.raises(EmbeddingError, match=message):
            placement(*args)
