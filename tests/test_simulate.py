"""Crowd simulation: the pure function on the real reference, and the API that stores its crowd."""

from __future__ import annotations

from collections import Counter

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import func, select

from app.core.db import session_scope
from app.imaging.coords import Orientation, display_slice, mask_bbox_display
from app.prompts.models import Prompt, SliceView
from app.prompts.simulate import organ_boxes, reference_boxes, simulate_crowd
from tests.conftest import CT_DIR, upload

ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}


@pytest.fixture(scope="module")
def canonical_seg() -> np.ndarray:
    img = nib.load(str(CT_DIR / "example_seg.nii.gz"))
    data = np.asarray(img.dataobj).astype(np.int32)
    return Orientation.from_affine(img.affine, data.shape).canonical(data)


def test_exact_boxes_without_noise_are_tight_per_component(canonical_seg):
    sim = simulate_crowd(canonical_seg, ORGANS, annotators=2, jitter=0.0, coverage=1.0, seed=3,
                         min_component_pixels=1)
    truth = reference_boxes(canonical_seg, ORGANS, min_component_pixels=1)
    for i in range(2):
        mine = [(b.k, b.label, b.box) for b in sim.boxes if b.annotator == i]
        assert mine == [(k, lab, box) for k in sorted(truth) for lab in sorted(truth[k]) for box in truth[k][lab]]
        assert sim.seen[i] == sorted(truth)
    # every organ present on a slice gets boxes there, and together they are as tight as the organ's box
    for k in sorted(truth):
        display = display_slice(canonical_seg, k)
        for label, value in ORGANS.items():
            tight = mask_bbox_display(display == value)
            if tight is None:
                assert label not in truth[k]
                continue
            boxes = truth[k][label]
            union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                     max(b[3] for b in boxes))
            assert union == tight
    parts = Counter(len(truth[k].get("liver", [])) for k in truth)
    assert any(n >= 2 for n in parts), "example_ct_sm has slices where the liver is seen in several parts"


def test_one_box_per_organ_when_asked(canonical_seg):
    sim = simulate_crowd(canonical_seg, ORGANS, annotators=1, jitter=0.0, coverage=1.0, per_component=False,
                         min_component_pixels=1)
    per_slice_label = Counter((b.k, b.label) for b in sim.boxes)
    assert set(per_slice_label.values()) == {1}
    for b in sim.boxes:
        assert b.box == mask_bbox_display(display_slice(canonical_seg, b.k) == ORGANS[b.label])


def test_small_components_are_ignored():
    labels = np.zeros((20, 10, 1), dtype=np.int32)
    labels[2:8, 2:8, 0] = 1  # 36 pixels
    labels[15, 5, 0] = 1  # a single-pixel speck
    display = display_slice(labels, 0)
    assert len(organ_boxes(display, 1, min_component_pixels=1)) == 2
    assert organ_boxes(display, 1, min_component_pixels=2) == [(12.0, 2.0, 18.0, 8.0)]  # x = 19 - i, y = 9 - j
    sim = simulate_crowd(labels, {"organ": 1}, annotators=1, jitter=0.0, coverage=1.0, min_component_pixels=2)
    assert len(sim.boxes) == 1


def test_deterministic_for_a_seed_and_stable_when_adding_annotators(canonical_seg):
    kwargs = {"jitter": 0.05, "coverage": 0.7, "miss_rate": 0.1}
    a = simulate_crowd(canonical_seg, ORGANS, annotators=3, seed=11, **kwargs)
    b = simulate_crowd(canonical_seg, ORGANS, annotators=3, seed=11, **kwargs)
    c = simulate_crowd(canonical_seg, ORGANS, annotators=5, seed=11, **kwargs)
    d = simulate_crowd(canonical_seg, ORGANS, annotators=3, seed=12, **kwargs)
    assert a.boxes == b.boxes and a.seen == b.seen
    assert [x for x in c.boxes if x.annotator < 3] == a.boxes
    assert d.boxes != a.boxes


