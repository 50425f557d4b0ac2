# syntax=docker/dockerfile:1
# voxelgate gateway: FastAPI under uvicorn, plus the one-shot `voxelgate db upgrade` and
# `voxelgate keys ...` commands. Base dependencies only: no torch, no `compute` extra (the
# gateway lists pipelines from the torch-free registry and never runs one).
#
# Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t voxelgate-gateway:local .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY workers ./workers
# A regular (non-editable) install of the base dependencies: the project, without extras.
RUN pip install --upgrade pip && pip install .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VOXELGATE_DATA_DIR=/data \
    VOXELGATE_HOST=0.0.0.0 \
    VOXELGATE_PORT=8000
# The same uid/gid as the worker image: both write the shared blob volume.
RUN groupadd --system --gid 10001 voxelgate \
    && useradd --system --uid 10001 --gid voxelgate --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin voxelgate \
    && mkdir -p /data && chown voxelgate:voxelgate /data
COPY --from=build /opt/venv /opt/venv
USER voxelgate:voxelgate
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VOXELGATE_PORT', '8000'), timeout=4)"]
CMD ["voxelgate", "gateway"]
