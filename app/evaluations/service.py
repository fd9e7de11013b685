"""Evaluation requests: resolve and validate predictions before a row is queued; compare two evaluations.

Prediction uploads are checked like volume uploads (NIfTI validation, shape and affine equal to the
case's image, integer labels from the chosen value set) and stored in the dataset's label values.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.config import get_settings
from app.core.db import on_rollback
from app.core.errors import Conflict, Invalid, NotFound
from app.core.storage import Storage
from app.datasets.models import Dataset
from app.evaluations.archive import unpack
from app.evaluations.jobs import KIND, EvaluationCase, EvaluationParams
from app.evaluations.models import Evaluation
from app.evaluations.repository import EvaluationRepository
from app.evaluations.schemas import (
    METRIC_KEYS,
    CompareMetric,
    EvaluationFromSegmentation,
    EvaluationFromTraining,
    EvaluationOut,
)
from app.evaluations.statistics import json_safe, paired_wilcoxon
from app.exports.repository import ExportRepository, latest_finished_segmentation
from app.imaging.labelmaps import save_label_map
from app.imaging.nifti import label_dtype, read_header, read_voxels, same_geometry
from app.jobs.states import JobStatus
from app.jobs.submit import stopping
from app.segmentations import registry
from app.trainings.models import Training
from app.trainings.repository import TrainingRepository
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository
from app.volumes.service import check_upload_memory, reference_bytes_per_voxel


def _volumes_with_reference(session: Session, dataset: Dataset) -> list[Volume]:
    volumes = [v for v in VolumeRepository(session).list_for_dataset(dataset.id) if v.has_reference]
    if not volumes:
        raise Invalid(f"dataset {dataset.id} has no case with a reference label map to evaluate against")
    return volumes


def _new_row(
    session: Session, dataset: Dataset, params: EvaluationParams | None, principal: Principal
) -> Evaluation:
    """A queued row (flushed); ``params`` None: filled in by the caller once it knows the row's id."""
    cases = len(params.cases) if params is not None else 0
    row = EvaluationRepository(session).add(
        Evaluation(dataset_id=dataset.id, params=params.model_dump(mode="json") if params is not None else {},
                   status=JobStatus.queued, progress={"done": 0, "total": cases}, attempts=0,
                   created_by=principal.name)
    )
    session.flush()
    return row


def create_from_segmentation(
    session: Session, dataset: Dataset, body: EvaluationFromSegmentation, principal: Principal
) -> Evaluation:
    if body.model not in registry.MODEL_NAMES:
        raise Invalid(f"unknown model {body.model!r} (known: {', '.join(registry.MODEL_NAMES)})")
    cases, missing = [], []
    for volume in _volumes_with_reference(session, dataset):
        seg = latest_finished_segmentation(session, volume.id, body.model)
        if seg is None:
            missing.append(volume.case_id)
        else:
            assert seg.mask_key is not None  # a finished segmentation has its mask
            cases.append(EvaluationCase(case_id=volume.case_id, volume_id=volume.id, segmentation_id=seg.id,
                                        prediction_key=seg.mask_key))
    if not cases:
        raise Invalid(f"no case with a reference has a finished {body.model!r} segmentation: segment first")
    params = EvaluationParams(**body.model_dump(), label_values="dataset", cases=cases, missing_cases=missing)
    return _new_row(session, dataset, params, principal)


def create_from_training(
    session: Session, dataset: Dataset, body: EvaluationFromTraining, principal: Principal
) -> Evaluation:
    """Score a finished training's predictions (label maps in the dataset's values) of cases with a reference."""
    training = TrainingRepository(session).find(body.training)
    if training is None or training.dataset_id != dataset.id:
        raise Invalid(f"training: training {body.training} is not a training of dataset {dataset.id}")
    if training.status != JobStatus.finished:
        raise Conflict(f"training {training.id} is {training.status}: evaluate it once it has finished")
    with_reference = {v.id: v for v in VolumeRepository(session).list_for_dataset(dataset.id) if v.has_reference}
    predicted = (training.result or {}).get("predictions") or []
    cases = [EvaluationCase(case_id=with_reference[int(p["volume_id"])].case_id, volume_id=int(p["volume_id"]),
                            prediction_key=str(p["key"]), prediction_file=f"{p['case_id']}.nii.gz")
             for p in predicted if int(p["volume_id"]) in with_reference]
    if not cases:
        what = "no predictions (its export has no test cases)" if not predicted else \
            f"no prediction of a case with a reference (predicted: {[p['case_id'] for p in predicted][:20]})"
        raise Invalid(f"training {training.id} has {what}: nothing to evaluate")
    test_cases = [c["case_id"] for c in (training.params or {}).get("test_cases", [])]
    scored = {c.case_id for c in cases}
    missing = sorted(c for c in test_cases if c not in scored)
    params = EvaluationParams(source="training", training_id=training.id, label_values="dataset",
                              nsd_tolerance_mm=body.nsd_tolerance_mm, cases=cases, missing_cases=missing)
    return _new_row(session, dataset, params, principal)


