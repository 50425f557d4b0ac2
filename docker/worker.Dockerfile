# syntax=docker/dockerfile:1
# voxelgate worker: Celery worker running pipelines, with torch built for CUDA and the
# `compute` extra. The same image serves the GPU queue (with a GPU reserved by compose) and the
# CPU queue (no GPU: torch falls back to the CPU).
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t voxelgate-worker:local .
#
# torch 2.13.0's Linux wheel on PyPI is built for CUDA 13.0 and brings its own CUDA libraries
# (cuBLAS, cuDNN, NCCL ... as pip packages), so the base only needs the small CUDA `base`
# flavour (cudart + the NVIDIA container runtime settings); the host needs an NVIDIA driver that
# supports CUDA 13.0 (>= 580) and the NVIDIA Container Toolkit. For an older driver, build
# against a CUDA 12 wheel index and a matching base, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu22.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04

FROM ${CUDA_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
# Python 3.11 (the project's only supported version) from the deadsnakes PPA; Ubuntu 22.04
# ships 3.10.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove gnupg software-properties-common \
    && rm -rf /var/lib/apt/lists/*

FROM python AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip
# torch first and pinned (the same version .ci/run tests with), so that the `compute` extra
# never pulls another build.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY workers ./workers
RUN pip install ".[compute]" \
    && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')"

FROM python
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VOXELGATE_DATA_DIR=/data
# The same uid/gid as the gateway image: both write the shared blob volume.
RUN groupadd --system --gid 10001 voxelgate \
    && useradd --system --uid 10001 --gid voxelgate --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin voxelgate \
    && mkdir -p /data && chown voxelgate:voxelgate /data
COPY --from=build /opt/venv /opt/venv
USER voxelgate:voxelgate
WORKDIR /data
VOLUME ["/data"]
CMD ["voxelgate", "worker", "--queues", "gpu"]
