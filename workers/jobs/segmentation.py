"""One segmentation job: prompts from the DB → engine → NIfTI mask → finished row.

Crash safety and idempotency:
- the row's ``mask_key`` is set in the same commit that marks it finished, after the file is
  completely written (atomic ``put_file``); a crash at any point leaves ``mask_key`` null;
- the mask's key is deterministic per row and its bytes depend only on prompts + model +
  options, so a retried job rewrites identical bytes (same sha256).

Failures: data/configuration problems and timeouts fail at once (retrying cannot help);
anything else (I/O, database, Redis, out of memory) is retried by RQ with backoff, and the row
says so. The final failure leaves ``status = failed`` with the reason.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from app.core.db import session_scope
from app.core.errors import CrowdsamError
from app.core.jobs import JobStatus
from app.core.storage import get_storage
from app.datasets.models import Dataset
from app.segmentations.models import Segmentation
from app.segmentations.registry import ModelUnavailable
from app.segmentations.repository import SegmentationRepository
from app.volumes import slices
from app.volumes.models import Volume
from workers.assemble import mask_key, write_mask
from workers.jobs.progress import Canceled, ProgressReporter

log = logging.getLogger("crowdsam.jobs")

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    CrowdsamError, ModelUnavailable, KeyError, ValueError, TypeError, AssertionError, JobTimeoutException,
)


@dataclass
class _Inputs:
    volume: Volume
    window: tuple[float, float]
    label_values: dict[str, int]
    prompts: dict[int, list[Any]]  # canonical slice k → [PromptIn]
    model: str
    fusion: str


def _now() -> datetime:
    return datetime.now(UTC)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


class SegmentationRunner:
    def __init__(self, segmentation_id: int) -> None:
        self.id = segmentation_id
        self.progress = ProgressReporter(segmentation_id)

    # --- the job ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            inputs = self._start()
            if inputs is None:
                return {"segmentation_id": self.id, "status": "skipped"}
            self.progress.check_cancel()
            load_started = time.perf_counter()
            canonical = slices.canonical_array(get_storage(), inputs.volume.canonical_key)
            engine = _engine(inputs.model)
            load_s = time.perf_counter() - load_started
            output = engine.segment(
                canonical,
                window=inputs.window,
                image_id=inputs.volume.sha256,
                prompts=inputs.prompts,
                label_values=inputs.label_values,
                fusion=inputs.fusion,
                progress=self.progress,
            )
            self.progress.check_cancel()
            assemble_started = time.perf_counter()
            key = mask_key(inputs.volume.id, self.id)
            digest = write_mask(get_storage(), inputs.volume, np.asarray(output.labels), key)
            timings = {
                **{k: float(v) for k, v in output.timings.items()},
                "load_s": load_s,
                "assemble_s": time.perf_counter() - assemble_started,
                "job_s": time.perf_counter() - started,
            }
            stats = _jsonable(
                {
                    "prompted_slices": sorted(int(k) for k in output.prompted_slices),
                    "per_slice": {int(k): v for k, v in sorted(output.per_slice.items())},
                    "encoded": int(output.encoded),
                    "decoded": int(output.decoded),
                    "timings": timings,
                    "labels": inputs.label_values,
                }
            )
            self._finish(key, digest, stats, len(inputs.prompts))
            log.info("segmentation %s finished in %.1f s (sha256 %s)", self.id, timings["job_s"], digest[:12])
            return {"segmentation_id": self.id, "status": "finished", "mask_sha256": digest}
        except Canceled:
            self._end(JobStatus.canceled, "canceled while running")
            return {"segmentation_id": self.id, "status": "canceled"}
        except PERMANENT_ERRORS as exc:
            self._end(JobStatus.failed, _reason(exc))
            _no_more_retries()
            raise
        except Exception as exc:
            self._transient_failure(exc)
            raise

    # --- row transitions -------------------------------------------------------------------
    def _start(self) -> _Inputs | None:
        """Lock the row, load everything the engine needs, mark it running; None when there is nothing to do."""
        from workers.sam.engine import PromptIn

        with session_scope() as session:
            repo = SegmentationRepository(session)
            row = repo.get(self.id, for_update=True)
            if row.status in (JobStatus.finished, JobStatus.canceled):
                log.info("segmentation %s is already %s; nothing to do", self.id, row.status)
                return None
            volume = session.get(Volume, row.volume_id)
            dataset = session.get(Dataset, volume.dataset_id) if volume is not None else None
            assert volume is not None and dataset is not None
            labels = list(row.labels) if row.labels is not None else repo.prompted_labels(volume.id)
            grouped: dict[int, list[PromptIn]] = defaultdict(list)
            for p in repo.prompts(volume.id, labels):
                coords = (p.x0, p.y0, p.x1, p.y1) if p.kind == "box" else (p.x0, p.y0)
                grouped[int(p.slice_index)].append(
                    PromptIn(
                        annotator=p.annotator,
                        label=p.label,
                        kind=p.kind,  # type: ignore[arg-type]
                        coords=tuple(float(c) for c in coords),  # type: ignore[arg-type]
                        positive=True if p.positive is None else bool(p.positive),
                    )
                )
            row.status = JobStatus.running
            row.attempts = (row.attempts or 0) + 1
            row.started_at = _now()
            row.finished_at = None
            row.error = None
            row.progress = {"done": 0, "total": len(grouped)}
            session.commit()
            session.expunge(volume)
            return _Inputs(
                volume=volume,
                window=(float(dataset.window_level), float(dataset.window_width)),
                label_values={name: int(dataset.labels[name]) for name in labels},
                prompts=dict(sorted(grouped.items())),
                model=row.model,
                fusion=row.fusion,
            )

    def _finish(self, key: str, digest: str, stats: dict[str, Any], total: int) -> None:
        with session_scope() as session:
            row = SegmentationRepository(session).get(self.id, for_update=True)
            row.mask_key = key
            row.mask_sha256 = digest
            row.stats = stats
            row.status = JobStatus.finished
            row.error = None
            row.progress = {"done": total, "total": total}
            row.finished_at = _now()
            session.commit()

    def _end(self, status: str, error: str | None) -> None:
        with session_scope() as session:
            row = session.get(Segmentation, self.id, with_for_update=True)
            if row is None:
                return
            row.status = status
            row.error = error
            row.finished_at = _now()
            session.commit()

    def _transient_failure(self, exc: Exception) -> None:
        job = get_current_job()
        left = int(job.retries_left or 0) if job is not None else 0
        if left > 0 and job is not None:
            wait = job.get_retry_interval()
            message = f"attempt failed ({_reason(exc)}); retrying in {wait} s ({left} retries left)"
            with session_scope() as session:
                row = session.get(Segmentation, self.id, with_for_update=True)
                if row is not None:
                    row.status = JobStatus.queued
                    row.error = message
                    session.commit()
            log.warning("segmentation %s: %s", self.id, message)
        else:
            self._end(JobStatus.failed, _reason(exc))


def mark_abandoned(segmentation_id: int, *, retrying: bool) -> None:
    """The worker running this job died (SIGKILL, OOM, crash); RQ retries it or gave up."""
    with session_scope() as session:
        row = session.get(Segmentation, segmentation_id, with_for_update=True)
        if row is None or row.status in (JobStatus.finished, JobStatus.canceled):
            return
        if retrying:
            row.status = JobStatus.queued
            row.error = "the worker running this job died; it was handed back for a retry"
        else:
            row.status = JobStatus.failed
            row.error = "the worker running this job died and no retries are left"
            row.finished_at = _now()
        session.commit()


def _engine(model: str) -> Any:
    from workers.sam.engine import get_engine

    return get_engine(model)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, JobTimeoutException):
        return f"timed out: {exc}"
    if isinstance(exc, CrowdsamError):
        return str(exc.detail)
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


def _no_more_retries() -> None:
    """Retrying cannot fix a data or configuration problem: tell RQ not to."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0
