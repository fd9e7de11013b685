"""The ONNX Runtime backend against the torch backend, on the real LiteMedSAM weights and the real CT.

Both engines share one loaded model; the ONNX one exports it (encoder + prompt decoder) once per test
session. Masks must agree per slice (Dice ≥ 0.995) on both sample CTs, a prompt's mask must not
depend on the other prompts of its decoder batch, and the two backends never share cache entries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.imaging.coords import display_slice
from app.prompts.simulate import simulate_crowd
from tests.conftest import ABDOMEN_LABELS
from tests.test_sam_engine import WINDOW, Case, load_case
from workers.sam.backends import OnnxBackend, TorchBackend, resolve_backend
from workers.sam.decode import DecodePrompt, decoder_batches
from workers.sam.engine import PromptIn, SegmentationEngine
from workers.sam.onnx_export import export_dir, export_model

pytestmark = pytest.mark.model

CASES = {"example_ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
         "example_ct_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz")}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SegmentationEngine]:
    torch_engine = SegmentationEngine("litemedsam", device="cpu", threads=2, backend="torch",
                                      cache_dir=tmp_path_factory.mktemp("torch-cache"))
    onnx_engine = SegmentationEngine("litemedsam", device="cpu", threads=2, backend="onnx",
                                     cache_dir=tmp_path_factory.mktemp("onnx-cache"), loaded=torch_engine.model,
                                     weights_id=torch_engine.weights_id)
    return {"torch": torch_engine, "onnx": onnx_engine}


def crowd_prompts(case: Case, slices: int) -> dict[int, list[PromptIn]]:
    """A simulated crowd of 3 on ``slices`` organ slices spread over the volume."""
    reference = np.asarray(case.orientation.canonical(case.reference))
    crowd = simulate_crowd(reference, ABDOMEN_LABELS, annotators=3, jitter=0.05, coverage=1.0, seed=3)
    prompts: dict[int, list[PromptIn]] = {}
    for box in crowd.boxes:
        prompts.setdefault(box.k, []).append(PromptIn(f"a{box.annotator}", box.label, "box", box.box))
    ordered = sorted(prompts)
    picks = sorted({ordered[i] for i in np.linspace(0, len(ordered) - 1, slices).round().astype(int)})
    return {k: prompts[k] for k in picks}


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_masks_match_torch_per_slice(name: str, engines: dict[str, SegmentationEngine]) -> None:
    case = load_case(*CASES[name])
    prompts = crowd_prompts(case, slices=5)
    k0 = min(prompts)
    first = prompts[k0][0]  # one point-refined box and one point-only prompt: every token layout
    x0, y0, x1, y1 = first.coords
    prompts[k0] = [*prompts[k0], PromptIn(first.annotator, first.label, "point", ((x0 + x1) / 2, (y0 + y1) / 2)),
                   PromptIn("a9", first.label, "point", ((x0 + x1) / 2, (y0 + y1) / 2))]
    outputs = {kind: engine.segment(case.canonical, window=WINDOW, image_id=name, prompts=prompts,
                                    label_values=ABDOMEN_LABELS) for kind, engine in engines.items()}
    assert outputs["onnx"].encoded == outputs["torch"].encoded == len(prompts)
    scores = []
    for k in prompts:
        for value in ABDOMEN_LABELS.values():
            a, b = outputs["torch"].labels[:, :, k] == value, outputs["onnx"].labels[:, :, k] == value
            if a.any() or b.any():
                scores.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    assert scores and min(scores) >= 0.995, scores


def test_a_prompts_mask_does_not_depend_on_its_batch(engines: dict[str, SegmentationEngine]) -> None:
    case = load_case(*CASES["example_ct_sm"])
    display = display_slice(case.canonical, 15)
    alone = DecodePrompt(box=(60.0, 40.0, 110.0, 90.0))
    others = [DecodePrompt(box=(20.0, 20.0, 70.0, 70.0), points=((45.0, 45.0),), point_labels=(1,)),
              DecodePrompt(points=((90.0, 60.0), (30.0, 30.0)), point_labels=(1, 0)), alone]
    assert decoder_batches(others, 8) == [[0], [1], [2]]  # one call per token layout
    for engine in engines.values():
        backend = engine.backend
        embedding = backend.encode(display, WINDOW)
        single_probs, single_masks = backend.decode(embedding, [alone], display.shape)
        mixed_probs, mixed_masks = backend.decode(embedding, others, display.shape)
        assert np.array_equal(mixed_masks[2], single_masks[0])
        np.testing.assert_allclose(mixed_probs[2], single_probs[0], atol=1e-6)
        assert mixed_masks.shape == (3, *display.shape) and mixed_masks[0].any() and mixed_masks[1].any()


def test_backends_never_share_cache_entries(engines: dict[str, SegmentationEngine]) -> None:
    keys = {kind: engine.embedding_key("img", 3, "digest", WINDOW) for kind, engine in engines.items()}
    assert keys["torch"] != keys["onnx"]
    assert isinstance(engines["torch"].backend, TorchBackend) and isinstance(engines["onnx"].backend, OnnxBackend)


def test_export_is_cached_by_weights_and_written_atomically(engines: dict[str, SegmentationEngine],
                                                            tmp_path: Path) -> None:
    sam = engines["torch"].model.sam
    files = export_model(sam, tmp_path, "litemedsam", "w-one")
    stamp = files.decoder.stat().st_mtime_ns
    assert export_model(sam, tmp_path, "litemedsam", "w-one") == files  # no second export
    assert files.decoder.stat().st_mtime_ns == stamp
    assert files.encoder.parent == export_dir(tmp_path, "litemedsam", "w-one")
    leftovers = [p.name for p in (tmp_path / "onnx").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary export folder was renamed into place


def test_backend_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "onnx" and resolve_backend("auto", cuda) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("onnx", cuda)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", cpu)
