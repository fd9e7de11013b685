"""YOLO (OpenLabeling) import/export: conventions, round trip, and every rejection (nothing stored)."""

from __future__ import annotations

import io
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from sqlalchemy import func, select

from app.core.db import session_scope
from app.imaging.coords import Orientation, display_slice, mask_bbox_display
from app.prompts import yolo
from app.prompts.models import Prompt, SliceView
from tests.conftest import ABDOMEN_LABELS, CT_DIR, TOTALSEG_MAP, upload

CLASSES = {"0": "spleen", "1": "kidney_right", "2": "kidney_left", "5": "liver", "7": "aorta"}


@pytest.fixture
def yolo_dataset(client, tokens) -> dict:  # type: ignore[no-untyped-def]
    r = client.post("/api/v1/datasets", json={"name": "abd-yolo", "labels": ABDOMEN_LABELS, "prompt_classes": CLASSES,
                                              "annotators": ["annotator", "annotator2"]},
                    headers=tokens.headers("researcher"))
    assert r.status_code == 201, r.text
    return r.json()


def _volume(client, tokens, dataset_id, case_id, image=None, seg=None) -> dict:  # type: ignore[no-untyped-def]
    extra = {}
    if seg is not None:
        extra = {"reference_map": json.dumps(TOTALSEG_MAP), "reference_other": "background"}
    r = upload(client, tokens, dataset_id, image or CT_DIR / "example_ct_sm.nii.gz", seg, case_id=case_id, **extra)
    assert r.status_code == 201, r.text
    return r.json()


def _zip(files: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _import(client, tokens, dataset_id, uploads, annotator="crowd", convention="display", role="researcher"):  # type: ignore[no-untyped-def]
    return client.post(
        f"/api/v1/datasets/{dataset_id}/prompts/yolo",
        files=[("files", (name, data, "application/octet-stream")) for name, data in uploads],
        data={"annotator": annotator, "convention": convention}, headers=tokens.headers(role),
    )


def _stored() -> tuple[int, int]:
    with session_scope() as session:
        return (int(session.scalar(select(func.count()).select_from(Prompt)) or 0),
                int(session.scalar(select(func.count()).select_from(SliceView)) or 0))


def _study_png(original_slice: np.ndarray) -> np.ndarray:
    """The study's PNG p for a slice A = original[:, :, z], where A = fliplr(flipud(rot90(p)))."""
    png = np.rot90(np.flipud(np.fliplr(original_slice)), -1)
    assert np.array_equal(np.fliplr(np.flipud(np.rot90(png))), original_slice)
    return png


@pytest.mark.parametrize("codes", ["RAS", "LPS"])
def test_seed_convention_box_lands_on_the_organ(client, tokens, yolo_dataset, tmp_path, codes):
    paths = []
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        img = nib.load(str(CT_DIR / name))
        out = tmp_path / name
        nib.save(img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(codes)))), str(out))
        paths.append(out)
    volume = _volume(client, tokens, yolo_dataset["id"], "7", *paths)
    seg = nib.load(str(paths[1]))
    original = np.asarray(seg.dataobj).astype(np.int32)
    canonical = Orientation.from_affine(seg.affine, original.shape).canonical(original)
    z = 17
    png = _study_png(original[:, :, z])
    rows, cols = png.shape
    lines = []
    for cls, value in (("5", 5), ("0", 1)):  # liver, spleen
        r_idx, c_idx = np.nonzero(png == value)
        x0, x1, y0, y1 = c_idx.min(), c_idx.max() + 1, r_idx.min(), r_idx.max() + 1
        lines.append(f"{cls} {(x0 + x1) / 2 / cols} {(y0 + y1) / 2 / rows} {(x1 - x0) / cols} {(y1 - y0) / rows}")
    r = _import(client, tokens, yolo_dataset["id"], [("img0007-slice017.txt", "\n".join(lines).encode())],
                convention="seed")
    assert r.status_code == 201, r.text
    items = client.get(f"/api/v1/volumes/{volume['id']}/prompts", headers=tokens.headers("researcher")).json()["items"]
    k = Orientation.from_affine(seg.affine, original.shape).original_index_to_canonical((0, 0, z))[2]
    display = display_slice(canonical, k)
    for item in items:
        value = ABDOMEN_LABELS[item["label"]]
        assert item["slice"] == k
        assert tuple(item["box"]) == pytest.approx(mask_bbox_display(display == value), abs=1e-9)


