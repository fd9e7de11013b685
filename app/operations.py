"""``GET /metrics``: Prometheus's text format for monitoring (Staff token; not in the OpenAPI schema).

Scrape config: ``authorization: {type: Bearer, credentials_file: /etc/prometheus/crowdsam.token}`` with a
researcher token (``crowdsam token create --name prometheus --role researcher``). See :mod:`app.core.metrics`.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.auth.security import Staff
from app.core.metrics import exposition
from app.core.redis import QUEUE_NAMES, get_redis

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
def metrics(_: Staff) -> Response:
    """HTTP, job, model, cache and queue metrics of the whole deployment (every API process and worker)."""
    return Response(exposition(get_redis(), QUEUE_NAMES), media_type=CONTENT_TYPE_LATEST)
