"""The study's 1,182 real crowd prompt files import exactly, and export → import round-trips."""

from __future__ import annotations

import gzip
import io
import re
import zipfile
from collections import Counter, defaultdict

import nibabel as nib
import numpy as np
from sqlalchemy import func, select

from app.core.db import session_scope
from app.prompts.models import Prompt, SliceView
from tests.conftest import SEED_DIR

PROMPT_DIR = SEED_DIR / "crowd-prompts"
BTCV_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 6, "aorta": 8}
BTCV_CLASSES = {"0": "spleen", "1": "kidney_right", "2": "kidney_left", "5": "liver", "7": "aorta"}
NAME = re.compile(r"img(\d+)-slice(\d+)\.txt")


def _seed_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(PROMPT_DIR.glob("*.txt"))}


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(f"crowd-prompts/{name}", content)
    return buffer.getvalue()


def _lines(content: bytes) -> Counter[tuple[int, ...]]:
    """File lines as a multiset of (class, values rounded far below a pixel)."""
    out: Counter[tuple[int, ...]] = Counter()
    for line in content.decode().splitlines():
        if line.strip():
            cls, *values = line.split()
            out[(int(cls), *(round(float(v) * 1e9) for v in values))] += 1
    return out


def _make_volumes(client, tokens, dataset_id: int, files: dict[str, bytes]) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """512×512×N int16 volumes for every case in the files; half unpadded case ids, two orientations."""
    max_z: dict[str, int] = defaultdict(int)
    for name in files:
        m = NAME.fullmatch(name)
        assert m is not None
        max_z[m[1]] = max(max_z[m[1]], int(m[2]))
    volumes = {}
    for i, case in enumerate(sorted(max_z)):
        case_id = case if i % 2 else str(int(case))  # "0001" and "1" must both match img0001-*
        affine = np.diag([-0.75, -0.75, 2.5, 1.0]) if i % 3 else np.diag([0.75, 0.75, 2.5, 1.0])
        image = nib.Nifti1Image(np.zeros((512, 512, max_z[case] + 3), dtype=np.int16), affine)
        payload = gzip.compress(image.to_bytes(), compresslevel=1)
        r = client.post(
            f"/api/v1/datasets/{dataset_id}/volumes",
            files={"image": (f"{case}.nii.gz", payload, "application/gzip")},
            data={"case_id": case_id}, headers=tokens.headers("researcher"),
        )
        assert r.status_code == 201, r.text
        assert r.json()["shape"] == [512, 512, max_z[case] + 3]
        volumes[case] = r.json()
    return volumes


def test_seed_crowd_prompts_import_exactly_and_round_trip(client, tokens):
    files = _seed_files()
    assert len(files) == 1182
    r = client.post("/api/v1/datasets", json={"name": "btcv", "labels": BTCV_LABELS, "prompt_classes": BTCV_CLASSES,
                                              "annotators": ["annotator", "annotator2"]},
                    headers=tokens.headers("researcher"))
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    volumes = _make_volumes(client, tokens, dataset_id, files)
    assert len(volumes) == 23

    archive = _zip(files)
    post = lambda data, annotator: client.post(  # noqa: E731
        f"/api/v1/datasets/{dataset_id}/prompts/yolo",
        files=[("files", ("crowd-prompts.zip", data, "application/zip"))],
        data={"annotator": annotator, "convention": "seed"}, headers=tokens.headers("researcher"),
    )
    r = post(archive, "seed-crowd")
    assert r.status_code == 201, r.text
    result = r.json()
    assert result["files"] == 1182 and result["empty_files"] == 531 and result["seen_slices"] == 1182
    assert result["boxes"] == 1840 and result["stored"] == 1840 and result["duplicates"] == 0
    assert result["per_class"] == {"0": 253, "1": 257, "2": 254, "5": 456, "7": 620}

    with session_scope() as session:
        per_label = dict(session.execute(select(Prompt.label, func.count()).group_by(Prompt.label)).all())
        assert per_label == {"spleen": 253, "kidney_right": 257, "kidney_left": 254, "liver": 456, "aorta": 620}
        assert session.scalar(select(func.count()).select_from(SliceView)) == 1182
        assert set(session.scalars(select(Prompt.source).distinct())) == {"yolo-import"}

    # 531 seen-but-empty slices, as coverage reports them
    empty_slices = 0
    for volume in volumes.values():
        cov = client.get(f"/api/v1/volumes/{volume['id']}/coverage", headers=tokens.headers("researcher")).json()
        empty_slices += sum(1 for s in cov["slices"] if s["seen_by"] == 1 and not s["labels"])
    assert empty_slices == 531

    # importing the same files again stores nothing new
    again = post(archive, "seed-crowd").json()
    assert again["stored"] == 0 and again["duplicates"] == 1840

    # export each volume in the study's convention: the same files, line for line
    exported: dict[str, bytes] = {}
    for case, volume in volumes.items():
        r = client.get(f"/api/v1/volumes/{volume['id']}/prompts.yolo?convention=seed&annotator=seed-crowd",
                       headers=tokens.headers("researcher"))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            for name in z.namelist():
                m = NAME.fullmatch(name)
                assert m is not None and m[1] == volume["case_id"]
                exported[f"img{case}-slice{m[2]}.txt"] = z.read(name)
    assert set(exported) == set(files)
    for name, content in files.items():
        assert _lines(exported[name]) == _lines(content), name

    # …and importing the export under another name reproduces every box
    r = post(_zip(exported), "round-trip")
    assert r.status_code == 201, r.text
    assert r.json()["stored"] == 1840 and r.json()["empty_files"] == 531
    with session_scope() as session:
        rows = session.execute(
            select(Prompt.annotator, Prompt.volume_id, Prompt.slice_index, Prompt.label,
                   Prompt.x0, Prompt.y0, Prompt.x1, Prompt.y1)
        ).all()
        views = session.execute(select(SliceView.annotator, SliceView.volume_id, SliceView.slice_index)).all()
    by_annotator: dict[str, list[tuple]] = defaultdict(list)
    for a, *rest in rows:
        by_annotator[a].append(tuple(rest))
    first, second = sorted(by_annotator["seed-crowd"]), sorted(by_annotator["round-trip"])
    assert len(first) == len(second) == 1840
    for a, b in zip(first, second, strict=True):
        assert a[:3] == b[:3] and np.allclose(a[3:], b[3:], atol=1e-6, rtol=0)
    seen = defaultdict(set)
    for a, v, k in views:
        seen[a].add((v, k))
    assert seen["seed-crowd"] == seen["round-trip"] and len(seen["round-trip"]) == 1182
