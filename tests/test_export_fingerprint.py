"""An ``ignore`` export makes nnU-Net v2 normalise CT on organ voxels only (issue 12 item 4).

nnU-Net 2.8.1 counts the ``ignore`` label as foreground when it collects intensities for its fingerprint
(``DatasetFingerprintExtractor.collect_foreground_intensities``: ``segmentation > 0``). The export ships
``dataset_fingerprint.json`` computed with ``ignore`` excluded; its README's command sequence puts it in
``$nnUNet_preprocessed`` before ``nnUNetv2_plan_and_preprocess`` (without ``--clean``), which then skips
extraction. Checked here with nnunetv2 itself, run through its own entry points in fresh interpreters:
the intensity statistics in the plans nnU-Net makes for the ``ignore`` export equal those nnU-Net computes
for the ``background`` export of the same segmentation (the same organ voxels: unknown slices have no mask
there), and nnU-Net's own extraction on the ``ignore`` export would have been far off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CT_DIR
from tests.helpers_exporteval import add_finished_segmentation, upload_case
from tests.test_export import extract_archive, finished_export

STATS = ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")

ENTRY = """
import sys
from nnunetv2.experiment_planning import plan_and_preprocess_entrypoints as e
getattr(e, sys.argv.pop(1))()
"""


def nnunet(entry: str, *args: str, root: Path, preprocessed: Path) -> subprocess.Popen[str]:
    """One of nnU-Net's console entry points (``nnUNetv2_plan_and_preprocess`` = plan_and_preprocess_entry,
    ``nnUNetv2_extract_fingerprint`` = extract_fingerprint_entry) in a fresh interpreter."""
    env = {**os.environ, "nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(root / "nnUNet_results")}
    return subprocess.Popen([sys.executable, "-c", ENTRY, entry, *args, "--no_pbar"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen[str]) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-4000:]
    return out


def intensity(fingerprint_or_plans: dict) -> dict[str, float]:  # type: ignore[type-arg]
    return dict(fingerprint_or_plans["foreground_intensity_properties_per_channel"]["0"])


@pytest.mark.slow
def test_ignore_export_makes_nnunet_normalise_on_organ_voxels_only(client, tokens, dataset, run_jobs,  # type: ignore[no-untyped-def]
                                                                    tmp_path):
    did = dataset["id"]
    volume = upload_case(client, tokens, did, "ct", CT_DIR / "example_ct.nii.gz",
                         CT_DIR / "example_seg_fast_force_split.nii.gz")
    assert volume["n_slices"] == 112
    # 32 of 112 slices known: 30 prompted organ slices (organs lie on k = 61..111) and two organ-free slices
    # seen with nothing drawn ("none of these organs here")
    seen = client.post(f"/api/v1/volumes/{volume['id']}/prompts", json={"seen": [20, 40]},
                       headers=tokens.headers("researcher"))
    assert seen.status_code == 201, seen.text
    add_finished_segmentation(volume["id"], prompted=list(range(66, 96)))
    raw = tmp_path / "nnUNet_raw"
    ignore = extract_archive(client, tokens, finished_export(
        client, tokens, run_jobs, did, label_source="segmentation", unprompted="ignore", dataset_number=521,
        dataset_name="Ignore"), raw)
    background = extract_archive(client, tokens, finished_export(
        client, tokens, run_jobs, did, label_source="segmentation", unprompted="background", dataset_number=522,
        dataset_name="Background"), raw)

    meta = json.loads((ignore / "dataset.json").read_text())
    assert meta["labels"]["ignore"] == 6
    assert meta["crowdsam"]["cases"]["ct"]["known_slices"] == [20, 40, *range(66, 96)]
    shipped_bytes = (ignore / "dataset_fingerprint.json").read_bytes()
    shipped = json.loads(shipped_bytes)
    assert meta["crowdsam"]["fingerprint"]["foreground_intensity_properties"] == intensity(shipped)
    readme = (ignore / "README.md").read_text()
    assert 'cp Dataset521_Ignore/dataset_fingerprint.json "$nnUNet_preprocessed/Dataset521_Ignore/"' in readme
    assert "nnUNetv2_plan_and_preprocess -d 521 --verify_dataset_integrity   # never with --clean" in readme
    assert not (background / "dataset_fingerprint.json").exists() and (background / "README.md").exists()
    assert "nnUNetv2_plan_and_preprocess -d 522 --verify_dataset_integrity" in (background / "README.md").read_text()

    # nnU-Net on its own: the background export (planned from scratch) and, for the record, its fingerprint of
    # the ignore export, as `nnUNetv2_extract_fingerprint --clean` would compute it (in another folder)
    pre, naive_pre = tmp_path / "nnUNet_preprocessed", tmp_path / "naive_preprocessed"
    runs = [nnunet("plan_and_preprocess_entry", "-d", "522", "-npfp", "1", "--no_pp", root=tmp_path,
                   preprocessed=pre),
            nnunet("extract_fingerprint_entry", "-d", "521", "-np", "1", "--clean", root=tmp_path,
                   preprocessed=naive_pre)]
    # the README's sequence for the ignore export (preprocessing itself skipped: --no_pp)
    (pre / ignore.name).mkdir(parents=True)
    shutil.copy(ignore / "dataset_fingerprint.json", pre / ignore.name / "dataset_fingerprint.json")
    runs.append(nnunet("plan_and_preprocess_entry", "-d", "521", "-npfp", "1", "--no_pp",
                       "--verify_dataset_integrity", root=tmp_path, preprocessed=pre))
    for run in runs:
        finish(run)

    assert (pre / ignore.name / "dataset_fingerprint.json").read_bytes() == shipped_bytes  # not re-extracted
    plans_ignore = json.loads((pre / ignore.name / "nnUNetPlans.json").read_text())
    plans_background = json.loads((pre / background.name / "nnUNetPlans.json").read_text())
    fp_background = json.loads((pre / background.name / "dataset_fingerprint.json").read_text())
    naive = intensity(json.loads((naive_pre / ignore.name / "dataset_fingerprint.json").read_text()))
    used, reference = intensity(plans_ignore), intensity(plans_background)
    print("\nnnU-Net's normalisation statistics (HU):")
    for name, stats in (("ignore export, nnU-Net alone (before)", naive), ("ignore export, shipped", used),
                        ("background export, nnU-Net alone", reference)):
        print(f"  {name:40s} " + " ".join(f"{k}={stats[k]:.1f}" for k in STATS))

    assert used == intensity(shipped)  # the plans normalise with the shipped statistics
    for key in STATS:  # ... which are those of the organ voxels, as the background export has them
        assert used[key] == pytest.approx(reference[key], rel=0.01), key
    # the rest of the fingerprint is nnU-Net's own too: the same plans geometry
    for key in ("spacings", "shapes_after_crop", "median_relative_size_after_cropping"):
        assert shipped[key] == fp_background[key], key
    for config in ("2d", "3d_fullres"):
        for key in ("spacing", "patch_size", "batch_size", "normalization_schemes"):
            assert plans_ignore["configurations"][config][key] == plans_background["configurations"][config][key]
    assert plans_ignore["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    # without the shipped file nnU-Net would normalise on air, fat and bone of the unknown slices
    assert naive["percentile_00_5"] < -900 and abs(naive["mean"] - reference["mean"]) > 200
    assert np.isfinite(list(used.values())).all()
