"""The engine's plan stage (workers/sam/plan.py): decoder prompts, voters, cache keys, request checks."""

from __future__ import annotations

import numpy as np
import pytest

from workers.sam.plan import ModelIdentity, PromptIn, decode_items, plan

MODEL = ModelIdentity("litemedsam", "w0", "prep0")
LABELS = {"liver": 1, "spleen": 2}


def box(annotator: str, x0: float, y0: float, x1: float, y1: float, label: str = "liver") -> PromptIn:
    return PromptIn(annotator, label, "box", (x0, y0, x1, y1))


def point(annotator: str, x: float, y: float, positive: bool = True, label: str = "liver") -> PromptIn:
    return PromptIn(annotator, label, "point", (x, y), positive)


def test_points_join_the_box_that_contains_them() -> None:
    items = decode_items([box("a", 0, 0, 10, 10), box("a", 20, 20, 30, 30), point("a", 5, 5),
                          point("a", 25, 25, positive=False)])
    assert [(i.prompt.box, i.prompt.points, i.prompt.point_labels) for i in items] == [
        ((0.0, 0.0, 10.0, 10.0), ((5.0, 5.0),), (1,)),
        ((20.0, 20.0, 30.0, 30.0), ((25.0, 25.0),), (0,)),
    ]


def test_points_outside_every_box() -> None:
    # a positive point outside the boxes is its own prompt (with the other loose points) ...
    items = decode_items([box("a", 0, 0, 10, 10), point("a", 50, 50), point("a", 60, 60, positive=False)])
    assert [(i.prompt.box, i.prompt.points) for i in items] == [
        ((0.0, 0.0, 10.0, 10.0), ()), (None, ((50.0, 50.0), (60.0, 60.0)))]
    # ... a negative point outside every box says nothing about any mask
    items = decode_items([box("a", 0, 0, 10, 10), point("a", 60, 60, positive=False)])
    assert [(i.prompt.box, i.prompt.points) for i in items] == [((0.0, 0.0, 10.0, 10.0), ())]
    # another annotator's or another label's points never join
    items = decode_items([box("a", 0, 0, 10, 10), point("b", 5, 5), point("a", 5, 5, label="spleen")])
    assert [(i.label, i.annotator, i.prompt.box) for i in items] == [
        ("liver", "a", (0.0, 0.0, 10.0, 10.0)), ("liver", "b", None), ("spleen", "a", None)]


def test_order_does_not_change_the_items() -> None:
    prompts = [box("b", 1, 1, 9, 9), box("a", 0, 0, 10, 10), point("a", 5, 5), box("a", 2, 2, 4, 4, "spleen")]
    assert decode_items(prompts) == decode_items(list(reversed(prompts)))


def test_voters_and_keys() -> None:
    volume = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    prompts = {0: [box("a", 0, 0, 2, 2)], 2: [box("b", 0, 0, 2, 2)]}
    plans = plan(volume, image_id="img", model=MODEL, prompts=prompts, label_values=LABELS, method="majority",
                 views={0: ["c", "a"], 1: ["c"]})
    assert [(p.k, p.voters) for p in plans] == [(0, ("a", "c")), (2, ("b",))]  # slice 1: seen, nothing to decode
    again = plan(volume, image_id="img", model=MODEL, prompts=prompts, label_values=LABELS, method="majority")
    assert again[0].embedding_key == plans[0].embedding_key  # who voted does not change the image embedding
    assert again[0].decoded_key != plans[0].decoded_key  # ... but changes the fused slice
    assert again[1].decoded_key == plans[1].decoded_key
    other = plan(volume, image_id="img", model=ModelIdentity("litemedsam", "w1", "prep0"), prompts=prompts,
                 label_values=LABELS, method="majority")
    assert other[0].embedding_key != plans[0].embedding_key
    weighted = [plan(volume, image_id="img", model=MODEL, prompts=prompts, label_values=LABELS, method="weighted",
                     weights={"a": w}) for w in ((0.9, 0.9), (0.6, 0.9))]
    assert weighted[0][0].decoded_key != weighted[1][0].decoded_key  # new reliability: fused again
    assert weighted[0][1].decoded_key == weighted[1][1].decoded_key  # slice 2 has no vote of "a"


@pytest.mark.parametrize(("prompts", "method", "message"), [
    ({0: [box("a", 1, 1, 5, 5, "heart")]}, "majority", "label 'heart'"),
    ({3: [box("a", 1, 1, 5, 5)]}, "majority", "outside the volume"),
    ({0: [box("a", 5, 5, 1, 1)]}, "majority", "is empty"),
    ({0: [PromptIn("a", "liver", "point", (1, 2, 3))]}, "majority", "needs 2"),
    ({0: [PromptIn("a", "liver", "box", (1, 2, float("nan"), 4))]}, "majority", "finite"),
    ({0: [box("a", 1, 1, 5, 5)]}, "vote", "unknown fusion"),
])
def test_bad_requests_fail_in_the_plan(prompts: dict[int, list[PromptIn]], method: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(np.zeros((4, 5, 3), np.int16), image_id="x", model=MODEL, prompts=prompts, label_values=LABELS,
             method=method)


def test_gap_filling_interpolates_between_prompted_slices() -> None:
    from workers.sam.plan import DERIVED, gap_prompts

    prompts = {2: [box("a", 0, 0, 10, 10), box("b", 2, 2, 12, 12)], 5: [box("a", 30, 30, 40, 40)],
               9: [box("a", 0, 0, 4, 4)], 6: [box("a", 1, 1, 3, 3, "spleen")]}
    derived = gap_prompts(prompts, views={4: ["c"]}, max_gap=2)
    # 3: between 2 and 5 (gap 2), interpolated 1/3 of the way from the median box (1,1,11,11) to (30,30,40,40);
    # 4: seen by c (known: "absent"), never filled; 6-8: gap of 3 > max_gap; spleen: one slice only
    assert sorted(derived) == [3]
    (only,) = derived[3]
    assert only.annotator == DERIVED and only.label == "liver"
    assert only.coords == pytest.approx((1 + 29 / 3, 1 + 29 / 3, 11 + 29 / 3, 11 + 29 / 3))
    assert sorted(gap_prompts(prompts, views=None, max_gap=3)) == [3, 4, 7, 8]  # 6 has a (spleen) prompt


def test_derived_slices_are_planned_apart() -> None:
    volume = np.zeros((40, 40, 6), np.int16)
    prompts = {1: [box("a", 0, 0, 10, 10)], 3: [box("a", 0, 0, 10, 10)]}
    plans = plan(volume, image_id="i", model=MODEL, prompts=prompts, label_values=LABELS, method="majority",
                 fill_gaps=1)
    assert [(p.k, p.derived) for p in plans] == [(1, False), (2, True), (3, False)]
    assert plan(volume, image_id="i", model=MODEL, prompts=prompts, label_values=LABELS,
                method="majority")[1].k == 3  # off by default
