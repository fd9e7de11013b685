"""Embeddings ready before they are needed: task assignment and uploads queue low-priority pre-encoding
(queue ``preencode``), and a segmentation after the crowd's boxes then only decodes.

The dataset's window is unique to this module, so no other test's cached embeddings can make the
"encoded 0" below true by accident.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ABDOMEN_LABELS, CT_DIR, TOTALSEG_MAP, upload
from tests.segmentation_helpers import ORGANS, canonical_reference, post_boxes, reference_boxes

pytestmark = pytest.mark.model
WINDOW = {"level": 41.25, "width": 398.5}


@pytest.fixture
def annotated(client, tokens) -> dict:  # type: ignore[no-untyped-def]
    response = client.post(
        "/api/v1/datasets",
        json={"name": "preencode", "labels": ABDOMEN_LABELS, "window": WINDOW,
              "annotators": ["annotator", "annotator2"]},
        headers=tokens.headers("researcher"),
    )
    assert response.status_code == 201, response.text
    return response.json()


def _jobs(kind: str = "preencode") -> list[tuple[object, ...]]:
    from app.core.redis import get_queue

    return [tuple(job.args) for job in get_queue("preencode").get_jobs() if job.func_name.endswith(f".{kind}")]


def _results() -> list[dict[str, int]]:
    from rq.registry import FinishedJobRegistry

    from app.core.redis import get_queue

    queue = get_queue("preencode")
    return [queue.fetch_job(job_id).return_value() for job_id in FinishedJobRegistry(queue=queue).get_job_ids()]


def test_handed_out_slices_are_encoded_before_the_masks_are_asked_for(  # type: ignore[no-untyped-def]
        client, tokens, annotated, run_jobs) -> None:
    from app.segmentations import preencode

    did = annotated["id"]
    volume = upload(client, tokens, did, CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                    case_id="sm", reference_map=json.dumps(TOTALSEG_MAP), reference_other="background").json()
    assert _jobs() == []  # nobody annotates this dataset yet: nothing to warm

    task = client.get(f"/api/v1/tasks/next?dataset={did}", headers=tokens.headers("annotator")).json()
    assert _jobs() == [(volume["id"], [task["slice"]], "litemedsam")]
    again = client.get(f"/api/v1/tasks/next?dataset={did}", headers=tokens.headers("annotator")).json()
    assert again["slice"] == task["slice"] and len(_jobs()) == 1  # the same lease: not queued twice
    assert run_jobs("preencode") is True and _results() == [{"requested": 1, "encoded": 1}]

    # the organ slices the crowd is given next (what tasks/next calls), then its boxes, then the request
    organ_slices = [12, 13]
    assert preencode.request(volume["id"], organ_slices) == 2
    assert preencode.request(volume["id"], organ_slices) == 0  # requested recently
    assert run_jobs("preencode") is True
    ref = canonical_reference(CT_DIR / "example_seg.nii.gz")
    boxes = reference_boxes(ref, {"liver": ORGANS["liver"]}, organ_slices)
    post_boxes(client, tokens.headers("annotator"), volume["id"], boxes[:1])
    post_boxes(client, tokens.headers("annotator"), volume["id"], boxes[1:])
    assert _jobs("predecode") == [(volume["id"], "litemedsam")]  # one waiting job per volume, not per post

    def segment() -> dict:  # type: ignore[type-arg]
        sid = client.post(f"/api/v1/volumes/{volume['id']}/segmentations", json={"labels": ["liver"]},
                          headers=tokens.headers("researcher")).json()["id"]
        assert run_jobs("sam") is True
        seg = client.get(f"/api/v1/segmentations/{sid}", headers=tokens.headers("researcher")).json()
        assert seg["status"] == "finished", seg
        return seg["stats"]  # type: ignore[no-any-return]

    assert run_jobs("preencode") is True  # the boxes are decoded while the crowd draws
    stats = segment()
    assert (stats["encoded"], stats["decoded"]) == (0, 0)  # the request only fuses
    assert stats["timings"]["decoder_s"] == 0 and sorted(stats["per_slice"]) == ["12", "13"]

    # a late box: the next job decodes only it; the request again needs no model
    late = {**boxes[0], "box": [boxes[0]["box"][0] + 1, *boxes[0]["box"][1:]]}
    post_boxes(client, tokens.headers("annotator2"), volume["id"], [late])
    assert run_jobs("preencode") is True
    stats = segment()
    assert (stats["encoded"], stats["decoded"]) == (0, 0)

    # a volume uploaded into a dataset being annotated: all its slices are queued at once
    second = upload(client, tokens, did, CT_DIR / "example_ct_sm.nii.gz", case_id="sm2").json()
    assert (second["id"], list(range(second["n_slices"])), "litemedsam") in _jobs()


def test_pre_encoding_can_be_switched_off(client, tokens, annotated, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.core.config import get_settings
    from app.segmentations import preencode

    monkeypatch.setenv("CROWDSAM_PREENCODE_MODELS", "")
    get_settings.cache_clear()
    try:
        assert preencode.request(1, [0, 1]) == 0 and _jobs() == []
    finally:
        monkeypatch.delenv("CROWDSAM_PREENCODE_MODELS")
        get_settings.cache_clear()
