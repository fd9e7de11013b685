"""Prompts API: validation (all-or-nothing), idempotent client ids, listing, deletion, coordinates."""

from __future__ import annotations

import json
import uuid

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from sqlalchemy import func, select

from app.core.db import session_scope
from app.imaging.coords import Orientation, display_box_to_canonical, display_slice, mask_bbox_display
from app.prompts.models import Prompt, SliceView
from tests.conftest import ABDOMEN_LABELS, CT_DIR, TOTALSEG_MAP, upload


def _post(client, tokens, volume_id, body, role="annotator"):  # type: ignore[no-untyped-def]
    return client.post(f"/api/v1/volumes/{volume_id}/prompts", json=body, headers=tokens.headers(role))


def _count(model) -> int:  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_post_boxes_points_and_seen(client, tokens, sm_volume):
    vid = sm_volume["id"]
    assert sm_volume["display_size"] == [122, 101]
    body = {
        "boxes": [{"slice": 10, "label": "liver", "box": [5, 6, 50.5, 60]},
                  {"slice": 11, "label": "spleen", "box": [0, 0, 122, 101]}],
        "points": [{"slice": 10, "label": "liver", "point": [20, 30], "positive": False}],
        "seen": [12],
    }
    r = _post(client, tokens, vid, body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert len(out["ids"]) == 3 and out["duplicates"] == [] and out["seen"] == [10, 11, 12]
    listed = client.get(f"/api/v1/volumes/{vid}/prompts", headers=tokens.headers("annotator")).json()
    assert listed["total"] == 3
    by_id = {p["id"]: p for p in listed["items"]}
    first = by_id[out["ids"][0]]
    assert first["box"] == [5, 6, 50.5, 60] and first["kind"] == "box" and first["annotator"] == "annotator"
    assert first["source"] == "api" and first["point"] is None
    point = by_id[out["ids"][2]]
    assert point["point"] == [20, 30] and point["positive"] is False and point["box"] is None
    assert _count(SliceView) == 3


def test_invalid_items_are_all_reported_and_nothing_is_stored(client, tokens, sm_volume):
    vid = sm_volume["id"]
    body = {
        "boxes": [
            {"slice": 0, "label": "liver", "box": [1, 1, 10, 10]},           # fine
            {"slice": 30, "label": "liver", "box": [1, 1, 10, 10]},          # slice out of range
            {"slice": 1, "label": "brain", "box": [1, 1, 10, 10]},           # unknown label
            {"slice": 1, "label": "liver", "box": [1, 1, 123, 10]},          # outside (W = 122)
            {"slice": 1, "label": "liver", "box": [10, 1, 10, 10]},          # zero width
            {"slice": 1, "label": "liver", "box": [1, 2, 3]},                # arity
            {"slice": 1, "label": "liver", "box": [1, 1, 10, 102]},          # outside (H = 101)
        ],
        "points": [{"slice": 1, "label": "liver", "point": [-1, 5]}],
        "seen": [-1],
    }
    r = _post(client, tokens, vid, body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    locs = [tuple(d["loc"]) for d in detail]
    assert ("boxes", 1, "slice") in locs and ("boxes", 2, "label") in locs
    assert {("boxes", i, "box") for i in (3, 4, 5, 6)} <= set(locs)
    assert ("points", 0, "point") in locs and ("seen", 0) in locs
    assert ("boxes", 0, "box") not in locs and ("boxes", 0, "slice") not in locs
    assert any("zero or negative area" in d["msg"] for d in detail)
    assert _count(Prompt) == 0 and _count(SliceView) == 0


def test_nan_and_infinity_are_rejected(client, tokens, sm_volume):
    raw = '{"boxes": [{"slice": 1, "label": "liver", "box": [NaN, 1, 10, 10]}, ' \
          '{"slice": 1, "label": "liver", "box": [1, 1, Infinity, 10]}]}'
    r = client.post(f"/api/v1/volumes/{sm_volume['id']}/prompts", content=raw,
                    headers={**tokens.headers("annotator"), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert _count(Prompt) == 0


def test_client_id_makes_retries_idempotent(client, tokens, sm_volume):
    vid = sm_volume["id"]
    ids = [str(uuid.uuid4()) for _ in range(3)]
    body = {"boxes": [{"slice": 5, "label": "liver", "box": [1, 1, 10 + i, 10], "client_id": c}
                      for i, c in enumerate(ids)]}
    first = _post(client, tokens, vid, body).json()
    again = _post(client, tokens, vid, body)
    assert again.status_code == 201
    assert again.json()["ids"] == first["ids"] and sorted(again.json()["duplicates"]) == sorted(first["ids"])
    # a partial retry: one old, one new
    mixed = {"boxes": [body["boxes"][1], {"slice": 6, "label": "liver", "box": [1, 1, 5, 5],
                                          "client_id": str(uuid.uuid4())}]}
    out = _post(client, tokens, vid, mixed).json()
    assert out["ids"][0] == first["ids"][1] and out["duplicates"] == [first["ids"][1]]
    # the same client_id is another annotator's own key
    other = _post(client, tokens, vid, body, role="annotator2").json()
    assert set(other["ids"]).isdisjoint(first["ids"]) and other["duplicates"] == []
    assert _count(Prompt) == 7
    # repeated within one request → 422
    dup = {"boxes": [body["boxes"][0], body["boxes"][0]]}
    assert _post(client, tokens, vid, dup).status_code == 422


def test_bulk_post_of_thousands(client, tokens, sm_volume):
    vid = sm_volume["id"]
    rng = np.random.default_rng(0)
    boxes = []
    for i in range(3000):
        x0, y0 = rng.uniform(0, 100), rng.uniform(0, 80)
        boxes.append({"slice": i % 30, "label": "liver", "box": [x0, y0, x0 + 10, y0 + 10],
                      "client_id": str(uuid.UUID(int=i + 1))})
    r = _post(client, tokens, vid, {"boxes": boxes})
    assert r.status_code == 201, r.text
    assert len(set(r.json()["ids"])) == 3000
    r2 = _post(client, tokens, vid, {"boxes": boxes})
    assert r2.json()["ids"] == r.json()["ids"] and len(r2.json()["duplicates"]) == 3000
    assert _count(Prompt) == 3000
    with session_scope() as session:
        row = session.scalar(select(Prompt).where(Prompt.client_id == uuid.UUID(int=1234)))
        assert row is not None and [row.x0, row.y0, row.x1, row.y1] == boxes[1233]["box"]


def test_list_filters_pagination_and_privacy(client, tokens, sm_volume):
    vid = sm_volume["id"]
    _post(client, tokens, vid, {"boxes": [{"slice": k, "label": lab, "box": [1, 1, 9, 9]}
                                          for k in range(4) for lab in ("liver", "spleen")]})
    _post(client, tokens, vid, {"boxes": [{"slice": 0, "label": "liver", "box": [2, 2, 9, 9]}],
                                "points": [{"slice": 0, "label": "liver", "point": [3, 3]}]}, role="annotator2")
    get = lambda q, role="researcher": client.get(f"/api/v1/volumes/{vid}/prompts?{q}",  # noqa: E731
                                                  headers=tokens.headers(role)).json()
    assert get("")["total"] == 10
    assert get("slice=0")["total"] == 4
    assert get("slice=0&label=liver&kind=box")["total"] == 2
    assert get("kind=point")["total"] == 1
    assert get("annotator=annotator2")["total"] == 2
    page = get("limit=3&offset=3")
    assert page["limit"] == 3 and page["offset"] == 3 and len(page["items"]) == 3
    ids = [p["id"] for p in get("limit=100")["items"]]
    assert ids == sorted(ids) and [p["id"] for p in page["items"]] == ids[3:6]
    # annotators see only their own
    own = get("", role="annotator2")
    assert own["total"] == 2 and {p["annotator"] for p in own["items"]} == {"annotator2"}
    r = client.get(f"/api/v1/volumes/{vid}/prompts?annotator=annotator", headers=tokens.headers("annotator2"))
    assert r.status_code == 403


def test_delete_own_or_as_researcher(client, tokens, sm_volume):
    vid = sm_volume["id"]
    mine = _post(client, tokens, vid, {"boxes": [{"slice": 1, "label": "liver", "box": [1, 1, 9, 9]}] * 1}).json()
    theirs = _post(client, tokens, vid, {"boxes": [{"slice": 1, "label": "liver", "box": [1, 1, 9, 9]}]},
                   role="annotator2").json()
    r = client.delete(f"/api/v1/prompts/{theirs['ids'][0]}", headers=tokens.headers("annotator"))
    assert r.status_code == 403
    assert client.delete(f"/api/v1/prompts/{mine['ids'][0]}", headers=tokens.headers("annotator")).status_code == 204
    assert client.delete(f"/api/v1/prompts/{mine['ids'][0]}", headers=tokens.headers("annotator")).status_code == 404
    assert client.delete(f"/api/v1/prompts/{theirs['ids'][0]}", headers=tokens.headers("researcher")).status_code == 204
    assert _count(Prompt) == 0
    assert _count(SliceView) == 2  # deleting a prompt does not unsee the slice


def test_unknown_volume_and_missing_token(client, tokens, sm_volume):
    body = {"boxes": [{"slice": 1, "label": "liver", "box": [1, 1, 9, 9]}]}
    assert _post(client, tokens, 999, body).status_code == 404
    assert client.post(f"/api/v1/volumes/{sm_volume['id']}/prompts", json=body).status_code == 401
    assert _post(client, tokens, sm_volume["id"], {}).status_code == 422


def _reoriented(tmp_path, codes: str):  # type: ignore[no-untyped-def]
    paths = []
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        img = nib.load(str(CT_DIR / name))
        transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(codes)))
        out = tmp_path / f"{codes}_{name}"
        nib.save(img.as_reoriented(transform), str(out))
        paths.append(out)
    return paths


def _liver_check(client, tokens, volume: dict, seg_path) -> tuple[int, tuple[float, ...]]:  # type: ignore[no-untyped-def]
    """Draw the display box around the liver on its largest slice; it must cover the liver on both grids."""
    img = nib.load(str(seg_path))
    original = np.asarray(img.dataobj).astype(np.int32)
    orientation = Orientation.from_affine(img.affine, original.shape)
    canonical = orientation.canonical(original)
    liver = int(next(v for v, n in TOTALSEG_MAP.items() if n == "liver"))
    k = int(np.argmax((canonical == liver).sum(axis=(0, 1))))
    box = mask_bbox_display(display_slice(canonical, k) == liver)
    assert box is not None
    r = _post(client, tokens, volume["id"], {"boxes": [{"slice": k, "label": "liver", "box": list(box)}]})
    assert r.status_code == 201, r.text
    stored = client.get(f"/api/v1/volumes/{volume['id']}/prompts", headers=tokens.headers("annotator")).json()
    stored_box = stored["items"][0]["box"]
    i0, j0, i1, j1 = (int(v) for v in display_box_to_canonical(stored_box, canonical.shape))
    organ = canonical[:, :, k] == liver
    inside = np.zeros_like(organ)
    inside[i0:i1, j0:j1] = True
    assert organ.sum() > 100 and organ[inside].sum() == organ.sum()  # covers all of it
    assert organ[i0, j0:j1].any() and organ[i1 - 1, j0:j1].any()  # tightly
    # and back on the original grid of the uploaded file
    box3d = np.zeros(canonical.shape, dtype=bool)
    box3d[i0:i1, j0:j1, k] = True
    back = orientation.original(box3d)
    organ_original = orientation.original(np.where(box3d.any(axis=(0, 1))[None, None, :], canonical == liver, False))
    assert organ_original.sum() == organ.sum() and np.all(back[organ_original])
    # radiological display: the liver (patient's right) is in the left part of the image
    assert (box[0] + box[2]) / 2 < canonical.shape[0] / 2
    return k, box


def test_display_box_covers_organ_in_canonical_grid_ras_and_lps(client, tokens, dataset, tmp_path):
    ras = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                 case_id="ras", reference_map=json.dumps(TOTALSEG_MAP), reference_other="background")
    assert ras.status_code == 201, ras.text
    lps_image, lps_seg = _reoriented(tmp_path, "LPS")
    lps = upload(client, tokens, dataset["id"], lps_image, lps_seg, case_id="lps",
                 reference_map=json.dumps(TOTALSEG_MAP), reference_other="background")
    assert lps.status_code == 201, lps.text
    assert lps.json()["orientation"] == "LPS"
    k_ras, box_ras = _liver_check(client, tokens, ras.json(), CT_DIR / "example_seg.nii.gz")
    k_lps, box_lps = _liver_check(client, tokens, lps.json(), lps_seg)
    assert (k_ras, box_ras) == (k_lps, box_lps)  # same anatomy, same display, whatever the file's orientation
    assert set(ABDOMEN_LABELS) >= {"liver"}
