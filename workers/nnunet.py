"""nnU-Net v2 raw dataset writer (DESIGN.md section 7).

Layout written under ``root``::

    DatasetXXX_Name/
        dataset.json
        imagesTr/{CASE}_0000.nii.gz   the uploaded image (gzip of the upload when it was a plain .nii)
        labelsTr/{CASE}.nii.gz        labels remapped to 0..n (+ ``ignore`` = n + 1 on unknown slices)
        imagesTs/{CASE}_0000.nii.gz   test cases (no labels needed by nnU-Net)
        labelsTs/{CASE}.nii.gz        test references, remapped like labelsTr — *not* part of nnU-Net's
                                      required set; kept beside imagesTs for evaluation
        README.md                     the files and the nnU-Net command sequence
        dataset_fingerprint.json      ``ignore`` exports only: nnU-Net's fingerprint with ``ignore`` excluded
                                      from the foreground (:mod:`workers.fingerprint`); it goes to
                                      ``$nnUNet_preprocessed/DatasetXXX_Name/`` before planning

Labels share the image's header (shape, qform, sform and their codes); only the data type changes
(:func:`app.imaging.labelmaps.save_label_map`, the app's one label-map writer).
Nothing here touches the database: the export job gathers the inputs and calls :func:`write_dataset`.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from app.core.storage import sha256_file
from app.imaging.coords import Orientation
from app.imaging.labelmaps import save_label_map
from workers import fingerprint as nnunet_fingerprint

FILE_ENDING = ".nii.gz"
IGNORE = "ignore"


@dataclass
class CaseInput:
    """One case to export: where its files are and which labels (on the original grid) it gets."""

    case_id: str
    split: str  # "train" | "test"
    image_path: Path  # the upload as stored (.nii or .nii.gz)
    labels: npt.NDArray[np.integer[Any]] | None  # dataset label values, original grid; None = no label file
    known_slices: Sequence[int] | None = None  # canonical k known to the crowd; None = every slice known
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelMapping:
    """Dataset label values → consecutive nnU-Net values (by ascending dataset value)."""

    dataset_labels: dict[str, int]
    with_ignore: bool

    @property
    def names(self) -> list[str]:
        return [name for name, _ in sorted(self.dataset_labels.items(), key=lambda kv: kv[1])]

    @property
    def export_values(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(self.names)}

    @property
    def ignore_value(self) -> int | None:
        return len(self.names) + 1 if self.with_ignore else None

    def nnunet_labels(self) -> dict[str, int]:
        labels = {"background": 0, **self.export_values}
        if self.ignore_value is not None:
            labels[IGNORE] = self.ignore_value
        return labels

    def lookup(self) -> npt.NDArray[np.int32]:
        """Table t with t[dataset value] = export value (0 for values not in the schema)."""
        table = np.zeros(max(self.dataset_labels.values()) + 1, dtype=np.int32)
        for name, value in self.dataset_labels.items():
            table[value] = self.export_values[name]
        return table

    def to_export(self, labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int32]:
        table = self.lookup()
        data = np.asarray(labels).astype(np.int64)
        if data.size and (data.min() < 0 or data.max() >= table.size):
            bad = sorted({int(v) for v in np.unique(data) if v < 0 or v >= table.size})
            raise ValueError(f"label values {bad[:20]} are not in the dataset's schema")
        out: npt.NDArray[np.int32] = table[data]
        return out

    def to_dataset(self, export_labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int32]:
        """Inverse map (export value → dataset value); used to read predictions in export values."""
        inverse = np.zeros(len(self.names) + 1, dtype=np.int32)
        for name, value in self.export_values.items():
            inverse[value] = self.dataset_labels[name]
        out: npt.NDArray[np.int32] = inverse[np.asarray(export_labels).astype(np.int64)]
        return out


def known_slice_set(prompted: Iterable[int], seen: Iterable[int]) -> list[int]:
    """Canonical slices the crowd has labelled: prompted, or seen without a box ("none of these organs here").
    An ``ignore`` export keeps exactly these (every other slice gets ``ignore``) and ``Dice_known_slices``
    scores exactly these."""
    return sorted({int(k) for k in prompted} | {int(k) for k in seen})


def unknown_slice_mask(orientation: Orientation, known_slices: Iterable[int]) -> npt.NDArray[np.bool_]:
    """Boolean mask on the ORIGINAL grid: True on every axial slice (canonical k) not in ``known_slices``."""
    canonical = np.ones(orientation.canonical_shape, dtype=bool)
    known = [int(k) for k in known_slices if 0 <= int(k) < orientation.canonical_shape[2]]
    canonical[:, :, known] = False
    return np.asarray(orientation.original(canonical), dtype=bool)


def copy_image_gz(source: Path, target: Path) -> None:
    """Write the uploaded image as ``.nii.gz``: a copy when already gzipped, else a gzip of its bytes
    (identical header, affine and voxel data — nothing is re-encoded)."""
    with source.open("rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if gzipped:
        shutil.copyfile(source, target)
        return
    with source.open("rb") as src, gzip.open(target, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def dataset_folder_name(number: int, name: str) -> str:
    return f"Dataset{number:03d}_{name}"


def write_dataset(
    root: Path,
    *,
    number: int,
    name: str,
    dataset_labels: dict[str, int],
    cases: Sequence[CaseInput],
    unprompted: str,
    description: str = "",
    extra: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the raw dataset folder under ``root`` and return its path."""
    if unprompted not in ("background", "ignore"):
        raise ValueError(f"unprompted must be 'background' or 'ignore', not {unprompted!r}")
    mapping = LabelMapping(dict(dataset_labels), with_ignore=unprompted == "ignore")
    folder = root / dataset_folder_name(number, name)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    per_case: dict[str, Any] = {}
    n_train = 0
    for i, case in enumerate(cases):
        info = _write_case(folder, case, mapping)
        per_case[case.case_id] = {**info, **case.provenance}
        n_train += case.split == "train"
        if progress is not None:
            progress(i + 1, len(cases))
    fingerprint = None
    if mapping.ignore_value is not None and n_train:
        train = sorted(c.case_id for c in cases if c.split == "train")  # nnU-Net's order (np.unique of ids)
        fingerprint = nnunet_fingerprint.dataset_fingerprint(
            [(folder / "imagesTr" / f"{c}_0000{FILE_ENDING}", folder / "labelsTr" / f"{c}{FILE_ENDING}")
             for c in train],
            ignore_value=mapping.ignore_value,
        )
        if fingerprint is not None:
            nnunet_fingerprint.write_fingerprint(fingerprint, folder / nnunet_fingerprint.FILE_NAME)
    dataset_json: dict[str, Any] = {
        "channel_names": {"0": "CT"},
        "labels": mapping.nnunet_labels(),
        "numTraining": n_train,
        "file_ending": FILE_ENDING,
        "name": name,
        "description": description,
        "label_values_original": {n: int(dataset_labels[n]) for n in mapping.names},
        "crowdsam": {
            "unprompted": unprompted,
            "labelsTs": "references of the test cases, remapped like labelsTr; not part of nnU-Net's "
                        "required set (nnU-Net ignores this folder)",
            **({"fingerprint": _fingerprint_note(folder.name, fingerprint)} if mapping.ignore_value is not None
               else {}),
            "cases": per_case,
            **(extra or {}),
        },
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2, sort_keys=False))
    (folder / "README.md").write_text(readme(folder.name, number, description, with_fingerprint=fingerprint is not None,
                                             with_ignore=mapping.ignore_value is not None))
    return folder


