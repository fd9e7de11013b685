"""Segmentation API: models, requests and their validation, status, cancel, masks, overlays, roles.

Jobs run on a real in-process RQ SimpleWorker (``run_jobs``) with the real LiteMedSAM weights.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from rq.job import Job

from app.core.config import get_settings
from app.core.redis import get_redis
from app.imaging.coords import Orientation, display_slice
from app.imaging.palette import label_color
from tests.conftest import CT_DIR
from tests.segmentation_helpers import (
    ORGANS,
    canonical_reference,
    load_mask,
    png_array,
    post_boxes,
    reference_boxes,
    sha256,
)

SM_REF = CT_DIR / "example_seg.nii.gz"


def _boxes(slices: list[int], labels: tuple[str, ...] = ("liver", "spleen")) -> list[dict]:  # type: ignore[type-arg]
    ref = canonical_reference(SM_REF)
    return reference_boxes(ref, {n: ORGANS[n] for n in labels}, slices)


def _segment(client, tokens, volume_id: int, **body):  # type: ignore[no-untyped-def]
    return client.post(f"/api/v1/volumes/{volume_id}/segmentations", json=body, headers=tokens.headers("researcher"))


def _get(client, tokens, sid: int) -> dict:  # type: ignore[no-untyped-def,type-arg]
    response = client.get(f"/api/v1/segmentations/{sid}", headers=tokens.headers("researcher"))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# --- models -----------------------------------------------------------------------------------
def test_models_come_from_the_registry_and_say_why_one_is_unavailable(client, tokens) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/api/v1/models").status_code == 401
    response = client.get("/api/v1/models", headers=tokens.headers("annotator"))
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()}
    assert list(models) == ["litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"]
    assert models["litemedsam"]["available"] is True and models["litemedsam"]["reason"] is None
    assert models["sam_vit_h"]["available"] is False
    assert "sam_vit_h_4b8939.pth" in models["sam_vit_h"]["reason"]
    assert models["medsam"]["family"] == "medsam"


# --- requests and validation ------------------------------------------------------------------
def test_requests_are_validated_with_reasons(client, tokens, sm_volume) -> None:  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    no_prompts = _segment(client, tokens, vid)
    assert no_prompts.status_code == 422 and "no prompts" in no_prompts.json()["detail"]
    post_boxes(client, tokens.headers("annotator"), vid, _boxes([10]))

    unknown = _segment(client, tokens, vid, model="sam_vit_z")
    assert unknown.status_code == 422 and "unknown model" in unknown.json()["detail"]
    unavailable = _segment(client, tokens, vid, model="sam_vit_h")
    assert unavailable.status_code == 409
    assert "sam_vit_h_4b8939.pth" in unavailable.json()["detail"]
    bad_label = _segment(client, tokens, vid, labels=["liver", "pancreas"])
    assert bad_label.status_code == 422 and "pancreas" in bad_label.json()["detail"]
    unprompted_label = _segment(client, tokens, vid, labels=["aorta"])
    assert unprompted_label.status_code == 422 and "no prompts" in unprompted_label.json()["detail"]
    assert _segment(client, tokens, vid, labels=[]).status_code == 422
    assert _segment(client, tokens, vid, fusion="mean").status_code == 422
    assert _segment(client, tokens, 9999).status_code == 404
    forbidden = client.post(f"/api/v1/volumes/{vid}/segmentations", json={}, headers=tokens.headers("annotator"))
    assert forbidden.status_code == 403
    assert get_redis().llen("rq:queue:sam") == 0  # nothing was enqueued by a rejected request


def test_queued_segmentation_can_be_listed_and_canceled(client, tokens, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    post_boxes(client, tokens.headers("annotator"), vid, _boxes([10, 11, 12]))
    first = _segment(client, tokens, vid)
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["status"] == "queued"
    assert body["progress"] == {"done": 0, "total": 3}
    assert body["labels"] == ["liver", "spleen"] and body["model"] == "litemedsam" and body["fusion"] == "majority"
    assert body["mask_url"] is None and body["created_by"] == "researcher"
    job = Job.fetch(f"segmentation-{body['id']}", connection=get_redis())
    assert job.func_name == "workers.jobs.segment.run_segmentation" and job.args == (body["id"],)
    assert job.timeout == get_settings().job_timeout_s
    assert job.retries_left == 3 and job.retry_intervals == [5, 30, 120]

    second = _segment(client, tokens, vid, fusion="staple", labels=["liver"]).json()
    assert second["progress"]["total"] == 3 and second["labels"] == ["liver"]
    listed = client.get(f"/api/v1/volumes/{vid}/segmentations", headers=tokens.headers("researcher")).json()
    assert [s["id"] for s in listed] == [second["id"], body["id"]]

    canceled = client.post(f"/api/v1/segmentations/{body['id']}/cancel", headers=tokens.headers("researcher"))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    again = client.post(f"/api/v1/segmentations/{body['id']}/cancel", headers=tokens.headers("researcher"))
    assert again.status_code == 409 and "already canceled" in again.json()["detail"]
    no_mask = client.get(f"/api/v1/segmentations/{body['id']}/mask", headers=tokens.headers("researcher"))
    assert no_mask.status_code == 409
    # Even if its RQ job were still dequeued, the job sees the row and does nothing.
    from workers.jobs.segment import run_segmentation

    assert run_segmentation(body["id"])["status"] == "skipped"
    assert _get(client, tokens, body["id"])["status"] == "canceled"
    assert client.get("/api/v1/segmentations/9999", headers=tokens.headers("researcher")).status_code == 404


def test_dataset_request_makes_one_job_per_volume_with_prompts(client, tokens, dataset, sm_volume) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import upload

    other = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", case_id="other").json()
    url = f"/api/v1/datasets/{dataset['id']}/segmentations"
    empty = client.post(url, json={}, headers=tokens.headers("researcher"))
    assert empty.status_code == 422 and "no volume" in empty.json()["detail"]
    post_boxes(client, tokens.headers("annotator"), sm_volume["id"], _boxes([5]))
    response = client.post(url, json={"model": "litemedsam"}, headers=tokens.headers("researcher"))
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body["ids"]) == 1 and body["skipped"] == [other["id"]]
    assert _get(client, tokens, body["ids"][0])["volume_id"] == sm_volume["id"]
    assert client.post(url, json={"labels": ["nope"]}, headers=tokens.headers("researcher")).status_code == 422
    assert client.post(url, json={}, headers=tokens.headers("annotator")).status_code == 403
    assert client.post("/api/v1/datasets/999/segmentations", json={},
                       headers=tokens.headers("researcher")).status_code == 404


# --- a finished segmentation ------------------------------------------------------------------
@pytest.mark.model
def test_finished_mask_download_etag_label_and_overlays(client, tokens, sm_volume, run_jobs) -> None:  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    slices = [8, 9]
    post_boxes(client, tokens.headers("annotator"), vid, _boxes(slices))
    sid = _segment(client, tokens, vid).json()["id"]
    assert run_jobs() is True
    seg = _get(client, tokens, sid)
    assert seg["status"] == "finished", seg
    assert seg["progress"] == {"done": 2, "total": 2} and seg["attempts"] == 1 and seg["error"] is None
    stats = seg["stats"]
    assert stats["prompted_slices"] == slices
    assert set(stats["per_slice"]) == {"8", "9"}
    assert set(stats["per_slice"]["8"]) == {"liver", "spleen"}
    assert stats["per_slice"]["8"]["liver"]["annotators"] == ["annotator"]
    assert stats["labels"] == {"liver": 5, "spleen": 1}
    assert {"encoder_s", "decoder_s", "total_s", "job_s", "assemble_s"} <= set(stats["timings"])
    assert seg["mask_url"] == f"/api/v1/segmentations/{sid}/mask"

    headers = tokens.headers("researcher")
    response = client.get(f"/api/v1/segmentations/{sid}/mask", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    assert sha256(response.content) == seg["mask_sha256"]
    etag = response.headers["etag"]
    assert etag == f'"{seg["mask_sha256"]}"'
    cached = client.get(f"/api/v1/segmentations/{sid}/mask", headers={**headers, "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    listed = client.get(f"/api/v1/segmentations/{sid}/mask", headers={**headers, "If-None-Match": f'"x", W/{etag}'})
    assert listed.status_code == 304
    stale = client.get(f"/api/v1/segmentations/{sid}/mask", headers={**headers, "If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.content == response.content

    image = nib.load(str(CT_DIR / "example_ct_sm.nii.gz"))
    mask = load_mask(response.content)
    assert mask.shape == image.shape
    assert np.allclose(mask.affine, image.affine)
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data)) == {0, 1, 5}
    canonical = Orientation.from_affine(image.affine, image.shape).canonical(data)
    unprompted = [k for k in range(canonical.shape[2]) if k not in slices]
    assert not canonical[:, :, unprompted].any()
    ref = canonical_reference(SM_REF)
    for k in slices:
        for value in (1, 5):
            pred, truth = canonical[:, :, k] == value, ref[:, :, k] == value
            assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.8

    liver = client.get(f"/api/v1/segmentations/{sid}/mask?label=liver", headers=headers)
    assert liver.status_code == 200 and liver.headers["etag"] != etag
    binary = np.asarray(load_mask(liver.content).dataobj)
    assert np.array_equal(binary, (data == 5).astype(np.uint8))
    assert np.allclose(load_mask(liver.content).affine, image.affine)
    assert client.get(f"/api/v1/segmentations/{sid}/mask?label=liver",
                      headers={**headers, "If-None-Match": liver.headers["etag"]}).status_code == 304
    assert client.get(f"/api/v1/segmentations/{sid}/mask?label=heart", headers=headers).status_code == 422

    k = 8
    display_mask = display_slice(canonical, k)
    overlay = client.get(f"/api/v1/segmentations/{sid}/slices/{k}.png", headers=headers)
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    rgb = png_array(overlay.content)
    assert rgb.shape == (*display_mask.shape, 3) == (sm_volume["display_size"][1], sm_volume["display_size"][0], 3)
    plain = png_array(client.get(f"/api/v1/volumes/{vid}/slices/{k}.png", headers=headers).content)
    assert np.array_equal(rgb[display_mask == 0], np.repeat(plain[display_mask == 0][:, None], 3, axis=1))
    assert not np.array_equal(rgb[display_mask == 5], np.repeat(plain[display_mask == 5][:, None], 3, axis=1))
    assert client.get(f"/api/v1/segmentations/{sid}/slices/{k}.png",
                      headers={**headers, "If-None-Match": overlay.headers["etag"]}).status_code == 304

    only_mask = png_array(client.get(f"/api/v1/segmentations/{sid}/slices/{k}.png?mode=mask&labels=spleen",
                                     headers=headers).content)
    assert only_mask.shape == (*display_mask.shape, 4)
    assert np.all(only_mask[display_mask != 1][:, 3] == 0)
    assert np.all(only_mask[display_mask == 1] == [*label_color(1), 255])
    every = png_array(client.get(f"/api/v1/segmentations/{sid}/slices/{k}.png?mode=mask", headers=headers).content)
    assert np.all(every[display_mask == 5] == [*label_color(5), 255])
    assert client.get(f"/api/v1/segmentations/{sid}/slices/{k}.png?labels=heart", headers=headers).status_code == 422
    assert client.get(f"/api/v1/segmentations/{sid}/slices/30.png", headers=headers).status_code == 404
    assert client.get(f"/api/v1/segmentations/{sid}/slices/{k}.png?mode=x", headers=headers).status_code == 422

    for url in (f"/api/v1/segmentations/{sid}", f"/api/v1/segmentations/{sid}/mask",
                f"/api/v1/segmentations/{sid}/mask?label=liver", f"/api/v1/segmentations/{sid}/slices/{k}.png",
                f"/api/v1/volumes/{vid}/segmentations"):
        assert client.get(url, headers=tokens.headers("annotator")).status_code == 403, url
        assert client.get(url).status_code == 401, url
    assert client.post(f"/api/v1/segmentations/{sid}/cancel", headers=tokens.headers("annotator")).status_code == 403
    done = client.post(f"/api/v1/segmentations/{sid}/cancel", headers=headers)
    assert done.status_code == 409 and "already finished" in done.json()["detail"]
