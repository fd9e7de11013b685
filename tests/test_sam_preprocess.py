"""Per-family preprocessing as units: window, intensity, resize, prompt transforms, thresholds.

Geometry is proved without weights: a bright rectangle in the display slice must land exactly where
the family's box transform puts its box, and a decoder logit map that is positive inside the
transformed box must come back as the rectangle on the display grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.build_sam import _build_sam

from app.imaging.render import window_to_uint8
from workers.sam import preprocess
from workers.sam.models import build_litemedsam

H, W = 101, 122  # display size of the shared CT (rows = A→P, cols = R→L)
RECT = (30.0, 20.0, 70.0, 60.0)  # x0, y0, x1, y1 (display pixels, x1/y1 exclusive)


def tiny_vit_sam() -> torch.nn.Module:
    """segment_anything's real ViT SAM (1024 frame) scaled down: 2 blocks, 32-dim tokens."""
    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                      encoder_global_attn_indexes=[1], checkpoint=None)


@pytest.fixture(scope="module")
def lite() -> torch.nn.Module:
    return build_litemedsam()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return tiny_vit_sam()


def ct_with_rectangle() -> np.ndarray:
    image = np.full((H, W), -1000, dtype=np.int16)  # air
    x0, y0, x1, y1 = (int(v) for v in RECT)
    image[y0:y1, x0:x1] = 300  # above the window top: 255 after windowing
    image[0, 0] = -100  # a darker grey somewhere (min-max must keep the rectangle the brightest)
    return image


def test_window_uint8() -> None:
    values = np.array([-1000, -160, 40, 240, 3000])
    assert window_to_uint8(values, 40, 400).tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError):
        window_to_uint8(values, 40, 0)
    # One CT window: what the annotators see is exactly what the SAM encoder gets.
    assert preprocess.window_to_uint8 is window_to_uint8


def test_minmax_uint8() -> None:
    assert preprocess.minmax_uint8(np.array([10, 20, 30], dtype=np.uint8)).tolist() == [0, 128, 255]
    assert preprocess.minmax_uint8(np.full(3, 7, dtype=np.uint8)).tolist() == [0, 0, 0]


def _bright_bbox(tensor: torch.Tensor) -> tuple[int, int, int, int]:
    channel = tensor[0, 0].numpy()
    bright = channel > (channel.max() + channel.min()) / 2
    rows = np.flatnonzero(bright.any(axis=1))
    cols = np.flatnonzero(bright.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] + 1), int(rows[-1] + 1)


def _roundtrip_mask(family: preprocess.Family, sam: torch.nn.Module) -> np.ndarray:
    box = family.boxes(np.array([RECT]), (H, W))[0]
    scale = 256 / family.img_size  # decoder low-res frame is 256x256 for every family
    low = torch.full((1, 1, 256, 256), -10.0)
    x0, y0, x1, y1 = (round(float(v) * scale) for v in box)
    low[0, 0, y0:y1, x0:x1] = 10.0
    probs, masks = family.postprocess(low, (H, W), sam)
    assert probs.shape == masks.shape == (1, H, W)
    assert torch.equal(masks, probs > 0.5)
    return masks[0].numpy()


def _rect_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in RECT)
    mask[y0:y1, x0:x1] = True
    return mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_litemedsam_geometry_and_intensity(lite: torch.nn.Module) -> None:
    family = preprocess.LiteMedSAMFamily()
    prepared = family.encoder_input(ct_with_rectangle(), (40, 400), lite)
    assert prepared.tensor.shape == (1, 3, 256, 256)
    assert prepared.input_size == (212, 256) == family.input_size((H, W))  # longest side 122 -> 256
    assert float(prepared.tensor.min()) == 0.0 and float(prepared.tensor.max()) == 1.0  # min-max, /255
    assert float(prepared.tensor[..., 212:, :].abs().max()) == 0.0  # padding below
    box = family.boxes(np.array([RECT]), (H, W))[0]
    assert box == pytest.approx(np.array(RECT) * np.array([256 / 122, 212 / 101] * 2))  # ResizeLongestSide
    bright = _bright_bbox(prepared.tensor)
    assert np.abs(np.array(bright) - box).max() <= 1.0
    assert _dice(_roundtrip_mask(family, lite), _rect_mask()) > 0.97


def test_litemedsam_matches_sam_predictor(lite: torch.nn.Module) -> None:
    """The family's encoder input is SamPredictor.set_image's, after window + min-max."""
    image = np.linspace(-300, 400, H * W).reshape(H, W)
    family = preprocess.LiteMedSAMFamily()
    ours = family.encoder_input(image, (40, 400), lite).tensor
    rgb = preprocess.minmax_uint8(preprocess.to_rgb(window_to_uint8(image, 40, 400)))
    predictor = SamPredictor(lite)
    resized = predictor.transform.apply_image(rgb)
    theirs = lite.preprocess(torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float())
    assert torch.equal(ours, theirs)


def test_sam_vit_geometry_and_normalisation(vit: torch.nn.Module) -> None:
    family = preprocess.SamFamily()
    prepared = family.encoder_input(ct_with_rectangle(), (40, 400), vit)
    assert prepared.tensor.shape == (1, 3, 1024, 1024)
    assert prepared.input_size == (848, 1024)
    # ImageNet mean/std: air (0) -> -mean/std per channel, padding is exactly 0
    expected_air = -torch.tensor([123.675, 116.28, 103.53]) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(prepared.tensor[0, :, 800, 1000], expected_air)
    assert float(prepared.tensor[..., 848:, :].abs().max()) == 0.0
    box = family.boxes(np.array([RECT]), (H, W))[0]
    assert box == pytest.approx(SamPredictor(vit).transform.apply_boxes(np.array([RECT]), (H, W))[0])
    assert box == pytest.approx(np.array(RECT) * np.array([1024 / 122, 848 / 101] * 2))
    assert np.abs(np.array(_bright_bbox(prepared.tensor)) - box).max() <= 1.0
    assert family.coords(np.array([[61.0, 50.5]]), (H, W))[0] == pytest.approx([61 * 1024 / 122, 50.5 * 848 / 101])
    assert _dice(_roundtrip_mask(family, vit), _rect_mask()) > 0.97


def test_medsam_squashed_resize_unit_range_and_box(vit: torch.nn.Module) -> None:
    family = preprocess.MedSAMFamily()
    prepared = family.encoder_input(ct_with_rectangle(), (40, 400), vit)
    assert prepared.tensor.shape == (1, 3, 1024, 1024) and prepared.input_size == (1024, 1024)
    assert float(prepared.tensor.min()) == 0.0 and float(prepared.tensor.max()) == 1.0
    box = family.boxes(np.array([RECT]), (H, W))[0]
    x0, y0, x1, y1 = RECT
    assert box == pytest.approx([x0 / W * 1024, y0 / H * 1024, x1 / W * 1024, y1 / H * 1024])  # per axis
    assert np.abs(np.array(_bright_bbox(prepared.tensor)) - box).max() <= 2.0
    assert _dice(_roundtrip_mask(family, vit), _rect_mask()) > 0.97


def test_signatures_differ_by_family_and_window() -> None:
    lite, sam, med = preprocess.LiteMedSAMFamily(), preprocess.SamFamily(), preprocess.MedSAMFamily()
    assert len({f.signature((40, 400)) for f in (lite, sam, med)}) == 3
    assert lite.signature((40, 400)) != lite.signature((50, 400))
    assert lite.signature((40, 400)) == preprocess.LiteMedSAMFamily().signature((40.0, 400.0))
