"""kaito.runtime: the OpenAI-compatible inference server (`kaito-serve`) on vLLM or transformers."""
