"""Prometheus metrics: HTTP requests of the API, numbers workers record in Redis, RQ queue depths.

Three sources, one scrape (``GET /metrics``, Staff token):

- **HTTP** (:class:`HTTPMetricsMiddleware`, pure ASGI, streaming untouched):
  ``crowdsam_http_requests_total{method,route,status}`` and
  ``crowdsam_http_request_duration_seconds{method,route}``. ``route`` is the route *template*
  (``/api/v1/volumes/{volume_id}``), never the raw path; a path no route matches is ``unmatched``.
  Several uvicorn processes (``crowdsam serve --workers N``) share counts through prometheus_client's
  multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (``serve`` sets and empties it for N > 1).
- **Workers** (any host): a job's numbers are added in one Redis pipeline to the hash
  :data:`WORKER_KEY` (``HINCRBYFLOAT``; fixed histogram buckets), best effort — a Redis error is
  logged and never fails the job. :class:`JobMetrics` collects them, :class:`RedisCollector` reads
  them back at scrape time.
- **Queues**: ``crowdsam_queue_jobs{queue,state}`` from RQ's lists and registries, read at scrape time.

This module imports no domain package: job kinds, outcomes and model names are plain label values.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from redis import Redis
from redis.exceptions import RedisError
from starlette.routing import Mount, Router, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.routes import flat_routes, route_methods

log = logging.getLogger("crowdsam.metrics")
http_log = logging.getLogger("crowdsam.http")  # DEBUG: one line per request (route template, status, seconds)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_KEY = "crowdsam:metrics:workers"
UNMATCHED = "unmatched"
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"))

HTTP_REQUESTS = Counter("crowdsam_http_requests", "HTTP requests answered, by route template and status",
                        ("method", "route", "status"))
HTTP_DURATION = Histogram("crowdsam_http_request_duration_seconds",
                          "Time from the request's arrival to the end of its response body", ("method", "route"))

# Worker-side metrics kept in Redis: name → (type, help, label names).
WORKER_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "crowdsam_jobs": ("counter", "Job attempts that ended: finished, failed, canceled, retrying (a transient "
                                 "error, RQ retries it) or abandoned (its worker died)", ("kind", "outcome")),
    "crowdsam_job_duration_seconds": ("histogram", "Run time of a job attempt, by kind and outcome",
                                      ("kind", "outcome")),
    "crowdsam_sam_encoder_seconds": ("summary", "SAM image-encoder seconds per encoded slice", ("model",)),
    "crowdsam_sam_decoder_seconds": ("summary", "SAM decoder seconds per decoded slice", ("model",)),
    "crowdsam_sam_cache_lookups": ("counter", "Segmentation cache lookups by cache (slice: decoded slices and "
                                              "prompt masks; embedding: image embeddings) and result",
                                   ("model", "cache", "result")),
}


# --- worker side: record into Redis ----------------------------------------------------------------
def _field(series: str, labels: dict[str, str]) -> str:
    return json.dumps([series, sorted(labels.items())], separators=(",", ":"))


class JobMetrics:
    """One job's numbers, written to Redis in one pipeline by :meth:`flush` (best effort)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)

    def _check(self, name: str, kind: str, labels: dict[str, str]) -> None:
        spec = WORKER_METRICS.get(name)
        if spec is None or spec[0] != kind or set(labels) != set(spec[2]):
            raise ValueError(f"{name}{sorted(labels)} is not a {kind} of WORKER_METRICS")

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._check(name, "counter", labels)
        self.values[_field(name + "_total", labels)] += value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """One observation of a histogram (cumulative fixed buckets, like Prometheus's own)."""
        self._check(name, "histogram", labels)
        for le in JOB_BUCKETS:
            if seconds <= le:
                self.values[_field(name + "_bucket", {**labels, "le": _le(le)})] += 1
        self.values[_field(name + "_sum", labels)] += seconds
        self.values[_field(name + "_count", labels)] += 1

    def summarize(self, name: str, count: int, seconds: float, **labels: str) -> None:
        """``count`` events that took ``seconds`` together (a summary without quantiles: the mean per event)."""
        self._check(name, "summary", labels)
        if count > 0:
            self.values[_field(name + "_count", labels)] += count
            self.values[_field(name + "_sum", labels)] += seconds

    def flush(self, connection: Redis | None = None) -> bool:
        """Add the numbers to :data:`WORKER_KEY`; a Redis error is logged, never raised. True when written."""
        if not self.values:
            return True
        try:
            if connection is None:
                from app.core.redis import get_redis

                connection = get_redis()
            pipe = connection.pipeline(transaction=False)
            for key, value in self.values.items():
                pipe.hincrbyfloat(WORKER_KEY, key, value)
            pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not record job metrics in Redis (%s: %s); they are lost", type(exc).__name__, exc)
            return False
        self.values.clear()
        return True


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


