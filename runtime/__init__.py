"""kaito.runtime: The OpenAI-compatible inference server (issue 3)."""
