"""Export runner: gather the cases of an Export row, write the nnU-Net folder and archive, store both.

Idempotent: a retry deletes whatever an earlier attempt left under ``exports/{id}/`` and starts over.
The row's ``result`` (file list, checksums, dataset.json) and ``archive_key`` are set only after every
file is in the store.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from sqlalchemy import select

from app.core.db import session_scope
from app.core.storage import sha256_file
from app.datasets.models import Dataset
from app.exports.models import Export
from app.prompts.models import SliceView
from app.segmentations.models import Segmentation
from app.volumes.models import Volume
from workers import jobrun
from workers.nnunet import CaseInput, make_archive, manifest, write_dataset


class ExportRunner(jobrun.RowJob):
    model = Export

    @property
    def export_id(self) -> int:
        return self.row_id

    def _run(self) -> dict[str, Any]:
        with session_scope() as session:
            export = session.get(Export, self.export_id)
            assert export is not None
            dataset = session.get(Dataset, export.dataset_id)
            assert dataset is not None
            params = dict(export.params)
            dataset_id = export.dataset_id
            labels = dict(dataset.labels)
            plans = [self._case_plan(session, c, params["unprompted"]) for c in params["cases"]]
        prefix = f"exports/{self.export_id}"
        self.storage.delete_prefix(prefix)
        with tempfile.TemporaryDirectory(prefix="crowdsam-export-") as tmp:
            root = Path(tmp) / "out"
            root.mkdir()
            cases = [self._load_case(plan, Path(tmp)) for plan in plans]
            folder = write_dataset(
                root,
                number=int(params["dataset_number"]),
                name=params["dataset_name"],
                dataset_labels=labels,
                cases=cases,
                unprompted=params["unprompted"],
                description=f"crowdsam export {self.export_id} of dataset {dataset.name!r} "
                            f"(labels: {params['label_source']}{'/' + params['model'] if params['model'] else ''})",
                extra={"export_id": self.export_id, "dataset_id": dataset_id,
                       "label_source": params["label_source"], "model": params["model"]},
                progress=lambda done, total: jobrun.progress(Export, self.export_id, done, total),
            )
            files = manifest(folder)
            archive = Path(tmp) / f"{folder.name}.tar.gz"
            make_archive(folder, archive)
            for row in files:
                self.storage.put_file(f"{prefix}/{row['path']}", root / row["path"])
            archive_key = f"{prefix}/{archive.name}"
            self.storage.put_file(archive_key, archive)
            result = {
                "folder": folder.name,
                "files": files,
                "archive": {"path": archive.name, "size": archive.stat().st_size, "sha256": sha256_file(archive)},
                "dataset_json": json.loads((folder / "dataset.json").read_text()),
            }
        jobrun.finish(Export, self.export_id, result=result, archive_key=archive_key)
        return {"export_id": self.export_id, "files": len(files)}

    def _case_plan(self, session: Any, case: dict[str, Any], unprompted: str) -> dict[str, Any]:
        volume = session.get(Volume, case["volume_id"])
        if volume is None:
            raise LookupError(f"volume {case['volume_id']} ({case['case_id']}) was deleted")
        plan: dict[str, Any] = {**case, "image_key": volume.image_key, "reference_key": volume.reference_key}
        seg_id = case.get("segmentation_id")
        if seg_id is not None:
            seg = session.get(Segmentation, seg_id)
            if seg is None or seg.mask_key is None:
                raise LookupError(f"segmentation {seg_id} of case {case['case_id']} is gone")
            plan["mask_key"] = seg.mask_key
            plan["known_slices"] = known_slices(session, seg) if unprompted == "ignore" else None
        return plan

    def _load_case(self, plan: dict[str, Any], tmp: Path) -> CaseInput:
        suffix = ".nii.gz" if plan["image_key"].endswith(".gz") else ".nii"
        image_path = tmp / f"{plan['case_id']}_image{suffix}"
        image_path.write_bytes(self.storage.read_bytes(plan["image_key"]))
        label_key = plan.get("mask_key") or plan.get("reference_key")
        labels = None
        if label_key is not None:
            with self.storage.local_copy(label_key) as path:
                labels = np.asarray(nib.load(str(path)).dataobj).astype(np.int32)  # type: ignore[attr-defined]
        provenance: dict[str, Any] = {"volume_id": plan["volume_id"]}
        if plan.get("segmentation_id") is not None:
            provenance["segmentation_id"] = plan["segmentation_id"]
        return CaseInput(plan["case_id"], plan["split"], image_path, labels, plan.get("known_slices"), provenance)


def known_slices(session: Any, seg: Segmentation) -> list[int]:
    """Canonical slices the crowd has labelled for this segmentation: its prompted slices plus slices seen
    without a box (seen-but-empty = "none of these organs here") up to the time the job started."""
    prompted = {int(k) for k in (seg.stats or {}).get("prompted_slices", [])}
    query = select(SliceView.slice_index).where(SliceView.volume_id == seg.volume_id)
    cutoff = seg.started_at or seg.created_at
    if cutoff is not None:
        query = query.where(SliceView.created_at <= cutoff)
    seen = {int(k) for k in session.scalars(query).all()}
    return sorted(prompted | seen)
