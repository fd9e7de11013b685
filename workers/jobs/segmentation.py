"""One segmentation job: prompts from the DB → engine → NIfTI mask (the lifecycle is :mod:`app.jobs.runner`).

Crash safety and idempotency:
- the row's ``mask_key`` is set in the same commit that marks it finished, after the file is
  completely written (atomic ``put_file``); a crash at any point leaves ``mask_key`` null;
- the mask's key is deterministic per row and its bytes depend only on prompts + model +
  options, so a retried job rewrites identical bytes (same sha256).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.db import session_scope
from app.crowd import service as crowd
from app.datasets.models import Dataset
from app.jobs.runner import JobContext, params_model
from app.prompts.repository import PromptRepository
from app.segmentations.jobs import SegmentationParams
from app.segmentations.models import Segmentation
from app.segmentations.repository import SegmentationRepository
from app.volumes import slices
from app.volumes.models import Volume
from workers.assemble import mask_key, write_mask

log = logging.getLogger("crowdsam.jobs")


@dataclass
class _Inputs:
    volume: Volume
    window: tuple[float, float]
    label_values: dict[str, int]
    prompts: dict[int, list[Any]]  # canonical slice k → [PromptIn]
    views: dict[int, set[str]]  # canonical slice k → annotators who saw it (their silence votes "absent")
    reliability: dict[str, tuple[float, float]] | None  # annotator → (sensitivity, specificity), weighted only


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


def segment(context: JobContext) -> dict[str, Any]:
    """Run the engine over the volume's prompts, store the mask; returns the row's result columns."""
    params: SegmentationParams = params_model(context, SegmentationParams)
    started = time.perf_counter()
    inputs = _load_inputs(context.row_id, params)
    context.progress(0, len(inputs.prompts))
    load_started = time.perf_counter()
    canonical = slices.canonical_array(context.storage, inputs.volume.canonical_key)
    engine = _engine(params.model)
    load_s = time.perf_counter() - load_started
    output = engine.segment(
        canonical,
        window=inputs.window,
        image_id=inputs.volume.sha256,
        prompts=inputs.prompts,
        label_values=inputs.label_values,
        fusion=params.fusion,
        views=inputs.views,
        reliability=inputs.reliability,
        fill_gaps=params.fill_gaps,
        progress=context.progress,
    )
    context.check_cancel()
    assemble_started = time.perf_counter()
    key = mask_key(inputs.volume.id, context.row_id)
    digest = write_mask(context.storage, inputs.volume, np.asarray(output.labels), key)
    timings = {
        **{k: float(v) for k, v in output.timings.items()},
        "load_s": load_s,
        "assemble_s": time.perf_counter() - assemble_started,
        "job_s": time.perf_counter() - started,
    }
    stats = _jsonable(
        {
            "prompted_slices": sorted(int(k) for k in output.prompted_slices),
            "derived_slices": sorted(int(k) for k in output.derived_slices),
            "per_slice": {int(k): v for k, v in sorted(output.per_slice.items())},
            "encoded": int(output.encoded),
            "decoded": int(output.decoded),
            "timings": timings,
            "labels": inputs.label_values,
        }
    )
    total = len(output.prompted_slices) + len(output.derived_slices)
    _record(context, params.model, output, total=total)
    log.info("segmentation %s: mask sha256 %s", context.row_id, digest[:12])
    return {"mask_key": key, "mask_sha256": digest, "stats": stats, "progress": {"done": total, "total": total}}


def _record(context: JobContext, model: str, output: Any, total: int) -> None:
    """Encoder/decoder seconds per slice and cache use, flushed with the job's outcome (app.core.metrics).

    Slice cache: a planned slice whose masks came from the decoded-slice or prompt cache is a hit, one the
    decoder ran for a miss. Embedding cache: a decoded slice needed an embedding; the encoder runs (misses)
    are counted by the engine, the rest were hits.
    """
    timings, encoded, decoded = output.timings, int(output.encoded), int(output.decoded)
    metrics = context.metrics
    metrics.summarize("crowdsam_sam_encoder_seconds", encoded, float(timings.get("encoder_s", 0.0)), model=model)
    metrics.summarize("crowdsam_sam_decoder_seconds", decoded, float(timings.get("decoder_s", 0.0)), model=model)
    lookups = {("slice", "hit"): max(0, total - decoded), ("slice", "miss"): decoded,
               ("embedding", "hit"): max(0, decoded - encoded), ("embedding", "miss"): encoded}
    for (cache, result), count in lookups.items():
        if count:
            metrics.inc("crowdsam_sam_cache_lookups", count, model=model, cache=cache, result=result)


def prompts_by_slice(repo: SegmentationRepository, volume_id: int, labels: list[str]) -> dict[int, list[Any]]:
    """The volume's prompts for ``labels`` as engine inputs (``PromptIn``), by canonical slice."""
    from workers.sam.engine import PromptIn

    grouped: dict[int, list[PromptIn]] = defaultdict(list)
    for p in repo.prompts(volume_id, labels):
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
    return dict(grouped)


def _load_inputs(segmentation_id: int, params: SegmentationParams) -> _Inputs:
    """Everything the engine needs: the volume, the window, label values and the prompts by slice."""
    with session_scope() as session:
        repo = SegmentationRepository(session)
        row = session.get(Segmentation, segmentation_id)
        if row is None:
            raise LookupError(f"segmentation {segmentation_id} was deleted")
        volume = session.get(Volume, row.volume_id)
        dataset = session.get(Dataset, volume.dataset_id) if volume is not None else None
        if volume is None or dataset is None:
            raise LookupError(f"segmentation {segmentation_id}: its volume was deleted")
        labels = list(params.labels) if params.labels is not None else repo.prompted_labels(volume.id)
        grouped = prompts_by_slice(repo, volume.id, labels)
        views: dict[int, set[str]] = defaultdict(set)
        for annotator, k in PromptRepository(session).views(volume.id):
            views[int(k)].add(annotator)
        reliability = crowd.fusion_weights(session, dataset) if params.fusion == "weighted" else None
        session.expunge(volume)
        return _Inputs(
            volume=volume,
            window=(float(dataset.window_level), float(dataset.window_width)),
            label_values={name: int(dataset.labels[name]) for name in labels},
            prompts=dict(sorted(grouped.items())),
            views=dict(views),
            reliability=reliability,
        )


def _engine(model: str) -> Any:
    from workers.sam.engine import get_engine

    return get_engine(model)