# --- API side: read at scrape time -----------------------------------------------------------------
class RedisCollector:
    """Worker metrics and RQ queue depths, read from Redis when Prometheus scrapes."""

    def __init__(self, connection: Redis, queues: Iterable[str]) -> None:
        self.connection, self.queues = connection, tuple(queues)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("crowdsam_metrics_redis_up", "1 when the scrape could read Redis (worker "
                                                             "metrics and queue depths), else 0")
        try:
            raw = self.connection.hgetall(WORKER_KEY)
            depths = self._queue_depths()
        except (RedisError, OSError) as exc:
            log.warning("metrics scrape could not read Redis: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield depths
        yield from _worker_families(raw)

    def _queue_depths(self) -> GaugeMetricFamily:
        from rq import Queue

        family = GaugeMetricFamily("crowdsam_queue_jobs", "RQ jobs per queue and state", labels=("queue", "state"))
        pipe = self.connection.pipeline(transaction=False)
        for name in self.queues:
            queue = Queue(name, connection=self.connection)
            pipe.llen(queue.key)
            for registry in (queue.started_job_registry, queue.failed_job_registry, queue.scheduled_job_registry):
                pipe.zcard(registry.key)
        counts = iter(pipe.execute())
        for name in self.queues:
            for state in ("queued", "started", "failed", "scheduled"):
                family.add_metric([name, state], float(next(counts)))
        return family


_FAMILIES = {"counter": CounterMetricFamily, "histogram": HistogramMetricFamily, "summary": SummaryMetricFamily}


def _worker_families(raw: dict[Any, Any]) -> Iterator[Metric]:
    """The hash's fields (``[series, [[label, value], ...]]``) as metric families of :data:`WORKER_METRICS`."""
    series: dict[str, dict[tuple[str, ...], dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in raw.items():
        try:
            name, items = json.loads(key)
            labels = {str(k): str(v) for k, v in items}
            number = float(value)
        except (ValueError, TypeError):
            continue
        base, _, part = name.rpartition("_")
        if base not in WORKER_METRICS:
            continue
        le = labels.pop("le", None)
        slot = series[base][tuple(labels[n] for n in WORKER_METRICS[base][2] if n in labels)]
        slot[f"bucket:{le}" if part == "bucket" else part] = number
    for name, (kind, help_text, label_names) in WORKER_METRICS.items():
        family = _FAMILIES[kind](name, help_text, labels=label_names)
        for values, parts in sorted(series.get(name, {}).items()):
            if len(values) != len(label_names):
                continue
            if kind == "counter":
                family.add_metric(list(values), parts.get("total", 0.0))
            elif kind == "summary":
                family.add_metric(list(values), count_value=parts.get("count", 0.0), sum_value=parts.get("sum", 0.0))
            else:
                buckets = [(_le(b), parts.get(f"bucket:{_le(b)}", 0.0)) for b in JOB_BUCKETS]
                family.add_metric(list(values), buckets, sum_value=parts.get("sum", 0.0))
        yield family


class _Sources:
    def __init__(self, *sources: Any) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


def exposition(connection: Redis, queues: Iterable[str]) -> bytes:
    """The whole scrape in Prometheus's text format (see the module docstring)."""
    if os.environ.get(MULTIPROC_ENV):
        local: Any = CollectorRegistry()
        multiprocess.MultiProcessCollector(local)
    else:
        local = REGISTRY
    return generate_latest(_Sources(local, RedisCollector(connection, queues)))


def prepare_multiprocess(workers: int, data_dir: Path) -> None:
    """For ``serve --workers N`` (N > 1): a fresh multiprocess folder, unless ``PROMETHEUS_MULTIPROC_DIR`` is set
    (then it is emptied: counts start at zero with the server, as in one process). Call before the app is imported."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        if workers <= 1:
            return
        folder = str((data_dir / "prometheus").resolve())
        os.environ[MULTIPROC_ENV] = folder
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True, exist_ok=True)


# --- HTTP middleware -------------------------------------------------------------------------------
class RouteTemplates:
    """Method + path → the template of the route that serves it (``unmatched`` when none); rebuilt when routes
    are added (:func:`app.core.routes.flat_routes`)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._table: list[tuple[re.Pattern[str], frozenset[str] | None, str]] = []
        self._built_for = -1

    def _build(self) -> None:
        table: list[tuple[re.Pattern[str], frozenset[str] | None, str]] = []
        for path, route in flat_routes(self.router):
            template = path + "/{path:path}" if isinstance(route, Mount) else path
            table.append((compile_path(template)[0], route_methods(route), template))
        self._table, self._built_for = table, len(self.router.routes)

    def __call__(self, method: str, path: str) -> str:
        if self._built_for != len(self.router.routes):
            self._build()
        fallback = None
        for regex, methods, template in self._table:
            if regex.match(path):
                if methods is None or method in methods or (method == "HEAD" and "GET" in methods):
                    return template
                fallback = fallback or template  # 405: still this route
        return fallback or UNMATCHED


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status (pure ASGI: no buffering);
    logs it at DEBUG on ``crowdsam.http``."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app, self.templates = app, RouteTemplates(router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception with no response sent is what the server answers

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            path, root = scope["path"], scope.get("root_path", "")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = self.templates(method, path[len(root):] if root and path.startswith(root) else path)
            seconds = time.perf_counter() - started
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_DURATION.labels(method, route).observe(seconds)
            http_log.debug("%s %s %d %.3f s", method, route, status, seconds)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
