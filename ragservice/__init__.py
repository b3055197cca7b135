"""kaito.ragservice: `kaito-rag`, the RAG service a RAGEngine deploys (upstream KAITO RAGEngine HTTP API on
LlamaIndex, FAISS and SQLite FTS5). The app is `kaito.ragservice.server.create_app(Settings(...))`."""
