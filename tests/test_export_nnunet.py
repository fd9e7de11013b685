"""Unit tests of the dataset writer: label mapping and the unknown-slice mask in every orientation."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from app.imaging.coords import Orientation
from workers.nnunet import LabelMapping, unknown_slice_mask

ORIENTATIONS = ["RAS", "LPS", "LAS", "IPL", "SLA", "PIR"]


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_unknown_slices_follow_canonical_k_in_any_orientation(codes: str) -> None:
    ras = nib.Nifti1Image(np.zeros((7, 5, 9), dtype=np.int16), np.diag([2.0, 3.0, 4.0, 1.0]))
    img = ras.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes))))
    orientation = Orientation.from_affine(img.affine, img.shape)
    assert orientation.canonical_shape == (7, 5, 9)
    known = [0, 3, 4, 8]
    mask = unknown_slice_mask(orientation, known)
    assert mask.shape == img.shape
    canonical = np.asarray(orientation.canonical(mask))
    for k in range(9):
        assert canonical[:, :, k].all() == (k not in known)
        assert canonical[:, :, k].any() == (k not in known)
    # and the S coordinate of an unknown voxel really is an unknown slice's world z
    idx = np.argwhere(mask)[0]
    z = (img.affine @ np.r_[idx, 1.0])[2]
    assert round(z / 4.0) not in known


def test_label_mapping_is_consecutive_by_value_and_invertible() -> None:
    mapping = LabelMapping({"liver": 5, "spleen": 1, "aorta": 52}, with_ignore=True)
    assert mapping.nnunet_labels() == {"background": 0, "spleen": 1, "liver": 2, "aorta": 3, "ignore": 4}
    data = np.array([0, 1, 5, 52, 5])
    exported = mapping.to_export(data)
    assert exported.tolist() == [0, 1, 2, 3, 2]
    assert mapping.to_dataset(exported).tolist() == data.tolist()
    with pytest.raises(ValueError, match="not in the dataset's schema"):
        mapping.to_export(np.array([0, 60]))
    assert list(itertools.islice(mapping.names, 3)) == ["spleen", "liver", "aorta"]
