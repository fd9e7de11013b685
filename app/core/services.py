"""Where PostgreSQL and Redis live: configured URLs, or embedded servers started on demand."""

from __future__ import annotations

from functools import lru_cache

from app.core.config import get_settings
from app.core.embedded import embedded_postgres_url, embedded_redis_url


def normalise_database_url(url: str) -> str:
    """Use the psycopg 3 driver whatever scheme the operator wrote."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@lru_cache
def database_url() -> str:
    settings = get_settings()
    if settings.database_url:
        return normalise_database_url(settings.database_url)
    return embedded_postgres_url(settings.data_dir)


@lru_cache
def redis_url() -> str:
    settings = get_settings()
    if settings.redis_url:
        return settings.redis_url
    return embedded_redis_url(settings.data_dir)
