"""Operations: Prometheus ``/metrics`` (HTTP by route template, jobs and model numbers from workers via Redis,
queue depths) and structured logs with a request id. Real PostgreSQL, Redis and RQ; no SAM model."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.core.logs import ContextFilter, JsonFormatter, configure_logging, valid_request_id
from app.core.metrics import WORKER_KEY, JobMetrics

H = "researcher"


def scrape(client: Any, tokens: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = client.get("/metrics", headers=tokens.headers(H))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_http_metrics_use_route_templates_never_raw_ids(client, tokens, dataset) -> None:  # type: ignore[no-untyped-def]
    route = "/api/v1/datasets/{dataset_id}"
    before = scrape(client, tokens)
    for _ in range(3):
        assert client.get(f"/api/v1/datasets/{dataset['id']}", headers=tokens.headers(H)).status_code == 200
    assert client.get("/api/v1/datasets/987654", headers=tokens.headers(H)).status_code == 404
    assert client.get("/api/v1/datasets/987655").status_code == 401
    assert client.get("/no/such/path/123").status_code == 404
    after = scrape(client, tokens)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("crowdsam_http_requests_total", method="GET", route=route, status="200") == 3
    assert delta("crowdsam_http_requests_total", method="GET", route=route, status="404") == 1
    assert delta("crowdsam_http_requests_total", method="GET", route=route, status="401") == 1
    assert delta("crowdsam_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert delta("crowdsam_http_request_duration_seconds_count", method="GET", route=route) == 5
    assert delta("crowdsam_http_requests_total", method="GET", route="/metrics", status="200") == 1
    routes = {dict(labels).get("route") for (name, labels) in after if name.startswith("crowdsam_http_")}
    assert route in routes
    assert not [r for r in routes if r and re.search(r"/\d+(/|$)", r)], routes  # no id as a path segment
    assert "/api/v1/datasets/987654" not in routes


def test_metrics_need_a_staff_token(client, tokens) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/metrics")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert client.get("/metrics", headers=tokens.headers("annotator")).status_code == 403
    assert client.get("/metrics", headers=tokens.headers("admin")).status_code == 200
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def _export(client: Any, tokens: Any, dataset_id: int) -> int:
    response = client.post(f"/api/v1/datasets/{dataset_id}/exports",
                           json={"dataset_number": 501, "label_source": "reference"}, headers=tokens.headers(H))
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


def test_queue_depth_and_job_outcome_reach_the_scrape(client, tokens, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    export_id = _export(client, tokens, sm_volume["dataset_id"])
    queued = scrape(client, tokens)
    assert value(queued, "crowdsam_metrics_redis_up") == 1
    assert value(queued, "crowdsam_queue_jobs", queue="cpu", state="queued") == 1
    assert value(queued, "crowdsam_queue_jobs", queue="sam", state="queued") == 0
    assert value(queued, "crowdsam_jobs_total", kind="export", outcome="finished") == 0

    assert run_jobs("cpu")
    assert client.get(f"/api/v1/exports/{export_id}", headers=tokens.headers(H)).json()["status"] == "finished"
    done = scrape(client, tokens)
    assert value(done, "crowdsam_queue_jobs", queue="cpu", state="queued") == 0
    assert value(done, "crowdsam_jobs_total", kind="export", outcome="finished") == 1
    labels = {"kind": "export", "outcome": "finished"}
    assert value(done, "crowdsam_job_duration_seconds_count", **labels) == 1
    assert value(done, "crowdsam_job_duration_seconds_sum", **labels) > 0
    assert value(done, "crowdsam_job_duration_seconds_bucket", le="+Inf", **labels) == 1


def test_a_failed_job_is_counted_as_failed(client, tokens, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    """An export whose volume is gone by the time it runs fails permanently (the row says why)."""
    from app.core.db import session_scope
    from app.exports.models import Export

    export_id = _export(client, tokens, sm_volume["dataset_id"])
    with session_scope() as session:
        row = session.get(Export, export_id)
        assert row is not None
        row.params = {"not": "valid parameters"}  # a row an older version wrote: fails validation when run
        session.commit()
    run_jobs("cpu")
    assert client.get(f"/api/v1/exports/{export_id}", headers=tokens.headers(H)).json()["status"] == "failed"
    samples = scrape(client, tokens)
    assert value(samples, "crowdsam_jobs_total", kind="export", outcome="failed") == 1
    assert value(samples, "crowdsam_jobs_total", kind="export", outcome="finished") == 0


def test_segmentation_numbers_become_per_slice_and_cache_metrics(client, tokens) -> None:  # type: ignore[no-untyped-def]
    """What the segment job records from the engine's output (no model needed: the output is given)."""
    from app.core.storage import get_storage
    from app.jobs.kinds import get_kind
    from app.jobs.runner import JobContext
    from workers.jobs.segmentation import _record
    from workers.sam.engine import SegmentationOutput

    output = SegmentationOutput(labels=np.zeros((2, 2, 5), dtype=np.uint8), prompted_slices=[0, 1, 2, 3],
                                per_slice={}, encoded=2, decoded=3,
                                timings={"encoder_s": 1.0, "decoder_s": 0.3}, derived_slices=[4])
    context = JobContext(get_kind("segmentation"), 1, None, get_storage())
    _record(context, "litemedsam", output, total=5)
    assert context.metrics.flush()
    samples = scrape(client, tokens)
    model = {"model": "litemedsam"}
    assert value(samples, "crowdsam_sam_encoder_seconds_count", **model) == 2
    assert value(samples, "crowdsam_sam_encoder_seconds_sum", **model) == pytest.approx(1.0)
    assert value(samples, "crowdsam_sam_decoder_seconds_count", **model) == 3
    assert value(samples, "crowdsam_sam_decoder_seconds_sum", **model) == pytest.approx(0.3)
    lookups = {(c, r): value(samples, "crowdsam_sam_cache_lookups_total", cache=c, result=r, **model)
               for c in ("slice", "embedding") for r in ("hit", "miss")}
    assert lookups == {("slice", "hit"): 2, ("slice", "miss"): 3, ("embedding", "hit"): 1, ("embedding", "miss"): 2}


