"""nnU-Net v2's dataset fingerprint, computed without the ``ignore`` label (DESIGN.md sections 7 and 9).

Why. nnU-Net v2 (``nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor``,
``DatasetFingerprintExtractor.collect_foreground_intensities``) collects the CT intensities it later
normalises with (``CTNormalization``: clip to the 0.5/99.5 percentiles, subtract the mean, divide by
the std — read from ``foreground_intensity_properties_per_channel`` of the plans, which the planner copies
from ``dataset_fingerprint.json``) on ``segmentation > 0``: the ``ignore`` label counts as foreground.
An export with ``unprompted=ignore`` covers most of the body with ``ignore``, so those statistics would
describe air, fat and bone instead of the organs (upstream: MIC-DKFZ/nnUNet#3055, unfixed in 2.8.1).
nnU-Net has no switch for it; it does, however, *use an existing fingerprint*: fingerprint extraction
is skipped when ``$nnUNet_preprocessed/DatasetXXX_Name/dataset_fingerprint.json`` exists and ``--clean``
is not given (``DatasetFingerprintExtractor.run(overwrite_existing=False)``). So the export ships the
fingerprint computed with the ignore label excluded, and its README says where to put it.

What. :func:`dataset_fingerprint` repeats ``DatasetFingerprintExtractor.run`` step for step on the
written raw dataset — SimpleITK's array order (z, y, x) and spacing, ``crop_to_nonzero`` (the filled
non-zero mask's bounding box), per case ``int(10e7 // n_cases)`` intensities drawn with replacement by
``np.random.RandomState(1234).choice`` from the foreground voxels, then mean, median, std, min, max and
the 0.5/99.5 percentiles of all draws — with one difference: foreground is ``0 < label != ignore``.
``tests/test_export_fingerprint.py`` checks it against nnunetv2's own extractor and planner.

Cost: one case's image and labels at a time (stored voxel type, not float), plus the draws: 10e7 float32
(400 MB) over the whole dataset, as in nnU-Net.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy.ndimage import binary_fill_holes

FILE_NAME = "dataset_fingerprint.json"
FOREGROUND_DRAWS = 10e7  # DatasetFingerprintExtractor.num_foreground_voxels_for_intensitystats
SEED = 1234  # DatasetFingerprintExtractor.collect_foreground_intensities
PERCENTILES = (0.5, 50.0, 99.5)
_CHUNK = 1 << 22  # draws per randint call (the same stream as one call, without an 800 MB index array)


def _read(path: Path) -> tuple[npt.NDArray[Any], list[float]]:
    """The volume as nnU-Net's ``SimpleITKIO`` sees it: axes reversed (z, y, x), spacing reversed, |spacing|
    (SimpleITK's NIfTI spacing is pixdim, also when the sform's scales disagree; so is nibabel's ``zooms``).

    Voxels keep their stored type (scaled files: nibabel's float); nnU-Net's float32 cast is applied to the
    foreground voxels only (same values: the non-zero test and the draws do not depend on it)."""
    image: Any = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path.name}: expected a 3D volume, got shape {data.shape}")
    spacing = [abs(float(s)) for s in image.header.get_zooms()[:3]][::-1]
    return data.T, spacing


def _bbox(mask: npt.NDArray[np.bool_]) -> tuple[slice, ...]:
    """``acvl_utils`` ``get_bbox_from_mask`` (half-open; the whole axis when the mask is empty on it)."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, mask.shape[axis]))
    return tuple(out)


def _draws(foreground: npt.NDArray[np.float32], n: int, out: npt.NDArray[np.float32]) -> None:
    """``RandomState(1234).choice(foreground, n, replace=True)`` written into ``out`` (legacy ``choice`` is
    ``foreground[randint(0, len, n)]``; ``randint`` in chunks yields the same stream)."""
    rs = np.random.RandomState(SEED)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        out[start:stop] = foreground[rs.randint(0, foreground.size, size=stop - start)]


def dataset_fingerprint(
    cases: Sequence[tuple[Path, Path]], *, ignore_value: int | None
) -> dict[str, Any] | None:
    """nnU-Net's ``dataset_fingerprint.json`` content for the train ``cases`` ((image, label) paths, one CT
    channel), foreground = ``label > 0`` without ``ignore_value``. Cases are taken in nnU-Net's order (sorted
    by case id: pass them sorted). None when no case has a foreground voxel (nnU-Net cannot plan then)."""
    per_case = int(FOREGROUND_DRAWS // len(cases))
    spacings: list[list[float]] = []
    shapes: list[list[int]] = []
    relative: list[float] = []
    draws = np.empty(per_case * len(cases), dtype=np.float32)
    filled = 0  # cases with foreground, their draws in case order
    for image_path, label_path in cases:
        image, spacing = _read(image_path)
        labels, _ = _read(label_path)
        if labels.shape != image.shape:
            raise ValueError(f"{label_path.name}: shape {labels.shape} differs from the image's {image.shape}")
        box = _bbox(binary_fill_holes(image != 0))  # crop_to_nonzero
        cropped = labels[box]
        fg = cropped > 0
        if ignore_value is not None:
            fg &= cropped != ignore_value
        foreground = np.asarray(image[box][fg], dtype=np.float32)
        if foreground.size:
            _draws(foreground, per_case, draws[filled * per_case:(filled + 1) * per_case])
            filled += 1
        spacings.append(spacing)
        shapes.append([s.stop - s.start for s in box])
        relative.append(float(np.prod(shapes[-1]) / np.prod(image.shape)))
        del image, labels, cropped, fg, foreground
    if filled == 0:
        return None
    # nnU-Net concatenates the float32 draws of every case; a case without foreground adds [], which makes
    # the concatenation float64
    values: npt.NDArray[Any] = draws[:filled * per_case] if filled == len(cases) else draws[
        :filled * per_case].astype(np.float64)
    del draws
    stats = {"mean": float(np.mean(values)), "std": float(np.std(values)),
             "min": float(np.min(values)), "max": float(np.max(values))}
    low, median, high = np.percentile(values, PERCENTILES, overwrite_input=True)  # same values, no copy
    stats.update(median=float(median), percentile_99_5=float(high), percentile_00_5=float(low))
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": {"0": dict(sorted(stats.items()))},
        "median_relative_size_after_cropping": float(np.median(relative, 0)),
    }


def write_fingerprint(fingerprint: dict[str, Any], path: Path) -> None:
    """As nnU-Net's ``save_json`` writes it (sorted keys, indent 4)."""
    path.write_text(json.dumps(fingerprint, sort_keys=True, indent=4))
