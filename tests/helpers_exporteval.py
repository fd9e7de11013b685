"""Test data builders for the export and evaluation tests (real files, real rows — no mocks)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tests.conftest import ABDOMEN_LABELS, CT_DIR, TOTALSEG_MAP, upload

CASES = {
    "ct": (CT_DIR / "example_ct.nii.gz", CT_DIR / "example_seg_fast_force_split.nii.gz"),
    "sm": (CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz"),
}


def upload_case(client: Any, tokens: Any, dataset_id: int, case_id: str, image: Path, reference: Path | None,
                split: str = "train") -> dict[str, Any]:
    form = {"reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "background"} if reference else {}
    response = upload(client, tokens, dataset_id, image, reference, case_id=case_id, split=split, **form)
    assert response.status_code == 201, response.text
    return dict(response.json())


def upload_ct_cases(client: Any, tokens: Any, dataset_id: int) -> dict[str, dict[str, Any]]:
    """``example_ct`` (case ``ct``) and ``example_ct_sm`` (case ``sm``), both train, with references."""
    return {cid: upload_case(client, tokens, dataset_id, cid, img, ref) for cid, (img, ref) in CASES.items()}


def reference_array(volume_id: int) -> tuple[np.ndarray, nib.Nifti1Image]:
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.volumes.models import Volume

    with session_scope() as session:
        volume = session.get(Volume, volume_id)
        assert volume is not None and volume.reference_key is not None
        key = volume.reference_key
    with get_storage().local_copy(key) as path:
        img = nib.load(str(path))
        return np.asarray(img.dataobj).astype(np.int32), img


def add_finished_segmentation(volume_id: int, *, model: str = "litemedsam", keep_every: int = 3,
                              erode_label: str | None = None, labels: dict[str, int] | None = None,
                              prompted: list[int] | None = None,
                              derived: list[int] | None = None) -> tuple[int, list[int], np.ndarray]:
    """A finished Segmentation row whose mask is the reference with every ``keep_every``-th canonical slice
    zeroed (those slices are the "unprompted" ones; the others are listed in ``stats.prompted_slices``), or,
    with ``prompted``, every slice not in it zeroed. ``derived`` slices keep the reference and are listed
    in ``stats.derived_slices`` (a ``fill_gaps`` segmentation's gap-filled slices).
    Returns (segmentation id, prompted canonical slices, mask on the original grid)."""
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.imaging.coords import Orientation
    from app.imaging.labelmaps import save_label_map
    from app.segmentations.models import Segmentation

    ref, img = reference_array(volume_id)
    orientation = Orientation.from_affine(img.affine, ref.shape)
    canonical = orientation.canonical(ref).copy()
    n = canonical.shape[2]
    if prompted is None:
        prompted = [k for k in range(n) if k % keep_every != 0]
    unprompted = [k for k in range(n) if k not in prompted and k not in (derived or [])]
    canonical[:, :, unprompted] = 0
    mask = np.asarray(orientation.original(canonical)).astype(np.int32)
    if erode_label is not None and labels is not None:
        from scipy.ndimage import binary_erosion

        organ = mask == labels[erode_label]
        mask[organ & ~binary_erosion(organ)] = 0
    with session_scope() as session:
        row = Segmentation(volume_id=volume_id, model=model, fusion="majority", labels=None, status="finished",
                           progress={}, stats={}, attempts=1, created_by="test")
        session.add(row)
        session.flush()
        key = f"segmentations/{row.id}/mask.nii.gz"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mask.nii.gz"
            save_label_map(mask, img, path)
            get_storage().put_file(key, path)
        row.mask_key = key
        names = {v: n for n, v in (labels or ABDOMEN_LABELS).items()}
        per_slice = {str(k): {names[int(v)]: {"annotators": ["sim"], "agreement": {}, "score": 1.0}
                              for v in np.unique(np.asarray(orientation.canonical(ref))[:, :, k]) if int(v) in names}
                     for k in prompted}
        row.stats = {"prompted_slices": prompted, "derived_slices": derived or [], "per_slice": per_slice,
                     "encoded": 0, "decoded": 0, "timings": {}, "labels": {}}
        session.commit()
        return row.id, prompted, mask
