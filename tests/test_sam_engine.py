"""SegmentationEngine with the real LiteMedSAM weights on the real CT.

Tight boxes from the reference masks, one per connected 2D part (app.prompts.simulate), on every
slice holding an organ; Dice is computed per prompted slice on the ORIGINAL grid after mapping the
canonical label map back, for the RAS file and an LPS-reoriented copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from app.imaging.coords import Orientation, orientation_codes
from app.prompts.simulate import reference_boxes, simulate_crowd
from tests.conftest import ABDOMEN_LABELS, CT_DIR
from workers.sam.engine import PromptIn, SegmentationEngine, SegmentationOutput

pytestmark = pytest.mark.model

WINDOW = (40.0, 400.0)
FLOOR = {"spleen": 0.90, "kidney_right": 0.90, "kidney_left": 0.90, "aorta": 0.90, "liver": 0.83}


@dataclass
class Case:
    original: np.ndarray
    reference: np.ndarray  # original grid, dataset label values
    orientation: Orientation
    canonical: np.ndarray


def load_case(image: str, seg: str, axcodes: str | None = None) -> Case:
    img, ref = nib.load(CT_DIR / image), nib.load(CT_DIR / seg)
    if axcodes is not None:
        turn = ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(axcodes)))
        img, ref = img.as_reoriented(turn), ref.as_reoriented(turn)
        assert orientation_codes(img.affine) == axcodes
    raw = np.asanyarray(ref.dataobj).astype(np.int16)
    reference = np.zeros(raw.shape, dtype=np.uint8)
    for value in ABDOMEN_LABELS.values():  # TotalSegmentator values are the dataset values here
        reference[raw == value] = value
    original = np.asanyarray(img.dataobj)
    orientation = Orientation.from_affine(img.affine, img.shape)
    return Case(original, reference, orientation, np.asarray(orientation.canonical(original)))


def tight_prompts(case: Case) -> dict[int, list[PromptIn]]:
    canonical_ref = np.asarray(case.orientation.canonical(case.reference))
    boxes = reference_boxes(canonical_ref, ABDOMEN_LABELS, per_component=True)
    return {k: [PromptIn("sim", label, "box", box) for label, items in per.items() for box in items]
            for k, per in boxes.items()}


def per_slice_dice(case: Case, out: SegmentationOutput) -> dict[str, float]:
    """Mean per-slice Dice over prompted slices holding the organ, on the original grid."""
    mask = np.asarray(case.orientation.original(out.labels))
    assert mask.shape == case.original.shape
    ref_canonical = np.asarray(case.orientation.canonical(case.reference))
    pred_canonical = np.asarray(case.orientation.canonical(mask))  # axial slices, whatever the file order
    result = {}
    for label, value in ABDOMEN_LABELS.items():
        scores = []
        for k in out.prompted_slices:
            ref, pred = ref_canonical[:, :, k] == value, pred_canonical[:, :, k] == value
            if ref.any():
                scores.append(2 * float((ref & pred).sum()) / float(ref.sum() + pred.sum()))
        result[label] = float(np.mean(scores))
    return result


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sam-cache")


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> SegmentationEngine:
    return SegmentationEngine("litemedsam", device="cpu", cache_dir=cache_dir, threads=2)


@pytest.fixture(scope="module")
def sm() -> Case:
    return load_case("example_ct_sm.nii.gz", "example_seg.nii.gz")


@pytest.fixture(scope="module")
def sm_run(engine: SegmentationEngine, sm: Case) -> SegmentationOutput:
    return engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=tight_prompts(sm),
                          label_values=ABDOMEN_LABELS)


def test_quality_example_ct_sm(sm: Case, sm_run: SegmentationOutput) -> None:
    assert sm_run.encoded == sm_run.decoded == len(sm_run.prompted_slices) == 30
    dice = per_slice_dice(sm, sm_run)
    print("example_ct_sm per-slice Dice", dice)
    for label, floor in FLOOR.items():
        assert dice[label] >= floor, (label, dice[label])
    assert set(np.unique(sm_run.labels)) == {0, *ABDOMEN_LABELS.values()}
    for k, per in sm_run.per_slice.items():
        for stats in per.values():
            assert stats["annotators"] == ["sim"] and stats["agreement"] == {"sim": 1.0}
            assert 0.5 < stats["score"] <= 1.0, (k, stats)


def test_lps_copy_gives_the_same_masks(engine: SegmentationEngine, sm: Case, sm_run: SegmentationOutput) -> None:
    lps = load_case("example_ct_sm.nii.gz", "example_seg.nii.gz", axcodes="LPS")
    assert lps.original.shape == sm.original.shape and not np.array_equal(lps.original, sm.original)
    assert np.array_equal(lps.canonical, sm.canonical)
    out = engine.segment(lps.canonical, window=WINDOW, image_id="sm-lps", prompts=tight_prompts(lps),
                         label_values=ABDOMEN_LABELS)
    assert out.encoded == 30  # another image id: encoded afresh, and still bit-identical (deterministic)
    assert np.array_equal(out.labels, sm_run.labels)
    assert per_slice_dice(lps, out) == per_slice_dice(sm, sm_run)


def test_rerun_and_one_added_box(engine: SegmentationEngine, sm: Case, sm_run: SegmentationOutput) -> None:
    prompts = tight_prompts(sm)
    again = engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                           label_values=ABDOMEN_LABELS)
    assert (again.encoded, again.decoded) == (0, 0)
    assert np.array_equal(again.labels, sm_run.labels) and again.per_slice == sm_run.per_slice
    k = sm_run.prompted_slices[12]
    liver_box = next(p for p in prompts[k] if p.label == "liver").coords
    x0, y0, x1, y1 = liver_box
    prompts[k] = [*prompts[k], PromptIn("second", "liver", "box", (x0 + 1, y0 - 1, x1 + 1, y1 + 1))]
    same = engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                          label_values=ABDOMEN_LABELS)
    assert (same.encoded, same.decoded) == (0, 1)  # majority: only slice k has new prompts
    others = [j for j in sm_run.prompted_slices if j != k]
    assert np.array_equal(same.labels[:, :, others], sm_run.labels[:, :, others])
    assert same.per_slice[k]["liver"]["annotators"] == ["second", "sim"]
    assert all(0.0 <= d <= 1.0 for d in same.per_slice[k]["liver"]["agreement"].values())


def test_new_process_reuses_the_disk_caches(cache_dir: Path, sm: Case, sm_run: SegmentationOutput) -> None:
    fresh = SegmentationEngine("litemedsam", device="cpu", cache_dir=cache_dir, threads=2)
    prompts = {k: v for k, v in tight_prompts(sm).items() if k in sm_run.prompted_slices[:3]}
    out = fresh.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                        label_values=ABDOMEN_LABELS)
    assert (out.encoded, out.decoded) == (0, 0)

    def forget(*caches: str) -> None:
        for name in caches:
            records = list((cache_dir / name).rglob("*.val"))  # diskcache's record files (the index stays)
            assert len(records) >= 3
            for path in records:
                path.unlink()
            getattr(fresh, {"decoded": "decoded", "prompts": "prompt_masks"}[name]).clear_memory()

    forget("decoded")  # the fused slices: each prompt's decoder output comes from the prompt cache, no model
    out = fresh.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                        label_values=ABDOMEN_LABELS)
    assert (out.encoded, out.decoded) == (0, 0)
    assert np.array_equal(out.labels[:, :, sorted(prompts)], sm_run.labels[:, :, sorted(prompts)])
    forget("decoded", "prompts")
    out = fresh.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                        label_values=ABDOMEN_LABELS)
    assert (out.encoded, out.decoded) == (0, 3)  # embeddings from disk, decoded again
    assert np.array_equal(out.labels[:, :, sorted(prompts)], sm_run.labels[:, :, sorted(prompts)])


def test_crowd_fusion_methods(engine: SegmentationEngine, sm: Case, sm_run: SegmentationOutput) -> None:
    canonical_ref = np.asarray(sm.orientation.canonical(sm.reference))
    crowd = simulate_crowd(canonical_ref, ABDOMEN_LABELS, annotators=3, jitter=0.05, coverage=1.0, seed=1)
    chosen = set(sm_run.prompted_slices[12:14])
    prompts: dict[int, list[PromptIn]] = {}
    for b in crowd.boxes:
        if b.k in chosen:
            prompts.setdefault(b.k, []).append(PromptIn(f"crowd{b.annotator}", b.label, "box", b.box))
    outs = {m: engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                              label_values=ABDOMEN_LABELS, fusion=m) for m in ("majority", "staple", "union")}
    assert all(o.encoded == 0 for o in outs.values())  # embeddings reused across fusion methods
    union_fg, majority_fg = outs["union"].labels > 0, outs["majority"].labels > 0
    assert union_fg.sum() >= majority_fg.sum() and (majority_fg & ~union_fg).sum() == 0
    for out in outs.values():
        for per in out.per_slice.values():
            for stats in per.values():
                assert stats["annotators"] == ["crowd0", "crowd1", "crowd2"]
                assert all(0.5 < d <= 1.0 for d in stats["agreement"].values()), stats
    dice = per_slice_dice(sm, outs["majority"])
    assert dice["liver"] > 0.83 and dice["spleen"] > 0.85


def test_invalid_requests_fail_before_any_work(engine: SegmentationEngine, sm: Case) -> None:
    box = PromptIn("a", "liver", "box", (1, 1, 5, 5))
    for prompts, labels, fusion, message in [
        ({0: [PromptIn("a", "heart", "box", (1, 1, 5, 5))]}, ABDOMEN_LABELS, "majority", "label 'heart'"),
        ({99: [box]}, ABDOMEN_LABELS, "majority", "outside the volume"),
        ({0: [PromptIn("a", "liver", "box", (5, 5, 1, 1))]}, ABDOMEN_LABELS, "majority", "is empty"),
        ({0: [PromptIn("a", "liver", "point", (1, 2, 3))]}, ABDOMEN_LABELS, "majority", "needs 2"),
        ({0: [box]}, ABDOMEN_LABELS, "vote", "unknown fusion"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.segment(sm.canonical, window=WINDOW, image_id="x", prompts=prompts, label_values=labels,
                           fusion=fusion)


def test_silent_viewers_vote_absent(engine: SegmentationEngine, sm: Case, sm_run: SegmentationOutput) -> None:
    """Real masks: a lone box among three viewers vanishes; a second box for it brings the organ back."""
    k = sm_run.prompted_slices[12]
    prompts = {k: [p for p in tight_prompts(sm)[k] if p.label == "liver"]}
    alone = engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                           label_values=ABDOMEN_LABELS, views={k: ["quiet1", "quiet2"]})
    assert alone.encoded == 0 and not alone.labels[:, :, k].any()
    assert alone.per_slice[k]["liver"]["annotators"] == ["quiet1", "quiet2", "sim"]
    assert alone.per_slice[k]["liver"]["agreement"]["quiet1"] == 1.0
    second = [PromptIn("quiet1", p.label, "box", p.coords) for p in prompts[k]]
    both = engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts={k: prompts[k] + second},
                          label_values=ABDOMEN_LABELS, views={k: ["quiet1", "quiet2"]})
    liver = ABDOMEN_LABELS["liver"]
    assert np.array_equal(both.labels[:, :, k] == liver, sm_run.labels[:, :, k] == liver)
    weighted = engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                              label_values=ABDOMEN_LABELS, views={k: ["quiet1", "quiet2"]}, fusion="weighted",
                              reliability={"sim": (0.99, 0.99), "quiet1": (0.3, 0.6), "quiet2": (0.3, 0.6)})
    assert np.array_equal(weighted.labels[:, :, k] == liver, sm_run.labels[:, :, k] == liver)  # trusted voter


def test_gap_filling_on_real_ct(engine: SegmentationEngine, sm: Case, sm_run: SegmentationOutput) -> None:
    """Every other prompted slice of the liver; the ones between are filled from their neighbours."""
    liver = ABDOMEN_LABELS["liver"]
    prompted = sm_run.prompted_slices[6:18:2]
    prompts = {k: [p for p in tight_prompts(sm)[k] if p.label == "liver"] for k in prompted}
    plain = engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                           label_values=ABDOMEN_LABELS)
    filled = engine.segment(sm.canonical, window=WINDOW, image_id="sm-ras", prompts=prompts,
                            label_values=ABDOMEN_LABELS, fill_gaps=1)
    gaps = [k for k in range(prompted[0], prompted[-1]) if k not in prompted]
    assert plain.derived_slices == [] and filled.derived_slices == gaps
    assert filled.prompted_slices == prompted == plain.prompted_slices
    assert np.array_equal(filled.labels[:, :, prompted], plain.labels[:, :, prompted])
    assert not plain.labels[:, :, gaps].any()
    ref = np.asarray(sm.orientation.canonical(sm.reference))
    scores = []
    for k in gaps:
        assert filled.per_slice[k]["liver"]["derived"] is True
        assert filled.per_slice[k]["liver"]["annotators"] == ["~derived"]
        truth, pred = ref[:, :, k] == liver, filled.labels[:, :, k] == liver
        scores.append(2 * float((truth & pred).sum()) / float(truth.sum() + pred.sum()))
    assert float(np.mean(scores)) > 0.8, scores  # interpolated boxes of neighbours one slice away
