# kaito-operator: the Workspace / RAGEngine controller (kopf + the kubernetes client) and its webhook.
#   docker build -f Dockerfiles/operator.Dockerfile -t kaito-operator .
# Probes: the operator Deployment (operator/, Helm chart) sets liveness and readiness probes on the
# controller's health endpoint, which Kubernetes checks; Docker's own HEALTHCHECK is not used there.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    KAITO_VENV=/opt/kaito KAITO_EDITABLE=0 KAITO_DEFAULT_MODEL=0
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh operator

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/kaito-project/kaito" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.title="kaito-operator" \
      org.opencontainers.image.description="kaito-operator: Workspace and RAGEngine controller"
RUN useradd --uid 1000 --create-home kaito
COPY --from=build /opt/kaito /opt/kaito
ENV PATH=/opt/kaito/bin:$PATH PYTHONUNBUFFERED=1
USER 1000:1000
HEALTHCHECK NONE
ENTRYPOINT ["kaito-operator"]
CMD ["run"]