def test_display_round_trip_with_points_and_empty_slices(client, tokens, yolo_dataset):
    volume = _volume(client, tokens, yolo_dataset["id"], "0003")
    vid = volume["id"]
    rng = np.random.default_rng(1)
    boxes = []
    for i in range(60):
        x0, y0 = rng.uniform(0, 100), rng.uniform(0, 80)
        boxes.append({"slice": i % 20, "label": ["liver", "spleen", "aorta"][i % 3],
                      "box": [x0, y0, min(122, x0 + rng.uniform(0.5, 30)), min(101, y0 + rng.uniform(0.5, 30))]})
    boxes.append({"slice": 0, "label": "liver", "box": [0, 0, 122, 101]})  # the whole image
    r = client.post(f"/api/v1/volumes/{vid}/prompts", json={
        "boxes": boxes, "points": [{"slice": 1, "label": "liver", "point": [3, 4]}], "seen": [25, 26]},
        headers=tokens.headers("annotator"))
    assert r.status_code == 201, r.text
    r = client.get(f"/api/v1/volumes/{vid}/prompts.yolo?annotator=annotator", headers=tokens.headers("researcher"))
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        names = sorted(z.namelist())
        assert names == sorted(yolo.file_name("0003", k) for k in [*range(20), 25, 26])
        assert z.read("img0003-slice025.txt") == b""
        exported = [(n, z.read(n)) for n in names]
    r = _import(client, tokens, yolo_dataset["id"], exported, annotator="copy")
    assert r.status_code == 201, r.text
    assert r.json()["boxes"] == 61 and r.json()["empty_files"] == 2
    with session_scope() as session:
        def boxes_of(a: str) -> list[tuple]:
            return sorted(session.execute(select(Prompt.slice_index, Prompt.label, Prompt.x0, Prompt.y0, Prompt.x1,
                                                 Prompt.y1).where(Prompt.annotator == a, Prompt.kind == "box")).all())
        original, copy = boxes_of("annotator"), boxes_of("copy")
        seen = lambda a: set(session.scalars(select(SliceView.slice_index).where(SliceView.annotator == a)))  # noqa: E731
        assert seen("copy") == seen("annotator") == {*range(20), 25, 26}
    assert len(original) == len(copy) == 61
    for a, b in zip(original, copy, strict=True):
        assert a[:2] == b[:2] and np.allclose(a[2:], b[2:], atol=1e-8, rtol=0)
    # without an annotator filter and several annotators: one folder each
    r = client.get(f"/api/v1/volumes/{vid}/prompts.yolo", headers=tokens.headers("researcher"))
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert {n.split("/")[0] for n in z.namelist()} == {"annotator", "copy"}


def test_case_ids_match_with_or_without_padding_and_several_txt_files(client, tokens, yolo_dataset):
    unpadded = _volume(client, tokens, yolo_dataset["id"], "12")
    padded = _volume(client, tokens, yolo_dataset["id"], "0034")
    uploads = [("img0012-slice001.txt", b"5 0.5 0.5 0.2 0.2\n"), ("img12-slice002.txt", b""),
               ("img34-slice003.txt", b"7 0.5 0.5 0.1 0.1\r\n0 0.25 0.25 0.1 0.1\r\n")]
    r = _import(client, tokens, yolo_dataset["id"], uploads)
    assert r.status_code == 201, r.text
    assert r.json()["volumes"] == {"12": 1, "0034": 2}
    cov = client.get(f"/api/v1/volumes/{unpadded['id']}/coverage", headers=tokens.headers("researcher")).json()
    assert [(s["slice"], s["seen_by"], sorted(s["labels"])) for s in cov["slices"]] == [(1, 1, ["liver"]),
                                                                                          (2, 1, [])]
    items = client.get(f"/api/v1/volumes/{padded['id']}/prompts", headers=tokens.headers("researcher")).json()["items"]
    aorta = next(i for i in items if i["label"] == "aorta")
    assert aorta["box"] == pytest.approx([0.45 * 122, 0.45 * 101, 0.55 * 122, 0.55 * 101])
    assert aorta["annotator"] == "crowd" and aorta["source"] == "yolo-import"


