# kaito-serve for NVIDIA GPU nodes: vLLM (CUDA wheels bring their own CUDA runtime; the node's driver
# comes from the NVIDIA container runtime) and the transformers backend.
#   docker build -f Dockerfiles/runtime-gpu.Dockerfile --build-arg PRESET=phi-4-mini-instruct -t kaito-runtime-gpu .
# PRESET's weights are baked in (MODEL_SOURCE=bake, the default; gated models need
# `--secret id=HF_TOKEN`) or fetched at start (MODEL_SOURCE=start, HF_TOKEN in the pod's environment).
#
# One stage, unlike the other images: the CUDA virtualenv is about 10 GB, and copying it out of a build
# stage doubles the disk a build needs (about 60 GB). The sources are bind-mounted for the one install
# step instead, so they leave no layer; the install brings no compilers (wheels only).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/kaito-project/kaito" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.title="kaito-runtime-gpu" \
      org.opencontainers.image.description="kaito-serve: OpenAI-compatible inference on NVIDIA GPUs (vLLM, transformers)"
ENV KAITO_HOME=/opt/kaito-home HF_HOME=/opt/kaito-home/hf
RUN useradd --uid 1000 --create-home kaito
# The install script the tests run (scripts/test.sh -> scripts/setup.sh), from the build context mounted
# read-write (pip builds the wheel in place; what it writes there is dropped with the mount).
RUN --mount=type=bind,target=/src,rw \
    PIP_NO_CACHE_DIR=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt KAITO_VENV=/opt/kaito KAITO_EDITABLE=0 \
    KAITO_DEFAULT_MODEL=0 bash /src/scripts/setup.sh gpu
ARG PRESET=phi-4-mini-instruct
ARG MODEL_SOURCE=bake
RUN --mount=type=secret,id=HF_TOKEN,required=false mkdir -p /opt/kaito-home \
    && if [ "$MODEL_SOURCE" = bake ]; then \
         HF_TOKEN="$(cat /run/secrets/HF_TOKEN 2>/dev/null)" /opt/kaito/bin/kaito-presets download "$PRESET"; fi \
    && chown -R 1000:1000 /opt/kaito-home
ENV PATH=/opt/kaito/bin:$PATH PYTHONUNBUFFERED=1 NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=1800s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["kaito-serve"]
