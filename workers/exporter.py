"""Export handler: gather the cases of an export, write the nnU-Net folder and archive, store both.

Idempotent: a retry deletes whatever an earlier attempt left under ``exports/{id}/`` and starts over.
The row's ``result`` (file list, checksums, dataset.json) and ``archive_key`` are set (by
:mod:`app.jobs.runner`) only after every file is in the store.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.db import session_scope
from app.core.labelmaps import load_label_map
from app.core.storage import Storage, sha256_file
from app.exports.jobs import ExportCase, ExportParams
from app.jobs.runner import JobContext, params_model, row_and_dataset
from app.prompts.models import SliceView
from app.segmentations.models import Segmentation
from app.volumes.models import Volume
from workers.nnunet import CaseInput, known_slice_set, make_archive, manifest, write_dataset


def export(context: JobContext) -> dict[str, Any]:
    """Write the nnU-Net folder and archive, store both; returns the row's result columns."""
    params: ExportParams = params_model(context, ExportParams)
    storage = context.storage
    with session_scope() as session:
        _, dataset = row_and_dataset(session, context)
        dataset_id, dataset_name, labels = dataset.id, dataset.name, dict(dataset.labels)
        plans = [_case_plan(session, case, params.unprompted, params.derived) for case in params.cases]
    prefix = f"exports/{context.row_id}"
    storage.delete_prefix(prefix)
    try:
        with tempfile.TemporaryDirectory(prefix="crowdsam-export-") as tmp:
            root = Path(tmp) / "out"
            root.mkdir()
            cases = [_load_case(storage, plan, Path(tmp)) for plan in plans]
            source = f"{params.label_source}{'/' + params.model if params.model else ''}"
            folder = write_dataset(
                root,
                number=params.dataset_number,
                name=params.dataset_name,
                dataset_labels=labels,
                cases=cases,
                unprompted=params.unprompted,
                description=f"crowdsam export {context.row_id} of dataset {dataset_name!r} (labels: {source})",
                extra={"export_id": context.row_id, "dataset_id": dataset_id,
                       "label_source": params.label_source, "model": params.model},
                progress=context.progress,
            )
            files = manifest(folder)
            archive = Path(tmp) / f"{folder.name}.tar.gz"
            make_archive(folder, archive)
            context.check_cancel()
            for row in files:
                storage.put_file(f"{prefix}/{row['path']}", root / row["path"])
            archive_key = f"{prefix}/{archive.name}"
            storage.put_file(archive_key, archive)
            result = {
                "folder": folder.name,
                "files": files,
                "archive": {"path": archive.name, "size": archive.stat().st_size, "sha256": sha256_file(archive)},
                "dataset_json": json.loads((folder / "dataset.json").read_text()),
            }
    except BaseException:
        storage.delete_prefix(prefix)  # a failed or canceled attempt leaves no file behind
        raise
    return {"result": result, "archive_key": archive_key}


def _case_plan(session: Any, case: ExportCase, unprompted: str, derived: str) -> dict[str, Any]:
    volume = session.get(Volume, case.volume_id)
    if volume is None:
        raise LookupError(f"volume {case.volume_id} ({case.case_id}) was deleted")
    plan: dict[str, Any] = {**case.model_dump(), "image_key": volume.image_key, "reference_key": volume.reference_key}
    if case.segmentation_id is not None:
        seg = session.get(Segmentation, case.segmentation_id)
        if seg is None or seg.mask_key is None:
            raise LookupError(f"segmentation {case.segmentation_id} of case {case.case_id} is gone")
        plan["mask_key"] = seg.mask_key
        plan["known_slices"] = (known_slices(session, seg, with_derived=derived == "known")
                                if unprompted == "ignore" else None)
    return plan


def _load_case(storage: Storage, plan: dict[str, Any], tmp: Path) -> CaseInput:
    suffix = ".nii.gz" if plan["image_key"].endswith(".gz") else ".nii"
    image_path = tmp / f"{plan['case_id']}_image{suffix}"
    image_path.write_bytes(storage.read_bytes(plan["image_key"]))
    label_key = plan.get("mask_key") or plan.get("reference_key")
    labels = None if label_key is None else load_label_map(storage, label_key)
    provenance: dict[str, Any] = {"volume_id": plan["volume_id"]}
    if plan.get("segmentation_id") is not None:
        provenance["segmentation_id"] = plan["segmentation_id"]
    return CaseInput(plan["case_id"], plan["split"], image_path, labels, plan.get("known_slices"), provenance)


def known_slices(session: Any, seg: Segmentation, *, with_derived: bool = False) -> list[int]:
    """Canonical slices the crowd has labelled for this segmentation: its prompted slices plus slices seen
    without a box (seen-but-empty = "none of these organs here") up to the time the job started, and,
    ``with_derived``, its gap-filled slices (``fill_gaps``).

    The one definition of "known": an ``ignore`` export keeps these slices and the evaluation's
    ``Dice_known_slices`` scores them (workers/evaluator.py)."""
    prompted = list((seg.stats or {}).get("prompted_slices", []))
    if with_derived:
        prompted += (seg.stats or {}).get("derived_slices", [])
    query = select(SliceView.slice_index).where(SliceView.volume_id == seg.volume_id)
    cutoff = seg.started_at or seg.created_at
    if cutoff is not None:
        query = query.where(SliceView.created_at <= cutoff)
    return known_slice_set(prompted, session.scalars(query).all())
