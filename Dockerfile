# syntax=docker/dockerfile:1.7
# crowdsam images. One Dockerfile, three targets:
#   api         FastAPI service, no torch (small, starts fast)     docker build --target api -t crowdsam-api .
#   worker      RQ worker with torch/torchvision CPU wheels         docker build --target worker -t crowdsam-worker .
#   worker-gpu  RQ worker with the CUDA-enabled torch wheels        docker build --target worker-gpu -t crowdsam-worker-gpu .
# The source lives in /app (editable install: migrations/ and alembic.ini are found next to app/).
# Everything runs as the unprivileged user `crowdsam`; artefacts go to /data, SAM weights to /checkpoints.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CROWDSAM_DATA_DIR=/data \
    CROWDSAM_CHECKPOINT_DIR=/checkpoints
RUN groupadd --system --gid 10001 crowdsam \
 && useradd --system --uid 10001 --gid crowdsam --home-dir /app --shell /usr/sbin/nologin crowdsam \
 && mkdir -p /app /data /checkpoints \
 && chown crowdsam:crowdsam /data /checkpoints \
 && python -m venv /opt/venv
WORKDIR /app

# ---------------------------------------------------------------------------------------------
FROM base AS source
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations

# ---------------------------------------------------------------------------------------------
FROM source AS api
RUN pip install -e . && python -c "import app.main" && ! python -c "import torch" 2>/dev/null
USER crowdsam
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["crowdsam", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]

# ---------------------------------------------------------------------------------------------
FROM source AS worker
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install -e '.[worker]' \
 && python -c "import torch, torchvision, segment_anything, workers.run; print('torch', torch.__version__)"
USER crowdsam
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "from app.core.redis import get_redis; get_redis().ping()"
CMD ["crowdsam", "worker", "--queue", "sam", "--queue", "cpu"]

# ---------------------------------------------------------------------------------------------
FROM source AS worker-gpu
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
# PyPI's Linux torch wheels bundle the CUDA runtime; the host needs the NVIDIA driver and
# the NVIDIA container toolkit (compose profile `gpu` reserves the device).
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install -e '.[worker]' \
 && python -c "import torch, torchvision, segment_anything, workers.run; print('torch', torch.__version__)"
USER crowdsam
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "from app.core.redis import get_redis; get_redis().ping()"
CMD ["crowdsam", "worker", "--queue", "sam"]
