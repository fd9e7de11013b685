"""COCO JSON import/export of boxes: round trip, every rejection (nothing stored), auth."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select

from app.core.db import session_scope
from app.prompts.models import Prompt, SliceView
from tests.conftest import CT_DIR, TOTALSEG_MAP, upload


def _stored() -> tuple[int, int]:
    with session_scope() as session:
        return (int(session.scalar(select(func.count()).select_from(Prompt)) or 0),
                int(session.scalar(select(func.count()).select_from(SliceView)) or 0))


def _import(client, tokens, dataset_id, document: Any, annotator: str | None = "crowd",  # type: ignore[no-untyped-def]
            role: str = "researcher"):
    content = document if isinstance(document, bytes) else json.dumps(document).encode()
    data = {} if annotator is None else {"annotator": annotator}
    return client.post(f"/api/v1/datasets/{dataset_id}/prompts/coco",
                       files={"file": ("boxes.json", content, "application/json")}, data=data,
                       headers=tokens.headers(role))


def _export(client, tokens, volume_id: int, **params: str) -> dict[str, Any]:
    r = client.get(f"/api/v1/volumes/{volume_id}/prompts.coco.json", params=params,
                   headers=tokens.headers("researcher"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def _canonical(doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Images (case, slice, seen_by) and boxes (case, slice, label, annotator, bbox), ids left out."""
    images = {im["id"]: im for im in doc["images"]}
    names = {c["id"]: c["name"] for c in doc["categories"]}
    ims = sorted((im["crowdsam"]["case_id"], im["crowdsam"]["slice"], im["crowdsam"]["seen_by"])
                 for im in doc["images"])
    boxes = sorted((images[a["image_id"]]["crowdsam"]["case_id"], images[a["image_id"]]["crowdsam"]["slice"],
                    names[a["category_id"]], a["crowdsam"]["annotator"], [round(v, 6) for v in a["bbox"]])
                   for a in doc["annotations"])
    return ims, boxes


def test_round_trip_export_import_equals_boxes(client, tokens, dataset, sm_volume):  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    w, h = sm_volume["display_size"]
    posts = {
        "annotator": {"boxes": [{"slice": 3, "label": "liver", "box": [1.5, 2.25, 20.125, 30.0]},
                                {"slice": 3, "label": "spleen", "box": [0, 0, w, h]},
                                {"slice": 5, "label": "aorta", "box": [10, 10, 12, 14]}], "seen": [4]},
        "annotator2": {"boxes": [{"slice": 3, "label": "liver", "box": [2, 3, 21, 29]}], "seen": [6]},
    }
    for role, body in posts.items():
        r = client.post(f"/api/v1/volumes/{vid}/prompts", json=body, headers=tokens.headers(role))
        assert r.status_code == 201, r.text
    original = _export(client, tokens, vid)
    ims, boxes = _canonical(original)
    assert [(k, seen) for _, k, seen in ims] == [(3, ["annotator", "annotator2"]), (4, ["annotator"]),
                                                 (5, ["annotator"]), (6, ["annotator2"])]
    assert len(boxes) == 4
    assert all(im["file_name"] == f"imgsm-slice{im['crowdsam']['slice']:03d}.png" and im["width"] == w
               for im in original["images"])
    only = _canonical(_export(client, tokens, vid, annotator="annotator2"))
    assert [b[3] for b in only[1]] == ["annotator2"] and [(k, s) for _, k, s in only[0]] == [
        (3, ["annotator2"]), (6, ["annotator2"])]

    # Into a fresh volume of the same case: the same boxes and views come back.
    assert client.delete(f"/api/v1/volumes/{vid}", headers=tokens.headers("researcher")).status_code == 204
    assert _stored() == (0, 0)
    r = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", case_id="sm")
    assert r.status_code == 201, r.text
    r = _import(client, tokens, dataset["id"], original, annotator=None)
    assert r.status_code == 201, r.text
    result = r.json()
    assert result["boxes"] == 4 and result["stored"] == 4 and result["duplicates"] == 0
    assert result["images"] == 4 and result["volumes"] == {"sm": 4} and result["per_label"]["liver"] == 2
    assert _canonical(_export(client, tokens, _volume_id(client, tokens, dataset["id"]))) == (ims, boxes)

    # Idempotent: the same file again stores nothing new; nor does the new volume's own export.
    again = _import(client, tokens, dataset["id"], original, annotator=None).json()
    assert again["stored"] == 0 and again["duplicates"] == 4
    own = _export(client, tokens, _volume_id(client, tokens, dataset["id"]))
    assert _import(client, tokens, dataset["id"], own, annotator=None).json()["duplicates"] == 4
    assert _stored()[0] == 4


