"""Label maps on disk: the one reader and the one writer (no storage, no database: paths only).

**Geometry rule.** A label map carries its image's header: the same NIfTI version, dims, voxel
sizes and units, and the image's qform and sform *with the image's codes* (a code of 0 stays 0);
only the voxel type (uint8/uint16 by label range, :func:`~app.imaging.nifti.label_dtype`), the
scaling (slope 1, intercept 0) and a singleton 4th axis (dropped) differ. So every reader puts the
labels on the image's grid: nibabel's best affine (sform, else qform, else the pixdim fallback),
ITK/SimpleITK's own sform/qform choice (nnU-Net's integrity check compares image and label
geometry through SimpleITK) and FSL's alike. Rewriting both forms from nibabel's best affine with
a forced code would make a label whose qform disagrees with its image's, or that claims an
orientation its image left unknown (code 0).

The gzip stream is deterministic (nibabel writes mtime 0): the same labels and image give the
same bytes, so mask sha256s are stable between runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from app.imaging.nifti import label_dtype

NiftiImage = nib.Nifti1Image | nib.Nifti2Image


@dataclass(frozen=True)
class LabelMap:
    image: NiftiImage  # the file's image: its header and affine
    labels: npt.NDArray[Any]  # 3D, original orientation, the stored values (as ``dataobj`` gives them)

    def as_int32(self) -> npt.NDArray[np.int32]:
        return self.labels.astype(np.int32)


def read_label_map(path: Path) -> LabelMap:
    """Decode the label map at ``path`` whole (a singleton 4th axis is dropped)."""
    image = nib.load(str(path))
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path.name}: not a NIfTI image")
    labels: npt.NDArray[Any] = np.asarray(image.dataobj)
    if labels.ndim == 4 and labels.shape[3] == 1:
        labels = labels[..., 0]
    return LabelMap(image, labels)


def save_label_map(labels: npt.NDArray[np.integer[Any]], like: NiftiImage, path: Path) -> None:
    """Write ``labels`` with ``like``'s header and geometry (the module's rule), uint8/uint16 data.

    ``labels`` already of that type are written without a copy (nibabel writes slice by slice).
    """
    if tuple(labels.shape) != tuple(like.shape[:3]):
        raise ValueError(f"label shape {labels.shape} differs from the image's {like.shape[:3]}")
    dtype = label_dtype(int(labels.max(initial=0)))
    header = like.header.copy()
    header.set_data_dtype(dtype)
    if len(like.shape) == 4:
        header.set_data_shape(like.shape[:3])
    out = type(like)(labels.astype(dtype, copy=False), like.affine, header)
    out.header.set_qform(like.header.get_qform(), code=int(like.header["qform_code"]))
    out.header.set_sform(like.header.get_sform(), code=int(like.header["sform_code"]))
    out.header.set_slope_inter(1, 0)
    nib.save(out, str(path))
