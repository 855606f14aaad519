# syntax=docker/dockerfile:1
# Worker base image: Python 3.11 + Lattice (with torch, CPU wheels by default) for the pods a
# TrainingJob runs, and for the checkpoint service (`lattice checkpoint-service serve`).
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t exabits/lattice-worker:0.1.0 .
# GPU workers: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# Training images start FROM this one, COPY their code into /workspace and keep USER 10001.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=torch,service
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lattice
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lattice ./lattice
RUN /opt/lattice/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" ".[${EXTRAS}]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="lattice-worker" \
      org.opencontainers.image.description="Lattice elastic training worker base image"
COPY --from=build /opt/lattice /opt/lattice
ENV PATH=/opt/lattice/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 lattice \
 && useradd --system --uid 10001 --gid 10001 --home-dir /workspace --create-home \
      --shell /usr/sbin/nologin lattice
WORKDIR /workspace
USER 10001:10001
CMD ["lattice", "--help"]