def test_reimporting_an_export_onto_its_volume_keeps_the_boxes_identity(client, tokens, dataset, sm_volume):  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    r = client.post(f"/api/v1/volumes/{vid}/prompts", headers=tokens.headers("annotator"),
                    json={"boxes": [{"slice": 2, "label": "liver", "box": [1, 2, 3, 4]},
                                    {"slice": 2, "label": "liver", "box": [1, 2, 3, 4]}]})
    assert r.status_code == 201, r.text
    doc = _export(client, tokens, vid)
    again = _import(client, tokens, dataset["id"], doc, annotator=None).json()
    assert again["stored"] == 0 and again["duplicates"] == 2 and _stored()[0] == 2
    doc["annotations"][1]["crowdsam"]["client_id"] = doc["annotations"][0]["crowdsam"]["client_id"]
    r = _import(client, tokens, dataset["id"], doc, annotator=None)
    assert r.status_code == 422 and "client_id repeats annotations[0]" in r.text


def _volume_id(client, tokens, dataset_id: int) -> int:  # type: ignore[no-untyped-def]
    volumes = client.get(f"/api/v1/datasets/{dataset_id}/volumes", headers=tokens.headers("researcher")).json()
    return int(volumes[0]["id"])


def test_plain_coco_with_file_names_and_form_annotator(client, tokens, dataset, sm_volume):  # type: ignore[no-untyped-def]
    w, h = sm_volume["display_size"]
    doc = {
        "images": [{"id": 0, "file_name": "train/imgsm-slice007.jpg", "width": w, "height": h},
                   {"id": 1, "file_name": "imgsm-slice008.png"}],
        "categories": [{"id": 0, "name": "kidney_left"}, {"id": 9, "name": "liver"}],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 0, "bbox": [4, 5, 6, 7]},
                        {"id": 2, "image_id": 0, "category_id": 9, "bbox": [0, 0, 1, 1], "iscrowd": 0}],
    }
    r = _import(client, tokens, dataset["id"], doc, annotator="alice")
    assert r.status_code == 201, r.text
    assert r.json()["seen_slices"] == 2  # slice 8: seen, nothing drawn
    page = client.get(f"/api/v1/volumes/{sm_volume['id']}/prompts", headers=tokens.headers("researcher")).json()
    assert sorted((p["slice"], p["label"], p["annotator"], p["box"], p["source"]) for p in page["items"]) == [
        (7, "kidney_left", "alice", [4.0, 5.0, 10.0, 12.0], "coco-import"),
        (7, "liver", "alice", [0.0, 0.0, 1.0, 1.0], "coco-import")]
    seen = _canonical(_export(client, tokens, sm_volume["id"]))[0]
    assert [(k, s) for _, k, s in seen] == [(7, ["alice"]), (8, ["alice"])]


