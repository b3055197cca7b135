# kaito-tune: the LoRA / QLoRA job a tuning Workspace runs (GPU: CUDA torch wheels + bitsandbytes).
#   docker build -f Dockerfiles/tuning.Dockerfile --build-arg PRESET=phi-4-mini-instruct -t kaito-tuning .
# Mounts as the operator renders the Job: /mnt/config/training_config.yaml, /mnt/data, /mnt/results.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    KAITO_VENV=/opt/kaito KAITO_EDITABLE=0 KAITO_HOME=/opt/kaito-home HF_HOME=/opt/kaito-home/hf
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh tune
ARG PRESET=smollm2-135m-instruct
ARG MODEL_SOURCE=bake
RUN --mount=type=secret,id=HF_TOKEN,required=false mkdir -p /opt/kaito-home \
    && if [ "$MODEL_SOURCE" = bake ]; then \
         HF_TOKEN="$(cat /run/secrets/HF_TOKEN 2>/dev/null)" /opt/kaito/bin/kaito-presets download "$PRESET"; fi

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/kaito-project/kaito" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.title="kaito-tuning" \
      org.opencontainers.image.description="kaito-tune: LoRA / QLoRA fine-tuning job"
RUN useradd --uid 1000 --create-home kaito
COPY --from=build /opt/kaito /opt/kaito
COPY --from=build --chown=1000:1000 /opt/kaito-home /opt/kaito-home
ENV PATH=/opt/kaito/bin:$PATH KAITO_HOME=/opt/kaito-home HF_HOME=/opt/kaito-home/hf PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
# A Job, not a server: no health check; progress is on stdout and on the job's /metrics port.
HEALTHCHECK NONE
ENTRYPOINT ["kaito-tune"]