def test_recording_is_best_effort_when_redis_is_down() -> None:
    metrics = JobMetrics()
    metrics.inc("crowdsam_jobs", kind="export", outcome="finished")
    nowhere = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    assert metrics.flush(nowhere) is False
    with pytest.raises(ValueError):
        metrics.inc("crowdsam_jobs", kind="export")  # a label missing: a programming error, caught early
    from app.core.redis import get_redis

    assert not get_redis().exists(WORKER_KEY)


# --- logs and request ids ------------------------------------------------------------------------
@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Records of the ``crowdsam`` loggers as JSON lines, as ``CROWDSAM_LOG_FORMAT=json`` writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("crowdsam")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # crowdsam.http logs every request at DEBUG
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_log_lines_carry_the_request_id_of_the_response(client, tokens, json_lines) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/datasets/987654", headers=tokens.headers(H))
    assert response.status_code == 404, response.text
    rid = response.headers["x-request-id"]
    assert valid_request_id(rid)
    lines = [line for line in _lines(json_lines) if line.get("request_id") == rid]
    assert len(lines) == 1, _lines(json_lines)
    line = lines[0]
    assert {"time", "level", "logger", "message"} <= line.keys() and line["logger"] == "crowdsam.http"
    assert line["message"].startswith("GET /api/v1/datasets/{dataset_id} 404 ")
    assert tokens.researcher not in json_lines.getvalue()

    mine = client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.42:abc"})
    assert mine.headers["x-request-id"] == "lb-7f3a.42:abc"
    another = client.get("/healthz")
    assert valid_request_id(another.headers["x-request-id"]) and another.headers["x-request-id"] != rid


@pytest.mark.parametrize("incoming", ["has space", "x" * 129, "<script>", "", "-starts-with-dash", "tok\u00e9n"])
def test_an_invalid_incoming_request_id_is_replaced(client, incoming) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/healthz", headers={"X-Request-ID": incoming.encode()})  # bytes: any octets
    rid = response.headers["x-request-id"]
    assert rid != incoming and valid_request_id(rid) and len(rid) == 32


def test_job_log_lines_carry_the_job_id(client, tokens, sm_volume, run_jobs, json_lines) -> None:  # type: ignore[no-untyped-def]
    export_id = _export(client, tokens, sm_volume["dataset_id"])
    assert run_jobs("cpu")
    jobs = [line for line in _lines(json_lines) if line.get("job_id") == f"export-{export_id}"]
    assert jobs and all(line["kind"] == "export" for line in jobs)
    assert any("finished" in line["message"] for line in jobs)


def test_configure_logging_writes_json_or_text_to_stderr(capsys) -> None:  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json")
        logging.getLogger("crowdsam.test").warning("hello %s", "json")
        configure_logging("text")
        logging.getLogger("crowdsam.test").warning("hello %s", "text")
        with pytest.raises(ValueError):
            configure_logging("yaml")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    first, second = capsys.readouterr().err.splitlines()[-2:]
    assert json.loads(first)["message"] == "hello json" and json.loads(first)["level"] == "WARNING"
    assert second.endswith("crowdsam.test WARNING hello text")


@pytest.mark.model
def test_a_real_segmentation_records_encoder_decoder_and_cache_metrics(client, tokens, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    """LiteMedSAM on two slices, twice: the second run's slices all come from the cache."""
    from tests.conftest import CT_DIR
    from tests.segmentation_helpers import ORGANS, canonical_reference, post_boxes, reference_boxes

    vid = sm_volume["id"]
    reference = canonical_reference(CT_DIR / "example_seg.nii.gz")
    boxes = reference_boxes(reference, {"liver": ORGANS["liver"]}, [8, 9])
    for box in boxes:  # prompts no other test posts: decoder outputs are cached per prompt across the session
        box["box"][0] += 0.53
    post_boxes(client, tokens.headers("annotator"), vid, boxes)
    stats = []
    for _ in range(2):
        created = client.post(f"/api/v1/volumes/{vid}/segmentations", json={}, headers=tokens.headers(H))
        assert created.status_code == 202, created.text
        assert run_jobs("sam")
        row = client.get(f"/api/v1/segmentations/{created.json()['id']}", headers=tokens.headers(H)).json()
        assert row["status"] == "finished", row
        stats.append(row["stats"])
    samples = scrape(client, tokens)
    model = {"model": "litemedsam"}
    assert stats[0]["decoded"] == 2 and stats[1]["decoded"] == 0
    assert value(samples, "crowdsam_sam_encoder_seconds_count", **model) == stats[0]["encoded"] + stats[1]["encoded"]
    assert value(samples, "crowdsam_sam_decoder_seconds_count", **model) == 2
    assert value(samples, "crowdsam_sam_decoder_seconds_sum", **model) == pytest.approx(
        stats[0]["timings"]["decoder_s"] + stats[1]["timings"]["decoder_s"])
    assert value(samples, "crowdsam_sam_cache_lookups_total", cache="slice", result="miss", **model) == 2
    assert value(samples, "crowdsam_sam_cache_lookups_total", cache="slice", result="hit", **model) == 2
    assert value(samples, "crowdsam_jobs_total", kind="segmentation", outcome="finished") == 2
