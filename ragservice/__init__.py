"""kaito.ragservice: The RAG HTTP service (issue 4)."""