def _doc(w: int, h: int) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": "imgsm-slice002.png", "width": w, "height": h}],
        "categories": [{"id": 1, "name": "liver"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
    }


BAD: list[tuple[str, Any, str]] = [
    ("not json", b"{nope", "not a JSON document"),
    ("not an object", [], "JSON object"),
    ("missing images", {"categories": [], "annotations": []}, "'images' must be a list"),
    ("unknown label", lambda d: d["categories"].append({"id": 2, "name": "brain"}), "'brain' is not a label"),
    ("bad file name", lambda d: d["images"][0].update(file_name="slice2.png"), "file_name must look like"),
    ("unknown case", lambda d: d["images"][0].update(file_name="imgnope-slice002.png"), "matches no volume"),
    ("slice out of range", lambda d: d["images"][0].update(file_name="imgsm-slice999.png"), "out of range"),
    ("wrong frame", lambda d: d["images"][0].update(width=512), "display pixels"),
    ("repeated slice", lambda d: d["images"].append({"id": 2, "file_name": "imgsm-slice2.png"}), "same slice"),
    ("repeated image id", lambda d: d["images"].append({"id": 1, "file_name": "imgsm-slice003.png"}), "repeats"),
    ("unknown image", lambda d: d["annotations"][0].update(image_id=7), "image_id 7"),
    ("unknown category", lambda d: d["annotations"][0].update(category_id=3), "category_id 3"),
    ("bbox shape", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "4 finite numbers"),
    ("bbox not numbers", lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]), "4 finite numbers"),
    ("bbox empty", lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 4]), "must be positive"),
    ("bbox outside", lambda d: d["annotations"][0].update(bbox=[-1, 2, 3, 4]), "outside the image"),
    ("bad annotator", lambda d: d["annotations"][0].update(crowdsam={"annotator": "a/b"}), "annotator"),
    ("bad client id", lambda d: d["annotations"][0].update(crowdsam={"client_id": "x"}), "is not a UUID"),
]


@pytest.mark.parametrize(("what", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_422_listing_where_and_stores_nothing(client, tokens, dataset, sm_volume,  # type: ignore[no-untyped-def]
                                                           what, change, message):
    w, h = sm_volume["display_size"]
    good = _doc(w, h)
    good["annotations"].append({"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 2, 3, 3]})
    if callable(change):
        doc: Any = good
        change(doc)
    else:
        doc = change
    r = _import(client, tokens, dataset["id"], doc)
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json()["detail"]), r.text
    assert _stored() == (0, 0)


def test_no_annotator_anywhere_is_422(client, tokens, dataset, sm_volume):  # type: ignore[no-untyped-def]
    r = _import(client, tokens, dataset["id"], _doc(*sm_volume["display_size"]), annotator=None)
    assert r.status_code == 422 and "no annotator" in r.text
    assert _stored() == (0, 0)


def test_too_large_is_413(client, tokens, dataset, monkeypatch):  # type: ignore[no-untyped-def]
    from app.prompts import coco

    monkeypatch.setattr(coco, "MAX_BYTES", 100)
    r = _import(client, tokens, dataset["id"], {"images": [], "categories": [], "annotations": [], "pad": "x" * 200})
    assert r.status_code == 413 and "larger than 100 bytes" in r.text


def test_auth(client, tokens, dataset, sm_volume):  # type: ignore[no-untyped-def]
    doc = _doc(*sm_volume["display_size"])
    assert _import(client, tokens, dataset["id"], doc, role="annotator").status_code == 403
    url = f"/api/v1/volumes/{sm_volume['id']}/prompts.coco.json"
    assert client.get(url, headers=tokens.headers("annotator")).status_code == 403
    assert client.get(url).status_code == 401
    r = client.post(f"/api/v1/datasets/{dataset['id']}/prompts/coco",
                    files={"file": ("b.json", json.dumps(doc).encode(), "application/json")})
    assert r.status_code == 401
    assert _stored() == (0, 0)
    assert _import(client, tokens, 999, doc).status_code == 404
    assert client.get("/api/v1/volumes/999/prompts.coco.json", headers=tokens.headers("researcher")).status_code == 404


def test_with_reference_map_upload_round_trip_of_seen_only_slices(client, tokens, dataset):  # type: ignore[no-untyped-def]
    r = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
               case_id="0007", reference_map=json.dumps(TOTALSEG_MAP), reference_other="background")
    assert r.status_code == 201, r.text
    # Case ids match with or without zero padding (as the YOLO import); an image alone is a seen slice.
    doc = {"images": [{"id": 1, "file_name": "img7-slice001.png"}], "categories": [], "annotations": []}
    r = _import(client, tokens, dataset["id"], doc, annotator="bob")
    assert r.status_code == 201, r.text
    assert r.json()["volumes"] == {"0007": 0} and _stored() == (0, 1)