def _fingerprint_note(folder_name: str, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    if fingerprint is None:
        return {"file": None, "why": "no train case has a labelled organ voxel: nnU-Net cannot normalise on them"}
    return {
        "file": nnunet_fingerprint.FILE_NAME,
        "copy_to": f"$nnUNet_preprocessed/{folder_name}/{nnunet_fingerprint.FILE_NAME}",
        "foreground": "labels 1..n; 'ignore' excluded (nnU-Net 2.8.1 would count it as foreground)",
        "foreground_intensity_properties": fingerprint["foreground_intensity_properties_per_channel"]["0"],
    }


def readme(folder_name: str, number: int, description: str, *, with_ignore: bool, with_fingerprint: bool) -> str:
    """The export's README.md: what the files are and the nnU-Net v2 command sequence (DESIGN.md section 9)."""
    fp = nnunet_fingerprint.FILE_NAME
    lines = [
        f"# {folder_name}: an nnU-Net v2 raw dataset",
        "",
        description,
        "",
        "- `dataset.json`: nnU-Net's dataset description; its `crowdsam` entry records where every case came",
        "  from (volume, segmentation, known slices).",
        "- `imagesTr/`, `labelsTr/`: training cases. `imagesTs/` holds the test images; `labelsTs/` holds their",
        "  references (for evaluation; nnU-Net does not read this folder).",
    ]
    if with_ignore:
        lines += [
            "- Slices that no annotator prompted or saw carry the `ignore` label (the highest value): nnU-Net",
            "  does not train on them.",
        ]
    if with_fingerprint:
        lines += [
            f"- `{fp}`: nnU-Net's dataset fingerprint computed with the `ignore` label left out of the",
            "  foreground.",
        ]
    lines += ["", "## Training with nnU-Net v2", "", "```bash",
              "export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed \\",
              "       nnUNet_results=/data/nnUNet_results",
              f'cp -r {folder_name} "$nnUNet_raw/"']
    if with_fingerprint:
        lines += [f'mkdir -p "$nnUNet_preprocessed/{folder_name}"',
                  f'cp {folder_name}/{fp} "$nnUNet_preprocessed/{folder_name}/"',
                  f"nnUNetv2_plan_and_preprocess -d {number} --verify_dataset_integrity   # never with --clean"]
    else:
        lines += [f"nnUNetv2_plan_and_preprocess -d {number} --verify_dataset_integrity"]
    lines += [f"nnUNetv2_train {number} 3d_fullres 0   # and folds 1-4", "```", ""]
    if with_fingerprint:
        lines += [
            "Why the fingerprint: nnU-Net v2 (2.8.1) normalises CT with statistics of the *foreground* voxels'",
            "intensities (`CTNormalization`: clip to their 0.5 and 99.5 percentiles, subtract their mean, divide",
            "by their standard deviation). Its fingerprint extractor counts every label above 0 as foreground,",
            "`ignore` included, so on this dataset it would compute those statistics mostly on air, fat and bone",
            "(MIC-DKFZ/nnUNet#3055). nnU-Net skips fingerprint extraction when",
            f"`$nnUNet_preprocessed/{folder_name}/{fp}` exists and `--clean` is not given, and the planner",
            "copies the fingerprint's `foreground_intensity_properties_per_channel` into the plans that",
            "preprocessing and inference normalise with. The shipped file repeats nnU-Net's computation",
            "step for step (same cropping, sampling, seed and statistics) with `ignore` excluded; spacings",
            "and shapes are the ones nnU-Net computes.",
            "",
            "Check after planning: `foreground_intensity_properties_per_channel` in",
            f"`$nnUNet_preprocessed/{folder_name}/nnUNetPlans.json` (or the plans of any other planner, `-pl`)",
            f"equals the one in `{fp}`. Running `nnUNetv2_extract_fingerprint` or",
            "`nnUNetv2_plan_and_preprocess --clean` replaces the file with statistics that include `ignore`;",
            "if you add or change cases, export the dataset again instead.",
            "",
        ]
    elif with_ignore:
        lines += ["No train case has a labelled organ voxel, so no fingerprint is shipped: nnU-Net would",
                  "normalise on `ignore` voxels only. Label some slices first.", ""]
    return "\n".join(lines)


def _write_case(folder: Path, case: CaseInput, mapping: LabelMapping) -> dict[str, Any]:
    train = case.split == "train"
    image_target = folder / ("imagesTr" if train else "imagesTs") / f"{case.case_id}_0000{FILE_ENDING}"
    copy_image_gz(case.image_path, image_target)
    info: dict[str, Any] = {"split": case.split}
    if case.labels is None:
        if train:
            raise ValueError(f"train case {case.case_id!r} has no labels")
        return info
    image: Any = nib.load(str(image_target))
    labels = mapping.to_export(case.labels)
    if mapping.ignore_value is not None and case.known_slices is not None:
        orientation = Orientation.from_affine(image.affine, image.shape[:3])
        unknown = unknown_slice_mask(orientation, case.known_slices)
        labels[unknown] = mapping.ignore_value
        n_slices = orientation.canonical_shape[2]
        info["known_slices"] = sorted({int(k) for k in case.known_slices if 0 <= int(k) < n_slices})
        info["ignored_slices"] = n_slices - len(info["known_slices"])
    label_dir = folder / ("labelsTr" if train else "labelsTs")
    label_dir.mkdir(exist_ok=True)
    save_label_map(labels, image, label_dir / f"{case.case_id}{FILE_ENDING}")
    return info


def manifest(folder: Path) -> list[dict[str, Any]]:
    """Every file under ``folder`` (paths relative to its parent), with size and sha256, sorted."""
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rows.append({
            "path": path.relative_to(folder.parent).as_posix(),
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        })
    return rows


def make_archive(folder: Path, target: Path) -> None:
    """``.tar.gz`` of ``folder`` (top-level entry = the dataset folder), deterministic member order."""
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=folder.name, recursive=False)
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder.parent).as_posix(), recursive=False)