def _allowed_values(session: Session, dataset: Dataset, label_values: str) -> dict[int, int]:
    """Value in the uploaded files → dataset value (0 → 0)."""
    if label_values == "dataset":
        return {0: 0, **{int(v): int(v) for v in dataset.labels.values()}}
    match = re.fullmatch(r"export:(\d+)", label_values)
    if match is None:
        raise Invalid(f"label_values {label_values!r}: use 'dataset' or 'export:<export id>'")
    try:
        export = ExportRepository(session).get(int(match.group(1)))
    except NotFound as exc:
        raise Invalid(f"label_values: export {match.group(1)} does not exist") from exc
    if export.dataset_id != dataset.id:
        raise Invalid(f"label_values: export {export.id} belongs to another dataset")
    if export.status != JobStatus.finished or not export.result:
        raise Invalid(f"label_values: export {export.id} is {export.status}, not finished")
    meta = export.result["dataset_json"]
    original = meta["label_values_original"]
    return {0: 0, **{int(v): int(original[name]) for name, v in meta["labels"].items() if name in original}}


def create_from_upload(
    session: Session,
    storage: Storage,
    dataset: Dataset,
    archive: Path,
    *,
    label_values: str,
    nsd_tolerance_mm: float,
    principal: Principal,
) -> Evaluation:
    settings = get_settings()
    if not 0 < nsd_tolerance_mm <= 100:
        raise Invalid(f"nsd_tolerance_mm {nsd_tolerance_mm} must be in (0, 100]")
    value_map = _allowed_values(session, dataset, label_values)
    by_case = {v.case_id: v for v in VolumeRepository(session).list_for_dataset(dataset.id)}
    with tempfile.TemporaryDirectory(prefix="crowdsam-pred-") as tmp:
        unpacked = unpack(archive, Path(tmp), max_bytes=settings.max_upload_bytes)
        unknown = sorted(c for c in unpacked.files if c not in by_case)
        if unknown:
            raise Invalid(f"predictions: files for cases not in dataset {dataset.id}: {unknown[:20]}")
        no_ref = sorted(c for c in unpacked.files if not by_case[c].has_reference)
        if no_ref:
            raise Invalid(f"predictions: cases without a reference cannot be evaluated: {no_ref[:20]}")
        converted = {case: _validated_prediction(path, by_case[case], dataset, value_map, Path(tmp))
                     for case, path in sorted(unpacked.files.items())}
        missing = sorted(v.case_id for v in by_case.values() if v.has_reference and v.case_id not in converted)
        row = _new_row(session, dataset, None, principal)  # its id names the stored predictions
        params = EvaluationParams(
            source="upload", label_values=label_values, nsd_tolerance_mm=nsd_tolerance_mm, missing_cases=missing,
            skipped_files=unpacked.skipped[:100],
            cases=[EvaluationCase(case_id=case, volume_id=by_case[case].id, prediction_file=unpacked.files[case].name,
                                  prediction_key=f"evaluations/{row.id}/predictions/{case}.nii.gz")
                   for case in converted],
        )
        prefix = f"evaluations/{row.id}"
        on_rollback(session, lambda: storage.delete_prefix(prefix))
        for case in params.cases:
            storage.put_file(case.prediction_key, converted[case.case_id])
        row.params = params.model_dump(mode="json")
        row.progress = {"done": 0, "total": len(params.cases)}
        session.flush()
    return row