def test_ambiguous_case_is_rejected(client, tokens, yolo_dataset):
    _volume(client, tokens, yolo_dataset["id"], "5")
    _volume(client, tokens, yolo_dataset["id"], "005")
    r = _import(client, tokens, yolo_dataset["id"], [("img0005-slice001.txt", b"")])
    assert r.status_code == 422 and "several volumes" in r.text


BAD_FILES = [
    ("img0001-slice001.txt", b"5 0.5 0.5 0.2\n", "img0001-slice001.txt:1", "5 fields"),
    ("img0001-slice002.txt", b"5 0.5 0.5 0.2 0.2\n5 0.5 abc 0.2 0.2\n", "img0001-slice002.txt:2", "numbers"),
    ("img0001-slice003.txt", b"3 0.5 0.5 0.2 0.2\n", "img0001-slice003.txt:1", "class 3"),
    ("img0001-slice004.txt", b"5 0.95 0.5 0.2 0.2\n", "img0001-slice004.txt:1", "outside"),
    ("img0001-slice005.txt", b"5 0.5 0.5 0 0.2\n", "img0001-slice005.txt:1", "positive"),
    ("img0001-slice006.txt", b"5 nan 0.5 0.1 0.2\n", "img0001-slice006.txt:1", "finite"),
    ("img0001-slice007.txt", b"-1 0.5 0.5 0.1 0.2\n", "img0001-slice007.txt:1", "class"),
    ("img0099-slice001.txt", b"", "img0099-slice001.txt", "matches no volume"),
    ("img0001-slice030.txt", b"", "img0001-slice030.txt", "out of range"),
    ("notes.txt", b"", "notes.txt", "file name"),
    ("img0001-slice008.txt", b"\xff\xfe\x00", "img0001-slice008.txt", "UTF-8"),
]


@pytest.mark.parametrize(("name", "content", "where", "reason"), BAD_FILES, ids=[b[3] for b in BAD_FILES])
def test_bad_file_is_rejected_with_file_and_line(client, tokens, yolo_dataset, name, content, where, reason):
    _volume(client, tokens, yolo_dataset["id"], "1")
    good = ("img0001-slice010.txt", b"5 0.5 0.5 0.2 0.2\n")
    r = _import(client, tokens, yolo_dataset["id"], [good, (name, content)])
    assert r.status_code == 422, r.text
    messages = [d["msg"] for d in r.json()["detail"]]
    assert any(m.startswith(where + ":") and reason in m for m in messages), messages
    assert _stored() == (0, 0)


def test_all_problems_listed_at_once(client, tokens, yolo_dataset):
    _volume(client, tokens, yolo_dataset["id"], "1")
    archive = _zip({"img0001-slice001.txt": "5 0.5 0.5 0.2\n9 0.5 0.5 0.1 0.1\n",
                    "img0002-slice001.txt": "", "img1-slice001.txt": ""})
    r = _import(client, tokens, yolo_dataset["id"], [("prompts.zip", archive)])
    assert r.status_code == 422
    wheres = {(d["file"], d["line"]) for d in r.json()["detail"]}
    assert {("img0001-slice001.txt", 1), ("img0001-slice001.txt", 2), ("img0002-slice001.txt", None),
            ("img1-slice001.txt", None)} <= wheres  # the last: same slice as the first file
    assert _stored() == (0, 0)


@pytest.mark.parametrize("member", ["../img0001-slice001.txt", "/abs/img0001-slice001.txt",
                                    "a/../../img0001-slice001.txt", "a\\img0001-slice001.txt"])
def test_path_traversal_names_in_zip_are_rejected(client, tokens, yolo_dataset, member):
    _volume(client, tokens, yolo_dataset["id"], "1")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo(member), "")
        archive.writestr("ok/img0001-slice002.txt", "")
    r = _import(client, tokens, yolo_dataset["id"], [("p.zip", buffer.getvalue())])
    assert r.status_code == 422 and ("escapes" in r.text or "absolute" in r.text), r.text
    assert _stored() == (0, 0)


