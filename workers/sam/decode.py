"""Image encoding and batched prompt decoding for one slice on a loaded SAM-family model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from workers.sam.models import LoadedModel


@dataclass(frozen=True)
class DecodePrompt:
    """One decoder batch element: an optional box and any positive/negative points (display pixels)."""

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = field(default=())  # 1 positive, 0 negative

    def __post_init__(self) -> None:
        if self.box is None and not self.points:
            raise ValueError("a decode prompt needs a box or at least one point")
        if len(self.points) != len(self.point_labels):
            raise ValueError("points and point_labels differ in length")


@torch.inference_mode()
def encode(model: LoadedModel, display: npt.NDArray[np.generic], window: tuple[float, float]) -> torch.Tensor:
    """(1, C, h, w) image embedding of one display slice."""
    prepared = model.family.encoder_input(display, window, model.sam)
    return model.sam.image_encoder(prepared.tensor)


def _sparse_embeddings(model: LoadedModel, prompts: list[DecodePrompt], original_size: tuple[int, int],
                       device: torch.device) -> torch.Tensor:
    encoder = model.sam.prompt_encoder
    family = model.family
    n = len(prompts)
    has_box = [p.box is not None for p in prompts]
    n_points = max(len(p.points) for p in prompts)
    boxes = None
    if any(has_box):
        raw = np.array([p.box if p.box is not None else (0.0, 0.0, 0.0, 0.0) for p in prompts], dtype=np.float64)
        boxes = torch.as_tensor(family.boxes(raw, original_size), dtype=torch.float, device=device)
    if n_points == 0:
        assert boxes is not None
        sparse, _ = encoder(points=None, boxes=boxes, masks=None)  # SamPredictor's exact path
        return sparse
    coords = np.zeros((n, n_points, 2), dtype=np.float64)
    labels = -np.ones((n, n_points), dtype=np.int64)  # -1: padding ("not a point"), SAM's own convention
    for i, prompt in enumerate(prompts):
        if prompt.points:
            coords[i, : len(prompt.points)] = family.coords(np.array(prompt.points, dtype=np.float64), original_size)
            labels[i, : len(prompt.points)] = prompt.point_labels
    coords_t = torch.as_tensor(coords, dtype=torch.float, device=device)
    labels_t = torch.as_tensor(labels, dtype=torch.int, device=device)
    if boxes is None:
        sparse, _ = encoder(points=(coords_t, labels_t), boxes=None, masks=None)  # pads one -1 point
        return sparse
    point_emb = encoder._embed_points(coords_t, labels_t, pad=False)
    box_emb = encoder._embed_boxes(boxes)
    missing = torch.as_tensor([not b for b in has_box], device=device)
    box_emb[missing] = encoder.not_a_point_embed.weight.to(box_emb.dtype)  # no box: two padding tokens
    return torch.cat([point_emb, box_emb], dim=1)


# On CPU the batched mask decoder is memory-bound: every prompt carries its own copy of the
# 256x64x64 image embedding through the two-way transformer, and a 12-prompt batch (≈50 MB per
# activation) falls out of cache. Measured on the 2-core build machine, LiteMedSAM, 12 boxes of one
# slice: one call 1.04 s; chunks of 2: 0.68 s; chunks of 1: 0.75 s. GPUs take the whole batch.
CPU_DECODE_CHUNK = 2


@torch.inference_mode()
def decode(model: LoadedModel, embedding: torch.Tensor, prompts: list[DecodePrompt],
           original_size: tuple[int, int], *, chunk: int | None = None,
           ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """All prompts of one slice, batched (``multimask_output=False``): one decoder call on GPU,
    chunks of ``CPU_DECODE_CHUNK`` prompts on CPU (see above).

    Returns per-prompt probabilities (N, H, W) float32 and masks (N, H, W) bool on the display grid.
    """
    if not prompts:
        raise ValueError("decode needs at least one prompt")
    if chunk is None:
        chunk = len(prompts) if embedding.device.type == "cuda" else CPU_DECODE_CHUNK
    parts = [_decode_batch(model, embedding, prompts[i:i + chunk], original_size)
             for i in range(0, len(prompts), chunk)]
    return (np.concatenate([probs for probs, _ in parts]), np.concatenate([masks for _, masks in parts]))


def _decode_batch(model: LoadedModel, embedding: torch.Tensor, prompts: list[DecodePrompt],
                  original_size: tuple[int, int]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    sam = model.sam
    device = embedding.device
    sparse = _sparse_embeddings(model, prompts, original_size, device)
    dense_shape = sam.prompt_encoder.image_embedding_size
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        len(prompts), -1, dense_shape[0], dense_shape[1])
    low_res, _iou = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    probs, masks = model.family.postprocess(low_res.float(), original_size, sam)
    return probs.cpu().numpy().astype(np.float32), masks.cpu().numpy().astype(bool)
