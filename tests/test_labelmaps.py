"""The one label-map writer/reader (app.imaging.labelmaps): the label carries its image's header."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from app.imaging.labelmaps import read_label_map, save_label_map


def _image(tmp_path: Path, *, qform_code: int, sform_code: int, cls: type = nib.Nifti1Image,
           shape: tuple[int, ...] = (6, 5, 4)) -> nib.Nifti1Image:
    affine = np.array([[0, -0.8, 0, 10.5], [0.9, 0, 0, -20.25], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    header = cls(np.zeros(shape, np.int16), affine).header
    header.set_qform(np.diag([1.0, 1.0, 2.5, 1.0]), code=qform_code)  # deliberately not the sform
    header.set_sform(affine, code=sform_code)
    path = tmp_path / "image.nii.gz"
    nib.save(cls(np.zeros(shape, np.int16), None, header), str(path))  # no affine: the header's forms stay
    loaded: Any = nib.load(str(path))
    assert int(loaded.header["qform_code"]) == qform_code and int(loaded.header["sform_code"]) == sform_code
    return loaded


@pytest.mark.parametrize(("qform_code", "sform_code"), [(0, 0), (0, 2), (1, 0), (1, 1), (2, 4)])
def test_label_keeps_the_images_forms_and_codes(tmp_path, qform_code, sform_code):
    like = _image(tmp_path, qform_code=qform_code, sform_code=sform_code)
    labels = np.arange(120).reshape(6, 5, 4) % 3
    save_label_map(labels, like, tmp_path / "labels.nii.gz")
    out = read_label_map(tmp_path / "labels.nii.gz")
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "dim", "xyzt_units"):
        np.testing.assert_array_equal(out.image.header[key], like.header[key], err_msg=key)
    np.testing.assert_array_equal(out.image.affine, like.affine)
    assert out.labels.dtype == np.uint8
    np.testing.assert_array_equal(out.labels, labels)
    assert out.as_int32().dtype == np.int32


def test_label_type_scaling_version_and_4d(tmp_path):
    like = _image(tmp_path, qform_code=1, sform_code=1, cls=nib.Nifti2Image, shape=(6, 5, 4, 1))
    like.header.set_slope_inter(2.0, -1.0)
    labels = np.full((6, 5, 4), 300, dtype=np.int64)
    save_label_map(labels, like, tmp_path / "labels.nii.gz")
    out = read_label_map(tmp_path / "labels.nii.gz")
    assert isinstance(out.image, nib.Nifti2Image)
    assert out.image.shape == (6, 5, 4) and out.labels.dtype == np.uint16
    assert out.image.header.get_slope_inter() == (None, None) or out.image.header.get_slope_inter() == (1.0, 0.0)
    np.testing.assert_array_equal(out.labels, labels)


def test_same_labels_same_bytes_and_shape_checked(tmp_path):
    like = _image(tmp_path, qform_code=1, sform_code=2)
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 2:4, 1] = 2
    digests = []
    for name in ("a.nii.gz", "b.nii.gz"):
        save_label_map(labels, like, tmp_path / name)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    with pytest.raises(ValueError, match="differs from the image's"):
        save_label_map(np.zeros((5, 5, 4), np.uint8), like, tmp_path / "c.nii.gz")
