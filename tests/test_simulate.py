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


# --- realistic noise: skill, careless annotators, false positives, organ-free slices ---------------------


@pytest.fixture(scope="module")
def canonical_full() -> np.ndarray:
    """The 112-slice reference of example_ct: 51 slices hold one of the five organs, 61 hold none."""
    img = nib.load(str(CT_DIR / "example_seg_fast_force_split.nii.gz"))
    data = np.asarray(img.dataobj).astype(np.int32)
    return Orientation.from_affine(img.affine, data.shape).canonical(data)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _organ_free(canonical: np.ndarray) -> set[int]:
    return set(range(canonical.shape[2])) - {int(k) for k in np.flatnonzero(
        np.isin(canonical, list(ORGANS.values())).any(axis=(0, 1)))}


def test_new_options_off_leave_the_crowd_as_it_was(canonical_seg, canonical_full):
    """Defaults draw exactly the crowd of the original model; organ-free slices leave organ boxes unchanged."""
    base = simulate_crowd(canonical_full, ORGANS, annotators=3, jitter=0.05, coverage=0.8, miss_rate=0.1, seed=5)
    assert base.careless == [] and not any(b.false_positive for b in base.boxes)
    truth = reference_boxes(canonical_full, ORGANS, min_component_pixels=10)
    assert all(set(s) <= set(truth) for s in base.seen.values())  # organ slices only
    wide = simulate_crowd(canonical_full, ORGANS, annotators=3, jitter=0.05, coverage=0.8, miss_rate=0.1, seed=5,
                          organ_free_slices=True)
    assert wide.boxes == base.boxes
    assert all(set(wide.seen[i]) & set(truth) == set(base.seen[i]) for i in range(3))


def test_careless_annotators_draw_measurably_worse_boxes(canonical_full):
    truth = reference_boxes(canonical_full, ORGANS, min_component_pixels=10)
    sim = simulate_crowd(canonical_full, ORGANS, annotators=5, careless=1, coverage=1.0, jitter=0.05, seed=2)
    assert sim.careless == [4]
    again = simulate_crowd(canonical_full, ORGANS, annotators=5, careless=1, coverage=1.0, jitter=0.05, seed=2)
    assert again.boxes == sim.boxes and again.seen == sim.seen  # deterministic per seed
    careful = simulate_crowd(canonical_full, ORGANS, annotators=5, coverage=1.0, jitter=0.05, seed=2)
    assert [b for b in sim.boxes if b.annotator < 4] == [b for b in careful.boxes if b.annotator < 4]

    n_truth = sum(len(parts) for labels in truth.values() for parts in labels.values())
    iou: dict[int, list[float]] = {i: [] for i in range(5)}
    for b in sim.boxes:
        if not b.false_positive:
            iou[b.annotator].append(_iou(b.box, truth[b.k][b.label][b.part]))
    careful_iou = [float(np.mean(iou[i])) for i in range(4)]
    assert min(careful_iou) > 0.8
    assert float(np.mean(iou[4])) < min(careful_iou) - 0.2  # jitter 0.2 vs 0.05
    assert all(len(iou[i]) == n_truth for i in range(4))  # careful: nothing missed (miss_rate 0)
    assert 0.6 * n_truth < len(iou[4]) < 0.8 * n_truth  # careless: ~30 % of the organs missed
    careless_fp = sum(b.false_positive for b in sim.boxes if b.annotator == 4)
    assert careless_fp > 0 and not any(b.false_positive for b in sim.boxes if b.annotator < 4)


