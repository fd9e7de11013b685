"""End to end with the real model: simulated crowd → LiteMedSAM segmentation job → ignore export → evaluation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.test_evaluation import finished as finished_evaluation
from tests.test_export import extract_archive, finished_export, verify_with_nnunet


@pytest.mark.model
def test_litemedsam_segmentation_exports_with_ignore_and_evaluates(client, tokens, dataset, sm_volume,  # type: ignore[no-untyped-def]
                                                                   run_jobs, tmp_path):
    from app.imaging.coords import Orientation

    H = tokens.headers("researcher")
    vid = sm_volume["id"]
    sim = client.post(f"/api/v1/volumes/{vid}/prompts/simulate",
                      json={"annotators": 3, "coverage": 0.5, "jitter": 0.05, "seed": 7}, headers=H)
    assert sim.status_code == 201, sim.text
    seg = client.post(f"/api/v1/volumes/{vid}/segmentations", json={"model": "litemedsam"}, headers=H)
    assert seg.status_code == 202, seg.text
    run_jobs("sam")
    seg_out = client.get(f"/api/v1/segmentations/{seg.json()['id']}", headers=H).json()
    assert seg_out["status"] == "finished", seg_out

    export = finished_export(client, tokens, run_jobs, dataset["id"], label_source="segmentation",
                             model="litemedsam", unprompted="ignore", dataset_number=503)
    folder = extract_archive(client, tokens, export, tmp_path)
    meta = json.loads((folder / "dataset.json").read_text())
    info = meta["crowdsam"]["cases"]["sm"]
    assert info["segmentation_id"] == seg.json()["id"]
    known = info["known_slices"]
    assert 0 < len(known) < sm_volume["n_slices"] and info["ignored_slices"] == sm_volume["n_slices"] - len(known)
    labels = np.asarray(nib.load(str(folder / "labelsTr" / "sm.nii.gz")).dataobj)
    canonical = np.asarray(Orientation.from_affine(sm_volume["affine"], sm_volume["shape"]).canonical(labels))
    for k in range(canonical.shape[2]):
        assert np.all(canonical[:, :, k] == 6) == (k not in known)
    assert set(np.unique(canonical[:, :, known])) <= {0, 1, 2, 3, 4, 5} and (canonical == 4).any()
    verify_with_nnunet(folder)

    out = finished_evaluation(client, tokens, run_jobs, client.post(
        f"/api/v1/datasets/{dataset['id']}/evaluations", json={"source": "segmentation", "model": "litemedsam"},
        headers=H))
    liver = out["result"]["cases"][0]["metrics"]["liver"]
    # LiteMedSAM with tight boxes reaches ~0.9 per slice on example_ct_sm (data/README.md)
    assert liver["slice_dice_mean"] > 0.85
    assert liver["Dice_known_slices"] > liver["Dice"]