def _validated_prediction(path: Path, volume: Volume, dataset: Dataset, value_map: dict[int, int],
                          tmp: Path) -> Path:
    """The prediction in the dataset's label values, checked from its header before a voxel is decoded.

    Shape and affine must be the image's, and the file must fit the per-upload memory budget of a volume's
    reference (stored voxels + a label map; ``CROWDSAM_UPLOAD_MEMORY_BYTES``, 413 otherwise); values are then
    checked and mapped chunk by chunk (DESIGN §9 "Upload memory").
    """
    settings = get_settings()
    what = f"prediction {volume.case_id}"
    header = read_header(path, what, max_voxels=settings.max_voxels, max_dim=settings.max_dim)
    if list(header.shape) != list(volume.shape):
        raise Invalid(f"{what}: shape {list(header.shape)} differs from the image's {volume.shape}")
    if not same_geometry(header.affine, volume.affine):
        raise Invalid(f"{what}: affine differs from the image's (predictions must share its geometry)")
    check_upload_memory(header, reference_bytes_per_voxel(header, dataset), settings.upload_memory_bytes)
    voxels = read_voxels(header)  # NaN / infinite values are refused here
    present: set[int] = set()
    bad: set[int] = set()
    for _, chunk in voxels.chunks():
        if voxels.dtype.kind == "f" and not np.all(chunk == np.round(chunk)):
            raise Invalid(f"{what}: label map has non-integer values")
        for value in np.unique(chunk).astype(np.int64).tolist():
            (present if value in value_map else bad).add(value)
        if bad:  # at the first chunk with one: the set stays as small as a chunk
            raise Invalid(f"{what}: values {sorted(bad)[:20]} are not labels (allowed: {sorted(value_map)})")
    mapped = {source: value_map[source] for source in present if value_map[source] != 0}
    out_labels = np.zeros(voxels.shape, dtype=label_dtype(max(mapped.values(), default=0)), order=voxels.order)
    if mapped:
        flat = voxels.flat(out_labels)
        for part, chunk in voxels.chunks():
            block = flat[part]
            for source, target in mapped.items():
                block[chunk == source] = target
    del voxels
    out = tmp / f"{volume.case_id}.dataset.nii.gz"
    save_label_map(out_labels, header.image, out)
    return out


def finished_result(row: Evaluation) -> dict[str, Any]:
    if row.status != JobStatus.finished or row.result is None:
        raise Conflict(f"evaluation {row.id} is {row.status}: results exist once it has finished")
    return row.result


def newest_training_evaluation(session: Session, training: Training) -> Evaluation:
    """The newest finished evaluation of ``training`` (409 naming the training when it has none)."""
    row = TrainingRepository(session).newest_finished_evaluation(training)
    if row is None:
        raise Conflict(f"training {training.id} has no finished evaluation: POST /api/v1/datasets/"
                       f"{training.dataset_id}/evaluations {{\"source\": \"training\", \"training\": {training.id}}} "
                       "and wait for it to finish")
    return row


def compare(session: Session, a: Evaluation, b: Evaluation, metric: CompareMetric,
            trainings: tuple[int, int] | None = None) -> dict[str, Any]:
    """Paired Wilcoxon signed-rank test of ``metric`` per label and pooled, on the cases both evaluated
    (``trainings``: the training ids the two evaluations were resolved from, echoed in the answer)."""
    if a.dataset_id != b.dataset_id:
        raise Invalid(f"evaluations {a.id} and {b.id} belong to different datasets")
    ra, rb = finished_result(a), finished_result(b)
    key = METRIC_KEYS[metric]
    cases_a = {c["case_id"]: c for c in ra["cases"]}
    cases_b = {c["case_id"]: c for c in rb["cases"]}
    common = sorted(set(cases_a) & set(cases_b))
    if not common:
        raise Invalid(f"evaluations {a.id} and {b.id} have no case in common")
    labels = [name for name in ra["labels"] if name in rb["labels"]]
    per_label, pooled_x, pooled_y = {}, [], []
    for name in labels:
        x = [cases_a[c]["metrics"][name].get(key) for c in common]
        y = [cases_b[c]["metrics"][name].get(key) for c in common]
        per_label[name] = paired_wilcoxon(x, y)
        pooled_x += x
        pooled_y += y
    extra: dict[str, Any] = {}
    if key == "HD95":  # a missed or hallucinated organ's HD95 is the penalty (workers/metrics.py): say how often
        extra["hd95_penalized"] = {
            side: sum(1 for c in common for name in labels if cases[c]["metrics"][name].get("HD95_penalized"))
            for side, cases in (("a", cases_a), ("b", cases_b))
        }
    compared: dict[str, Any] = {"evaluations": {"a": a.id, "b": b.id}}
    if trainings is not None:
        compared["trainings"] = {"a": trainings[0], "b": trainings[1]}
    return json_safe({
        "a": a.id, "b": b.id, **compared, "metric": metric, "cases": common,
        "per_label": per_label, "pooled": paired_wilcoxon(pooled_x, pooled_y), **extra,
        "test": "scipy.stats.wilcoxon, paired, two-sided, zero_method='wilcox'; pairs with a NaN side dropped",
        "effect_size": "matched-pairs rank-biserial correlation of a − b (+1: every pair favours a)",
    })


def to_out(row: Evaluation) -> EvaluationOut:
    return EvaluationOut(
        id=row.id, dataset_id=row.dataset_id, status=row.status, params=row.params, progress=row.progress or {},
        error=row.error, attempts=row.attempts,
        cancel_requested=stopping(KIND, row),
        created_by=row.created_by, created_at=row.created_at, started_at=row.started_at,
        finished_at=row.finished_at, result=row.result,
    )