def test_false_positives_only_for_absent_organs_at_the_configured_rate(canonical_full):
    organ_free = _organ_free(canonical_full)
    assert len(organ_free) == 61
    rate, n = 0.1, 20
    sim = simulate_crowd(canonical_full, ORGANS, annotators=n, coverage=1.0, organ_free_slices=True,
                         false_positive_rate=rate, seed=8)
    height, width = canonical_full.shape[1], canonical_full.shape[0]
    for b in sim.boxes:
        present = bool((display_slice(canonical_full, b.k) == ORGANS[b.label]).any())
        assert b.false_positive != present  # false positives exactly where the organ is absent
        x0, y0, x1, y1 = b.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    on_free = [b for b in sim.boxes if b.k in organ_free]
    assert all(b.false_positive for b in on_free)
    trials = n * len(organ_free) * len(ORGANS)  # (annotator, organ-free slice, organ)
    assert abs(len(on_free) / trials - rate) < 0.015  # 6100 trials: sd 0.004
    assert len({(b.annotator, b.k, b.label) for b in on_free}) == len(on_free)  # one box at most
    # a false positive repeats the organ's box of the nearest slice holding it (then jittered)
    truth = reference_boxes(canonical_full, ORGANS, min_component_pixels=10)
    exact = simulate_crowd(canonical_full, ORGANS, annotators=2, coverage=1.0, organ_free_slices=True,
                           false_positive_rate=1.0, jitter=0.0, seed=1)
    for b in (b for b in exact.boxes if b.false_positive):
        nearest = min((j for j in truth if b.label in truth[j]), key=lambda j: (abs(j - b.k), j))
        parts = truth[nearest][b.label]
        assert b.box == (min(p[0] for p in parts), min(p[1] for p in parts), max(p[2] for p in parts),
                         max(p[3] for p in parts))
    # without the option: no false positive, organ-free slices seen and left empty
    quiet = simulate_crowd(canonical_full, ORGANS, annotators=n, coverage=1.0, organ_free_slices=True, seed=8)
    assert not any(b.k in organ_free for b in quiet.boxes)
    assert all(organ_free <= set(s) for s in quiet.seen.values())


def test_organ_free_slices_are_seen_at_the_coverage_rate(canonical_full):
    organ_free = _organ_free(canonical_full)
    sim = simulate_crowd(canonical_full, ORGANS, annotators=30, coverage=0.5, organ_free_slices=True, seed=4)
    seen_free = sum(len(organ_free & set(s)) for s in sim.seen.values())
    assert 0.42 < seen_free / (30 * len(organ_free)) < 0.58
    assert all(s == sorted(s) for s in sim.seen.values())


def test_skill_spread_gives_each_annotator_its_own_error_rates(canonical_full):
    sim = simulate_crowd(canonical_full, ORGANS, annotators=8, jitter=0.05, miss_rate=0.1, false_positive_rate=0.02,
                         skill_spread=0.5, coverage=1.0, seed=6)
    jitters = [s.jitter for s in sim.skills]
    assert len(set(jitters)) == 8 and max(jitters) > 1.5 * min(jitters)
    for s in sim.skills:  # one factor scales every rate of an annotator
        assert s.miss_rate == pytest.approx(min(1.0, s.jitter / 0.05 * 0.1))
        assert s.false_positive_rate == pytest.approx(min(1.0, s.jitter / 0.05 * 0.02))
    with pytest.raises(ValueError, match="careless"):
        simulate_crowd(canonical_full, ORGANS, annotators=2, careless=3)


def test_api_simulates_careless_annotators_and_organ_free_slices(client, tokens, sm_volume, canonical_seg):
    """kidney_right lies on 19 of example_ct_sm's 30 slices: the other 11 are organ-free for that label."""
    vid = sm_volume["id"]
    kidney = {"kidney_right": ORGANS["kidney_right"]}
    free = set(range(30)) - {int(k) for k in np.flatnonzero((canonical_seg == 2).any(axis=(0, 1)))}
    assert len(free) == 11
    body = {"annotators": 4, "careless": 1, "coverage": 1.0, "organ_free_slices": True, "seed": 3,
            "labels": ["kidney_right"]}
    r = _simulate(client, tokens, vid, **body)
    assert r.status_code == 201, r.text
    out = r.json()
    expected = simulate_crowd(canonical_seg, kidney, annotators=4, careless=1, coverage=1.0, organ_free_slices=True,
                              seed=3)
    assert out["careless"] == ["sim-3-3"] and out["annotators"][3] == "sim-3-3"
    assert out["boxes"] == len(expected.boxes)
    assert out["false_positives"] == sum(b.false_positive for b in expected.boxes)
    assert out["false_positives"] > 0  # the careless annotator's default rate is 0.1 per absent organ
    assert out["seen_slices"] == 4 * 30
    with session_scope() as session:
        views = set(session.execute(select(SliceView.annotator, SliceView.slice_index)
                                    .where(SliceView.volume_id == vid)).tuples())
        assert views == {(f"sim-3-{i}", k) for i in range(4) for k in range(30)}  # organ-free slices included
        boxed_free = set(session.execute(select(Prompt.annotator, Prompt.slice_index).where(
            Prompt.volume_id == vid, Prompt.slice_index.in_(sorted(free)))).tuples())
    assert {a for a, _ in boxed_free} <= {"sim-3-3"}  # careful annotators answered "nothing" there
    again = _simulate(client, tokens, vid, **body).json()
    assert again["stored"] == 0 and again["duplicates"] == out["boxes"]
    assert _simulate(client, tokens, vid, annotators=2, careless=3).status_code == 422
