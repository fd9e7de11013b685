"""The per-volume montage (app/imaging/figures.py), its endpoint and the evaluation report's worst/best montages."""

from __future__ import annotations

import base64
import io
import math
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update

from app.imaging.figures import (
    Mark,
    canonical_spacing,
    choose_slices,
    dice_by_label,
    present_labels,
    volume_montage,
)
from app.imaging.metrics import dice
from app.imaging.palette import label_color
from app.segmentations.figures import used_marks
from tests.helpers_exporteval import CASES, add_finished_segmentation, upload_case
from tests.segmentation_helpers import post_boxes, sha256

LABELS = {"spleen": 1, "liver": 5}


def _synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """A black CT (below the window: gray 0), a reference with two organs on slices 4..15 and a fused mask
    that equals it on the prompted slices (every other one) and is empty elsewhere."""
    ct = np.full((40, 30, 20), -1000, dtype=np.int16)
    ref = np.zeros((40, 30, 20), dtype=np.uint8)
    ref[5:25, 5:15, 4:16] = 5
    ref[28:36, 18:26, 6:12] = 1
    prompted = list(range(4, 16, 2))
    fused = np.zeros_like(ref)
    fused[:, :, prompted] = ref[:, :, prompted]
    fused[5:25, 5:10, prompted] = 0  # half of the liver missed on the prompted slices
    return ct, fused, ref, prompted


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def _has_color(rgb: np.ndarray, color: tuple[int, ...], tol: int = 2) -> int:
    return int(np.count_nonzero(np.all(np.abs(rgb.astype(int) - np.asarray(color)) <= tol, axis=2)))


# --- pure drawing ---------------------------------------------------------------------------
def test_slices_are_spread_over_the_organs_prompted_and_unprompted() -> None:
    _ct, fused, ref, prompted = _synthetic()
    panels = choose_slices(fused, ref, prompted, n_slices=8)
    ks = [p.k for p in panels]
    assert ks == sorted(ks) and len(ks) == 8 and min(ks) >= 4 and max(ks) <= 15  # inside the organs' extent
    assert {p.k for p in panels if p.prompted} <= set(prompted)
    assert {p.k for p in panels if not p.prompted}.isdisjoint(prompted)
    assert sum(p.prompted for p in panels) == 4 and sum(not p.prompted for p in panels) == 4
    assert 4 in ks and 15 in ks  # both ends of the extent
    only_prompted = choose_slices(fused, None, prompted, n_slices=12)  # without a reference: fused extent
    assert [p.k for p in only_prompted if p.prompted] == prompted
    assert all(4 <= p.k <= 14 for p in only_prompted)


def test_dice_bars_are_the_projects_dice() -> None:
    _ct, fused, ref, prompted = _synthetic()
    scores = dice_by_label(fused, ref, LABELS, prompted)
    assert scores["spleen"]["prompted"] == pytest.approx(1.0)
    assert scores["liver"]["prompted"] == pytest.approx(2 * 10 / (20 + 10))  # half the liver found
    assert scores["liver"]["volume"] == pytest.approx(dice(ref == 5, fused == 5))
    assert scores["spleen"]["volume"] == pytest.approx(2 * 3 / (6 + 3))  # 3 of its 6 slices prompted
    empty = dice_by_label(fused, ref, {"aorta": 52}, prompted)["aorta"]
    assert math.isnan(empty["volume"]) and math.isnan(empty["prompted"])
    # the figure lists only labels that occur (a 100-label dataset's five organs → five bars)
    assert present_labels({**LABELS, "aorta": 52}, fused, ref) == LABELS
    assert present_labels({**LABELS, "aorta": 52}, np.zeros_like(fused), None) == {}


def test_montage_is_legible_deterministic_and_shows_the_mask_colours() -> None:
    ct, fused, ref, prompted = _synthetic()
    boxes = {4: [Mark("liver", "alice", (5.0, 5.0, 25.0, 25.0)), Mark("spleen", "bob", (14.0, 4.0, 22.0, 12.0))]}
    kwargs: dict[str, Any] = {"window": (40.0, 400.0), "spacing": (0.8, 0.8, 3.0), "title": "case $x$ <b>",
                              "prompted": prompted, "n_slices": 8}
    png = volume_montage(ct, fused, ref, boxes, LABELS, **kwargs)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width >= 1200 and image.height >= 600
    assert not {"Software", "Creation Time"} & set(image.info)  # no tool or time stamp
    assert volume_montage(ct, fused, ref, boxes, LABELS, **kwargs) == png  # byte for byte
    rgb = _png(png)
    # the fill on a black CT is exactly FILL_ALPHA × the label colour (palette shared with the web pages)
    for value in LABELS.values():
        fill = tuple(round(0.45 * c) for c in label_color(value))
        assert _has_color(rgb, fill) > 5000, value  # thousands of pixels: upsampled, not 20-pixel blobs
    # no mask and no reference (no contours, no bars): that colour is gone (it is the fill)
    nothing = volume_montage(ct, np.zeros_like(fused), None, {}, LABELS, **kwargs)
    assert _has_color(_png(nothing), tuple(round(0.45 * c) for c in label_color(5))) == 0


