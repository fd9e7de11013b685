"""Export handler: gather the cases of an export, write the nnU-Net folder and archive, store both.

With ``mask_formats`` containing 'dicom-seg', every case with labels also gets ``dicom_seg/{case}.dcm``
in the folder (a DICOM SEG of the same labels: segmentations as SEMIAUTOMATIC crowdsam + model,
references as MANUAL); the nnU-Net layout is unchanged.

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
from app.core.labelmaps import load_label_map, open_label_map
from app.core.storage import Storage, sha256_file
from app.exports.jobs import ExportCase, ExportParams
from app.imaging import dicom_seg
from app.jobs.runner import JobContext, params_model, row_and_dataset
from app.prompts.models import SliceView
from app.segmentations import masks
from app.segmentations.models import Segmentation
from app.volumes.models import Volume
from workers.nnunet import CaseInput, known_slice_set, make_archive, manifest, write_dataset

DICOM_SEG_DIR = "dicom_seg"
DICOM_SEG_NOTE = (
    "dicom_seg/{case}.dcm: the case's labels as a DICOM Segmentation (one segment per label present, SNOMED CT "
    "codes), referencing the source DICOM series, or a synthetic CT series with the NIfTI geometry for NIfTI "
    "uploads; nnU-Net ignores this folder"
)


def export(context: JobContext) -> dict[str, Any]:
    """Write the nnU-Net folder and archive, store both; returns the row's result columns."""
    params: ExportParams = params_model(context, ExportParams)
    storage = context.storage
    with session_scope() as session:
        _, dataset = row_and_dataset(session, context)
        dataset_id, dataset_name, labels = dataset.id, dataset.name, dict(dataset.labels)
        label_codes = dataset.label_codes
        plans = [_case_plan(session, case, params.unprompted, params.derived) for case in params.cases]
    with_seg = "dicom-seg" in params.mask_formats
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
                       "label_source": params.label_source, "model": params.model,
                       **({"mask_formats": list(params.mask_formats), "dicom_seg": DICOM_SEG_NOTE} if with_seg
                          else {})},
                progress=context.progress,
            )
            if with_seg:
                for plan in plans:
                    context.check_cancel()
                    _write_dicom_seg(storage, plan, folder, labels, label_codes)
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
    plan: dict[str, Any] = {**case.model_dump(), "image_key": volume.image_key, "reference_key": volume.reference_key,
                            "source": masks.VolumeSource.of(volume), "created": volume.created_at,
                            "algorithm": dicom_seg.Algorithm(name=None, version=masks.software_version())}
    if case.segmentation_id is not None:
        seg = session.get(Segmentation, case.segmentation_id)
        if seg is None or seg.mask_key is None:
            raise LookupError(f"segmentation {case.segmentation_id} of case {case.case_id} is gone")
        plan["mask_key"] = seg.mask_key
        plan["algorithm"] = masks.segmentation_algorithm(seg)
        plan["created"] = seg.finished_at or seg.created_at
        plan["known_slices"] = (known_slices(session, seg, with_derived=derived == "known")
                                if unprompted == "ignore" else None)
    return plan


def _load_case(storage: Storage, plan: dict[str, Any], tmp: Path) -> CaseInput:
    suffix = ".nii.gz" if plan["image_key"].endswith(".gz") else ".nii"
    image_path = tmp / f"{plan['case_id']}_image{suffix}"
    storage.download(plan["image_key"], image_path)  # streamed: images can be large
    label_key = plan.get("mask_key") or plan.get("reference_key")
    labels = None if label_key is None else load_label_map(storage, label_key)
    provenance: dict[str, Any] = {"volume_id": plan["volume_id"]}
    if plan.get("segmentation_id") is not None:
        provenance["segmentation_id"] = plan["segmentation_id"]
    return CaseInput(plan["case_id"], plan["split"], image_path, labels, plan.get("known_slices"), provenance)


def _write_dicom_seg(storage: Storage, plan: dict[str, Any], folder: Path, labels: dict[str, int],
                     label_codes: dict[str, Any] | None) -> None:
    """``dicom_seg/{case}.dcm``: the case's labels (the same ones as its NIfTI label file, in dataset values,
    without nnU-Net's ``ignore``) as a DICOM SEG; cases without labels get none."""
    label_key = plan.get("mask_key") or plan.get("reference_key")
    if label_key is None:
        return
    label_map = open_label_map(storage, label_key)
    source: masks.VolumeSource = plan["source"]
    content = masks.dicom_seg_bytes(
        storage, label_map.labels, label_map.image.affine, labels, label_codes, source=source,
        algorithm=plan["algorithm"], seed=f"crowdsam-export-{source.sha256}-{label_key}-{label_codes}",
        created=plan["created"],
    )
    target = folder / DICOM_SEG_DIR / f"{plan['case_id']}.dcm"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(content)  # inside the job's temporary folder: stored only once complete


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
