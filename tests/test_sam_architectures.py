"""ViT-B/L/H and MedSAM code paths on the real segment_anything architectures, without checkpoints.

Full-size models are built on the meta device (no memory) to prove the registry's architectures;
the engine runs end to end on a scaled-down ImageEncoderViT (same classes, 1024 frame) for the
``sam`` and ``medsam`` families (a full random ViT-B encode takes ~1 min on 2 busy cores).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from app.imaging.coords import Orientation
from tests.conftest import CT_DIR
from tests.test_sam_preprocess import tiny_vit_sam
from workers.sam.engine import PromptIn, SegmentationEngine
from workers.sam.models import build_architecture, wrap_model

LABELS = {"spleen": 1, "liver": 5}


@pytest.fixture(scope="module")
def small_volume() -> np.ndarray:
    img = nib.load(CT_DIR / "example_ct_sm.nii.gz")
    orientation = Orientation.from_affine(img.affine, img.shape)
    return np.asarray(orientation.canonical(np.asanyarray(img.dataobj)))[:, :, 10:13]


def _prompts() -> dict[int, list[PromptIn]]:
    return {
        0: [PromptIn("a", "liver", "box", (10, 20, 50, 70)), PromptIn("b", "liver", "box", (12, 22, 52, 72)),
            PromptIn("a", "spleen", "box", (80, 40, 110, 80)),
            PromptIn("a", "spleen", "point", (95, 60), True), PromptIn("a", "spleen", "point", (70, 50), False)],
        2: [PromptIn("c", "liver", "point", (30, 40), True)],  # points only
    }


@pytest.mark.parametrize(("name", "params_m"), [("sam_vit_b", 93.7), ("sam_vit_l", 312.3), ("sam_vit_h", 641.1),
                                                ("medsam", 93.7), ("litemedsam", 9.8)])
def test_real_architectures_build(name: str, params_m: float) -> None:
    if name == "litemedsam":  # TinyViT calls .item() at build time: small enough to build for real
        sam = build_architecture(name)
    else:
        with torch.device("meta"):  # full size without allocating weights
            sam = build_architecture(name)
    count = sum(p.numel() for p in sam.parameters()) / 1e6
    assert count == pytest.approx(params_m, rel=0.01)
    side = 256 if name == "litemedsam" else 1024
    assert sam.image_encoder.img_size == side
    assert sam.prompt_encoder.input_image_size == (side, side)
    assert sam.prompt_encoder.image_embedding_size == (64, 64)


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_vit_h", "medsam"])
def test_engine_runs_scaled_down_vit(name: str, small_volume: np.ndarray, tmp_path: Path) -> None:
    loaded = wrap_model(name, tiny_vit_sam())
    engine = SegmentationEngine(name, device="cpu", cache_dir=tmp_path, threads=2, loaded=loaded, weights_id="tiny0")
    seen: list[tuple[int, int]] = []
    out = engine.segment(small_volume, window=(40, 400), image_id="img", prompts=_prompts(),
                         label_values=LABELS, progress=lambda done, total: seen.append((done, total)))
    assert out.labels.shape == small_volume.shape and out.labels.dtype == np.uint8
    assert set(np.unique(out.labels)) <= {0, 1, 5}
    assert not out.labels[:, :, 1].any()  # unprompted slice stays 0
    assert out.prompted_slices == [0, 2] and (out.encoded, out.decoded) == (2, 2)
    assert seen == [(1, 2), (2, 2)]
    assert set(out.per_slice[0]) == {"liver", "spleen"}
    assert out.per_slice[0]["liver"]["annotators"] == ["a", "b"]
    assert set(out.per_slice[0]["liver"]["agreement"]) == {"a", "b"}
    assert set(out.per_slice[2]) == {"liver"}
    again = engine.segment(small_volume, window=(40, 400), image_id="img", prompts=_prompts(), label_values=LABELS)
    assert (again.encoded, again.decoded) == (0, 0) and np.array_equal(again.labels, out.labels)
    cached = engine.embeddings.get(engine.embedding_key("img", 0, _slice_digest(small_volume, 0), (40.0, 400.0)))
    assert cached is not None and cached["embedding"].shape == (1, 256, 64, 64)


def _slice_digest(volume: np.ndarray, k: int) -> str:
    from app.imaging.coords import display_slice
    from workers.sam.plan import slice_digest

    return slice_digest(display_slice(volume, k))