def test_canonical_spacing_follows_the_orientation() -> None:
    # LPS-ish affine with a permutation: original axis 0 is S, 1 is R, 2 is A
    affine = np.array([[0, 0.7, 0, 0], [0, 0, 0.9, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    assert canonical_spacing(affine, (10, 20, 30), (2.5, 0.7, 0.9)) == [0.7, 0.9, 2.5]


def test_only_the_boxes_the_segmentation_used_are_drawn() -> None:
    def row(k: int, label: str, who: str, kind: str = "box") -> SimpleNamespace:
        return SimpleNamespace(slice_index=k, label=label, annotator=who, kind=kind, x0=1.0, y0=2.0,
                               x1=5.0 if kind == "box" else None, y1=6.0 if kind == "box" else None, positive=None)

    stats = {"prompted_slices": [3, 4], "per_slice": {"3": {"liver": {"annotators": ["a"]}},
                                                       "4": {"spleen": {"annotators": ["a", "b"]}}}}
    rows = [row(3, "liver", "a"), row(3, "liver", "late"), row(4, "spleen", "b", "point"), row(7, "liver", "a"),
            row(3, "aorta", "a")]
    marks = used_marks(rows, stats, LABELS)
    assert marks == {3: [Mark("liver", "a", (1.0, 2.0, 5.0, 6.0))], 4: [Mark("spleen", "b", (1.0, 2.0))]}


# --- the endpoint -------------------------------------------------------------------------------
def _use_annotator(segmentation_id: int, annotator: str) -> None:
    """Name ``annotator`` (instead of the helper's "sim") as the crowd the segmentation used, and set the
    mask's sha256 as the job does."""
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.segmentations.models import Segmentation

    with session_scope() as session:
        row = session.get(Segmentation, segmentation_id)
        assert row is not None and row.mask_key is not None
        stats = dict(row.stats)
        stats["per_slice"] = {k: {n: {**e, "annotators": [annotator]} for n, e in entry.items()}
                              for k, entry in stats["per_slice"].items()}
        digest = sha256(get_storage().read_bytes(row.mask_key))
        session.execute(update(Segmentation).where(Segmentation.id == segmentation_id)
                        .values(stats=stats, mask_sha256=digest))
        session.commit()


def test_figure_endpoint_roles_etag_and_unfinished(client, tokens, sm_volume) -> None:  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    post_boxes(client, tokens.headers("annotator"), vid, [{"slice": 12, "label": "liver", "box": [10, 20, 60, 70]}])
    queued = client.post(f"/api/v1/volumes/{vid}/segmentations", json={"model": "litemedsam"},
                         headers=tokens.headers("researcher"))
    assert queued.status_code == 202, queued.text
    unfinished = client.get(f"/api/v1/segmentations/{queued.json()['id']}/figure.png",
                            headers=tokens.headers("researcher"))
    assert unfinished.status_code == 409 and "no mask yet" in unfinished.json()["detail"]

    sid, _prompted, _mask = add_finished_segmentation(vid, prompted=[8, 10, 12, 14])
    _use_annotator(sid, "annotator")
    url = f"/api/v1/segmentations/{sid}/figure.png"
    assert client.get(url).status_code == 401
    denied = client.get(url, headers=tokens.headers("annotator"))
    assert denied.status_code == 403 and "detail" in denied.json()
    assert client.get("/api/v1/segmentations/999999/figure.png", headers=tokens.headers("researcher")).status_code \
        == 404
    response = client.get(url, headers=tokens.headers("researcher"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.width >= 1200
    assert "figure.png" in response.headers["content-disposition"]
    etag = response.headers["etag"]
    cached = client.get(url, headers={**tokens.headers("researcher"), "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    again = client.get(url, headers=tokens.headers("admin"))
    assert again.status_code == 200 and again.content == response.content  # deterministic
    liver = tuple(round(0.45 * c) for c in label_color(5))
    assert _has_color(_png(response.content), liver, tol=60) > 0


# --- the evaluation report ----------------------------------------------------------------------
def test_report_shows_the_worst_and_best_case_montages(client, tokens, dataset, run_jobs) -> None:  # type: ignore[no-untyped-def]
    volumes = {case: upload_case(client, tokens, dataset["id"], case, *CASES["sm"]) for case in ("poor", "good")}
    add_finished_segmentation(volumes["poor"]["id"], keep_every=2)  # half the slices left empty
    better, prompted, _ = add_finished_segmentation(volumes["good"]["id"], keep_every=6)
    post_boxes(client, tokens.headers("annotator"), volumes["good"]["id"],
               [{"slice": prompted[0], "label": "liver", "box": [10, 20, 60, 70]}])
    _use_annotator(better, "annotator")
    response = client.post(f"/api/v1/datasets/{dataset['id']}/evaluations",
                           json={"source": "segmentation", "model": "litemedsam"}, headers=tokens.headers("researcher"))
    assert response.status_code == 202, response.text
    run_jobs("cpu")
    out = client.get(f"/api/v1/evaluations/{response.json()['id']}", headers=tokens.headers("researcher")).json()
    assert out["status"] == "finished", out
    means = {c["case_id"]: np.nanmean([m["Dice"] if m["Dice"] is not None else np.nan
                                       for m in c["metrics"].values()]) for c in out["result"]["cases"]}
    assert means["poor"] < means["good"]
    html = client.get(f"/api/v1/evaluations/{out['id']}/report", headers=tokens.headers("researcher")).text
    assert "<h2>Worst and best case</h2>" in html
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert captions == [f"Worst case (mean Dice {means['poor']:.3f}): case poor",
                        f"Best case (mean Dice {means['good']:.3f}): case good"]
    pngs = re.findall(r'class="montage" src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == 2
    for data in pngs:
        assert Image.open(io.BytesIO(base64.b64decode(data))).width >= 1200
