# kaito-rag: the RAGEngine HTTP service (LlamaIndex + FAISS, local all-MiniLM-L6-v2 embeddings).
#   docker build -f Dockerfiles/ragservice.Dockerfile -t kaito-ragservice .
# Configured by environment as a RAGEngine pod gets it (LLM_INFERENCE_URL, EMBEDDING_SOURCE_TYPE, ...);
# the index storage (DEFAULT_VECTOR_DB_PERSIST_DIR, /var/lib/kaito-rag) belongs on a volume.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    KAITO_VENV=/opt/kaito KAITO_EDITABLE=0 KAITO_DEFAULT_MODEL=0
# CPU torch from PyTorch's CPU index, or from a folder of wheels (PIP_FIND_LINKS, mounted by the build)
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh rag

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/kaito-project/kaito" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.title="kaito-ragservice" \
      org.opencontainers.image.description="kaito-rag: RAGEngine HTTP API on LlamaIndex + FAISS"
RUN useradd --uid 1000 --create-home kaito && install -d -o kaito -g kaito /var/lib/kaito-rag
COPY --from=build /opt/kaito /opt/kaito
ENV PATH=/opt/kaito/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DEFAULT_VECTOR_DB_PERSIST_DIR=/var/lib/kaito-rag
USER 1000:1000
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["kaito-rag"]
