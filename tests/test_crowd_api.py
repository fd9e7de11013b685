"""Crowd votes through the API: silent viewers vote "absent" in the fused mask, and the dataset's
annotator report (GET /datasets/{id}/annotators) with Dawid–Skene reliability and reference scores."""

from __future__ import annotations

import numpy as np
import pytest

from app.imaging.coords import Orientation
from tests.conftest import CT_DIR
from tests.segmentation_helpers import ORGANS, canonical_reference, load_mask, post_boxes, reference_boxes

pytestmark = pytest.mark.model
SM_REF = CT_DIR / "example_seg.nii.gz"


def _third_annotator(client, tokens, dataset_id: int) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope

    with session_scope() as session:
        token = create_token(session, "annotator3", Role.annotator)[1]
        session.commit()
    added = client.put(f"/api/v1/datasets/{dataset_id}/members/annotator3", headers=tokens.headers("researcher"))
    assert added.status_code in (200, 201), added.text
    return {"Authorization": f"Bearer {token}"}


def test_silence_counts_and_the_annotator_report(client, tokens, dataset, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    vid, did = sm_volume["id"], dataset["id"]
    third = _third_annotator(client, tokens, did)
    ref = canonical_reference(SM_REF)
    organs = {n: ORGANS[n] for n in ("liver", "spleen")}
    both = reference_boxes(ref, organs, [8, 9])
    post_boxes(client, tokens.headers("annotator"), vid, both)  # liver + spleen on 8 and 9
    post_boxes(client, tokens.headers("annotator2"), vid, [b for b in both if b["slice"] == 8])
    for headers in (tokens.headers("annotator2"), third):  # saw 8 and 9; annotator3 drew nothing at all
        seen = client.post(f"/api/v1/volumes/{vid}/prompts", json={"seen": [8, 9]}, headers=headers)
        assert seen.status_code == 201, seen.text

    sid = client.post(f"/api/v1/volumes/{vid}/segmentations", json={"labels": ["liver", "spleen"]},
                      headers=tokens.headers("researcher")).json()["id"]
    assert run_jobs() is True
    seg = client.get(f"/api/v1/segmentations/{sid}", headers=tokens.headers("researcher")).json()
    assert seg["status"] == "finished", seg
    assert seg["stats"]["per_slice"]["9"]["liver"]["annotators"] == ["annotator", "annotator2", "annotator3"]
    assert seg["stats"]["per_slice"]["9"]["liver"]["drew"] == ["annotator"]
    mask = load_mask(client.get(f"/api/v1/segmentations/{sid}/mask", headers=tokens.headers("researcher")).content)
    canonical = Orientation.from_affine(mask.affine, mask.shape).canonical(np.asarray(mask.dataobj))
    assert (canonical[:, :, 8] == ORGANS["liver"]).sum() > 100  # two of three drew it
    assert not canonical[:, :, 9].any()  # one of three drew it: outvoted by the two who saw nothing

    assert client.get(f"/api/v1/datasets/{did}/annotators", headers=tokens.headers("annotator")).status_code == 403
    response = client.get(f"/api/v1/datasets/{did}/annotators", headers=tokens.headers("researcher"))
    assert response.status_code == 200, response.text
    report = {a["annotator"]: a for a in response.json()}
    assert sorted(report) == ["annotator", "annotator2", "annotator3"]
    labels = len(dataset["labels"])
    assert [report[a]["slices_seen"] for a in sorted(report)] == [2, 2, 2]
    assert [report[a]["votes"] for a in sorted(report)] == [2 * labels] * 3
    assert report["annotator"]["boxes"] == len(both) and report["annotator3"]["boxes"] == 0
    assert report["annotator"]["present_votes"] == 4 and report["annotator3"]["present_votes"] == 0
    assert report["annotator"]["sensitivity"] > report["annotator3"]["sensitivity"]
    assert report["annotator"]["agreement"] is not None and report["annotator"]["agreement_items"] == 4
    assert report["annotator3"]["agreement"] > 0  # agreed with "absent" on slice 9
    # tight reference boxes: the first annotator matches the reference on the liver/spleen items exactly
    assert report["annotator"]["reference_box_dice"] > report["annotator2"]["reference_box_dice"]
    assert report["annotator3"]["reference_box_dice"] < 0.5

    weighted = client.post(f"/api/v1/volumes/{vid}/segmentations", json={"fusion": "weighted"},
                           headers=tokens.headers("researcher"))
    assert weighted.status_code == 202, weighted.text
    assert run_jobs() is True
    done = client.get(f"/api/v1/segmentations/{weighted.json()['id']}", headers=tokens.headers("researcher")).json()
    assert done["status"] == "finished" and done["fusion"] == "weighted"
