"""kaito.ragservice: `kaito-rag`, the RAG service a RAGEngine deploys (upstream KAITO RAGEngine HTTP API on
LlamaIndex, FAISS, tantivy and SQLite). The app is `kaito.ragservice.server.create_app(Settings(...))`."""