def test_coverage_miss_rate_and_jitter_statistics(canonical_seg):
    n_truth = len(reference_boxes(canonical_seg, ORGANS, min_component_pixels=10))
    sim = simulate_crowd(canonical_seg, ORGANS, annotators=30, coverage=0.5, jitter=0.0, seed=1)
    fraction = sum(len(s) for s in sim.seen.values()) / (30 * n_truth)
    assert 0.42 < fraction < 0.58
    missed = simulate_crowd(canonical_seg, ORGANS, annotators=2, coverage=1.0, miss_rate=1.0, seed=1)
    assert missed.boxes == [] and all(len(s) == n_truth for s in missed.seen.values())
    half = simulate_crowd(canonical_seg, ORGANS, annotators=20, coverage=1.0, miss_rate=0.5, jitter=0.0, seed=2)
    full = simulate_crowd(canonical_seg, ORGANS, annotators=20, coverage=1.0, miss_rate=0.0, jitter=0.0, seed=2)
    assert 0.4 < len(half.boxes) / len(full.boxes) < 0.6

    noisy = simulate_crowd(canonical_seg, ORGANS, annotators=20, coverage=1.0, jitter=0.1, seed=4)
    exact = {(b.annotator, b.k, b.label, b.part): b.box for b in full.boxes}
    height, width = canonical_seg.shape[1], canonical_seg.shape[0]
    rel = []
    for b in noisy.boxes:
        x0, y0, x1, y1 = b.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and x1 - x0 >= 1 and y1 - y0 >= 1
        t = exact[(b.annotator, b.k, b.label, b.part)]
        w = t[2] - t[0]
        if w >= 10 and t[0] > 0 and t[2] < width:  # not clipped at the border
            rel.append((x0 - t[0]) / w)
    assert len(rel) > 200
    assert abs(float(np.mean(rel))) < 0.02 and 0.08 < float(np.std(rel)) < 0.12


def _simulate(client, tokens, volume_id, role="researcher", **body):  # type: ignore[no-untyped-def]
    return client.post(f"/api/v1/volumes/{volume_id}/prompts/simulate", json=body, headers=tokens.headers(role))


def test_api_stores_simulated_crowd(client, tokens, sm_volume, canonical_seg):
    vid = sm_volume["id"]
    r = _simulate(client, tokens, vid, annotators=3, jitter=0.05, coverage=0.8, miss_rate=0.0, seed=0)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["annotators"] == ["sim-0-0", "sim-0-1", "sim-0-2"]
    expected = simulate_crowd(canonical_seg, ORGANS, annotators=3, jitter=0.05, coverage=0.8, seed=0)
    assert out["boxes"] == out["stored"] == len(expected.boxes) > 50 and out["duplicates"] == 0
    assert out["seen_slices"] == sum(len(s) for s in expected.seen.values())
    assert out["per_annotator"] == {f"sim-0-{i}": sum(b.annotator == i for b in expected.boxes) for i in range(3)}
    with session_scope() as session:
        rows = session.execute(select(Prompt.annotator, Prompt.slice_index, Prompt.label, Prompt.x0, Prompt.y0,
                                      Prompt.x1, Prompt.y1, Prompt.source)).all()
        assert {r.source for r in rows} == {"simulated"}
        stored = sorted((r.annotator, r.slice_index, r.label, (r.x0, r.y0, r.x1, r.y1)) for r in rows)
        assert stored == sorted((f"sim-0-{b.annotator}", b.k, b.label, b.box) for b in expected.boxes)
        assert session.scalar(select(func.count()).select_from(SliceView)) == out["seen_slices"]
    again = _simulate(client, tokens, vid, annotators=3, jitter=0.05, coverage=0.8, miss_rate=0.0, seed=0).json()
    assert again["stored"] == 0 and again["duplicates"] == out["boxes"]
    clash = _simulate(client, tokens, vid, annotators=3, jitter=0.2, seed=0)
    assert clash.status_code == 409
    only_liver = _simulate(client, tokens, vid, annotators=1, seed=5, labels=["liver"]).json()
    assert set(only_liver["per_label"]) == {"liver"}


def test_api_rejections(client, tokens, dataset, sm_volume):
    plain = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", case_id="noref").json()
    r = _simulate(client, tokens, plain["id"])
    assert r.status_code == 422 and "no reference" in r.text
    assert _simulate(client, tokens, sm_volume["id"], role="annotator").status_code == 403
    assert _simulate(client, tokens, sm_volume["id"], labels=["brain"]).status_code == 422
    assert _simulate(client, tokens, sm_volume["id"], coverage=1.5).status_code == 422
    assert _simulate(client, tokens, sm_volume["id"], annotators=0).status_code == 422