def test_bad_zip_bombs_and_too_many_entries(client, tokens, yolo_dataset, monkeypatch):
    _volume(client, tokens, yolo_dataset["id"], "1")
    r = _import(client, tokens, yolo_dataset["id"], [("p.zip", b"PK\x03\x04 this is not a zip")])
    assert r.status_code == 422 and "not a readable zip" in r.text
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("img0001-slice001.txt", b"\n" * (yolo.MAX_TOTAL_BYTES + 1))
    assert len(bomb.getvalue()) < 200_000
    r = _import(client, tokens, yolo_dataset["id"], [("bomb.zip", bomb.getvalue())])
    assert r.status_code == 422 and "limit" in r.text
    monkeypatch.setattr(yolo, "MAX_FILES", 5)
    many = _zip({f"img0001-slice{k:03d}.txt": "" for k in range(6)})
    r = _import(client, tokens, yolo_dataset["id"], [("many.zip", many)])
    assert r.status_code == 422 and "6 entries" in r.text
    assert _stored() == (0, 0)


def test_corrupt_truncated_and_encrypted_zips_are_422(client, tokens, yolo_dataset):
    _volume(client, tokens, yolo_dataset["id"], "1")
    good = _zip({"img0001-slice001.txt": "5 0.5 0.5 0.2 0.2\n" * 200})
    corrupt = bytearray(good)
    start = corrupt.find(b"img0001-slice001.txt") + len("img0001-slice001.txt")
    corrupt[start: start + 20] = b"\xff" * 20  # the member's data: a CRC or inflate error
    encrypted = bytearray(good)
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # set the "encrypted" flag in both headers
        at = encrypted.find(header) + (6 if header == b"PK\x03\x04" else 8)
        encrypted[at] |= 0x1
    for name, data, message in [("corrupt.zip", bytes(corrupt), "cannot be extracted"),
                                ("truncated.zip", good[: len(good) // 2], "not a readable zip"),
                                ("encrypted.zip", bytes(encrypted), "encrypted"),
                                ("empty.zip", b"", "not a readable zip")]:
        r = _import(client, tokens, yolo_dataset["id"], [(name, data)])
        assert r.status_code == 422 and message in r.text, (name, r.text)
    assert _stored() == (0, 0)


def test_import_needs_classes_researcher_and_valid_form(client, tokens, dataset):
    _volume(client, tokens, dataset["id"], "1")
    r = _import(client, tokens, dataset["id"], [("img0001-slice001.txt", b"")])
    assert r.status_code == 422 and "prompt_classes" in r.text
    assert _import(client, tokens, dataset["id"], [("img0001-slice001.txt", b"")], role="annotator").status_code == 403
    r = _import(client, tokens, dataset["id"], [("img0001-slice001.txt", b"")], convention="upside-down")
    assert r.status_code == 422


def test_reimport_is_idempotent(client, tokens, yolo_dataset):
    _volume(client, tokens, yolo_dataset["id"], "1")
    files = [("img0001-slice001.txt", b"5 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.1 0.1\n")]
    first = _import(client, tokens, yolo_dataset["id"], files).json()
    assert first["stored"] == 3  # two identical boxes are two boxes
    second = _import(client, tokens, yolo_dataset["id"], files).json()
    assert second["stored"] == 0 and second["duplicates"] == 3
    assert _stored() == (3, 1)


def test_export_unknown_class_and_permissions(client, tokens, yolo_dataset):
    volume = _volume(client, tokens, yolo_dataset["id"], "1")
    client.post(f"/api/v1/volumes/{volume['id']}/prompts", json={
        "boxes": [{"slice": 1, "label": "liver", "box": [1, 1, 5, 5]}]}, headers=tokens.headers("annotator"))
    r = client.get(f"/api/v1/volumes/{volume['id']}/prompts.yolo", headers=tokens.headers("annotator"))
    assert r.status_code == 403
    r = client.get(f"/api/v1/volumes/{volume['id']}/prompts.yolo?convention=seed",
                   headers=tokens.headers("researcher"))
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert z.namelist() == ["img1-slice001.txt"]
        cls, *values = z.read("img1-slice001.txt").decode().split()
        assert cls == "5" and all(0 < float(v) < 1 for v in values)


def test_parse_line_unit():
    b = yolo.parse_line("7 0.556640625 0.4970703125 0.05859375 0.068359375", 3)
    assert (b.cls, b.line) == (7, 3)
    assert yolo.yolo_to_pixels(b, 512, 512) == pytest.approx((270, 237, 300, 272))
    assert yolo.format_number(0.3125) == "0.3125" and yolo.format_number(1.0) == "1" and yolo.format_number(0) == "0"
    assert yolo.normalise_case("0001") == yolo.normalise_case("1") == "1" and yolo.normalise_case("000") == "0"
    assert yolo.normalise_case("s0001") == "s0001"
