# syntax=docker/dockerfile:1
# Operator image: Lattice with the [operator] extra (kopf, kubernetes) and the operator/ folder
# (package lattice_operator). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t exabits/lattice-operator:0.1.0 .
# deploy/operator/deployment.yaml runs the same command as CMD below.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lattice
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lattice ./lattice
RUN /opt/lattice/bin/pip install ".[operator]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="lattice-operator" \
      org.opencontainers.image.description="Kubernetes operator for Lattice TrainingJobs"
COPY --from=build /opt/lattice /opt/lattice
COPY operator /app/operator
ENV PATH=/opt/lattice/bin:$PATH \
    PYTHONPATH=/app/operator \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 lattice \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lattice
WORKDIR /app
USER 10001:10001
EXPOSE 8080
CMD ["kopf", "run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "-m", "lattice_operator"]
