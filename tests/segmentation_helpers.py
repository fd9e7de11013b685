"""Helpers for the segmentation tests: reference boxes, prompts, Dice, masks from the API."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from app.imaging.coords import Orientation, display_slice, mask_bbox_display

ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}
TOTALSEG = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 52: "aorta"}


def canonical_reference(path: Path) -> npt.NDArray[np.int32]:
    """A TotalSegmentator reference on its canonical grid, in the dataset's label values (others → 0)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.int32)
    out = np.zeros_like(data)
    for source, name in TOTALSEG.items():
        out[data == source] = ORGANS[name]
    return np.asarray(Orientation.from_affine(img.affine, data.shape).canonical(out))


def reference_boxes(
    canonical_ref: npt.NDArray[Any], labels: dict[str, int] = ORGANS, slices: list[int] | None = None
) -> list[dict[str, Any]]:
    """Tight display boxes, one per connected 2D part of each organ on each slice that has it."""
    boxes = []
    ks = range(canonical_ref.shape[2]) if slices is None else slices
    for k in ks:
        display = display_slice(canonical_ref, k)
        for name, value in labels.items():
            components, n = ndimage.label(display == value, structure=np.ones((3, 3), bool))
            for part in range(1, n + 1):
                box = mask_bbox_display(components == part)
                assert box is not None
                boxes.append({"slice": int(k), "label": name, "box": list(box)})
    return boxes


def post_boxes(client: Any, headers: dict[str, str], volume_id: int, boxes: list[dict[str, Any]]) -> None:
    """Post boxes through the prompts API as the token's annotator."""
    for start in range(0, len(boxes), 500):
        response = client.post(
            f"/api/v1/volumes/{volume_id}/prompts", json={"boxes": boxes[start:start + 500]}, headers=headers
        )
        assert response.status_code == 201, response.text


def load_mask(content: bytes) -> nib.Nifti1Image:
    raw = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(raw)


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def per_slice_dice(
    pred: npt.NDArray[Any], ref: npt.NDArray[Any], value: int, slices: list[int] | None = None
) -> dict[int, float]:
    """Dice per axial slice (last axis) over slices where the reference has the organ."""
    out = {}
    ks = slices if slices is not None else [int(k) for k in np.flatnonzero((ref == value).any(axis=(0, 1)))]
    for k in ks:
        p, r = pred[:, :, k] == value, ref[:, :, k] == value
        denom = int(p.sum() + r.sum())
        out[k] = 1.0 if denom == 0 else 2.0 * float((p & r).sum()) / denom
    return out


def volume_dice(pred: npt.NDArray[Any], ref: npt.NDArray[Any], value: int) -> float:
    p, r = pred == value, ref == value
    denom = int(p.sum() + r.sum())
    return float("nan") if denom == 0 else 2.0 * float((p & r).sum()) / denom


def png_array(content: bytes) -> npt.NDArray[Any]:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(content)))


def reoriented_copy(directory: Path, image: Path, reference: Path, axcodes: tuple[str, str, str],
                    tag: str = "") -> tuple[Path, Path]:
    """Image + reference reoriented to ``axcodes`` (same anatomy, new array layout and affine).

    ``tag`` goes into the header description: a different tag gives a different file (sha256),
    i.e. a volume whose embeddings no cache has seen yet.
    """
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    out = []
    for path, name in ((image, "image"), (reference, "reference")):
        img = nib.load(str(path))
        ornt = ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes))
        moved = img.as_reoriented(ornt)
        moved.header["descrip"] = f"{''.join(axcodes)} {tag}".encode()[:79]
        target = directory / f"{name}_{''.join(axcodes)}{'_' + tag if tag else ''}.nii.gz"
        nib.save(moved, str(target))
        out.append(target)
    return out[0], out[1]
