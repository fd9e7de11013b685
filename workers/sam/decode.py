"""Batched prompt decoding for one slice on a loaded SAM-family model (the torch backend's decoder)."""

from __future__ import annotations

from collections.abc import Callable
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


Layout = tuple[int, bool]  # (points, has a box): prompts with one layout have the same tokens


def layout(prompt: DecodePrompt) -> Layout:
    return (len(prompt.points), prompt.box is not None)


def decoder_batches(prompts: list[DecodePrompt], chunk: int) -> list[list[int]]:
    """Indices of ``prompts`` in decoder calls of at most ``chunk``, each call one :func:`layout`.

    Every prompt gets exactly SamPredictor's tokens for it alone (points, then the box corners, or
    one padding token when there is no box): padding tokens take part in the decoder's attention, so
    mixing layouts in one call would make a prompt's mask depend on its neighbours in the batch."""
    groups: dict[Layout, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(layout(prompt), []).append(index)
    return [indices[i:i + chunk] for indices in groups.values() for i in range(0, len(indices), chunk)]


Masks = tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]


def decode_in_batches(prompts: list[DecodePrompt], chunk: int,
                      run: Callable[[list[DecodePrompt]], Masks]) -> Masks:
    """``run`` on each of :func:`decoder_batches`, results back in the prompts' order."""
    if not prompts:
        raise ValueError("decode needs at least one prompt")
    probs: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(prompts)
    masks: list[npt.NDArray[np.bool_]] = [np.empty(0, bool)] * len(prompts)
    for indices in decoder_batches(prompts, chunk):
        batch_probs, batch_masks = run([prompts[i] for i in indices])
        for j, index in enumerate(indices):
            probs[index], masks[index] = batch_probs[j], batch_masks[j]
    return np.stack(probs), np.stack(masks)


def prompt_tokens(model: LoadedModel, prompts: list[DecodePrompt], original_size: tuple[int, int],
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """One layout's batch as decoder tokens: coordinates (B, N, 2) in the model frame and labels (B, N) —
    1/0 points, 2/3 box corners, -1 padding — as ``PromptEncoder`` builds them (points, then the box's
    corners or one padding token), so an exported decoder (:mod:`workers.sam.onnx_export`) sees
    exactly the torch backend's tokens."""
    (n_points, has_box), = {layout(p) for p in prompts}
    family = model.family
    coords = np.zeros((len(prompts), n_points + (2 if has_box else 1), 2), dtype=np.float64)
    labels = -np.ones(coords.shape[:2], dtype=np.float32)
    for i, prompt in enumerate(prompts):
        if prompt.points:
            coords[i, :n_points] = family.coords(np.array(prompt.points, dtype=np.float64), original_size)
            labels[i, :n_points] = prompt.point_labels
        if prompt.box is not None:
            coords[i, n_points:] = family.boxes(np.array([prompt.box], dtype=np.float64), original_size).reshape(2, 2)
            labels[i, n_points:] = (2.0, 3.0)
    return coords.astype(np.float32), labels


def _sparse_embeddings(model: LoadedModel, prompts: list[DecodePrompt], original_size: tuple[int, int],
                       device: torch.device) -> torch.Tensor:
    """One layout's batch through ``PromptEncoder`` itself (SamPredictor's path)."""
    (n_points, has_box), = {layout(p) for p in prompts}
    family = model.family
    boxes = points = None
    if has_box:
        raw = np.array([p.box for p in prompts], dtype=np.float64)
        boxes = torch.as_tensor(family.boxes(raw, original_size), dtype=torch.float, device=device)
    if n_points:
        coords = np.stack([family.coords(np.array(p.points, dtype=np.float64), original_size) for p in prompts])
        labels = np.array([p.point_labels for p in prompts], dtype=np.int64)
        points = (torch.as_tensor(coords, dtype=torch.float, device=device),
                  torch.as_tensor(labels, dtype=torch.int, device=device))
    sparse, _ = model.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    return sparse


# On CPU the batched mask decoder is memory-bound: every prompt carries its own copy of the
# 256x64x64 image embedding through the two-way transformer, and a 12-prompt batch (≈50 MB per
# activation) falls out of cache. Measured on the 2-core build machine, LiteMedSAM, 12 boxes of one
# slice: one call 1.04 s; chunks of 2: 0.68 s; chunks of 1: 0.75 s. GPUs take the whole batch.
CPU_DECODE_CHUNK = 2


@torch.inference_mode()
def decode(model: LoadedModel, embedding: torch.Tensor, prompts: list[DecodePrompt],
           original_size: tuple[int, int], *, chunk: int | None = None) -> Masks:
    """All prompts of one slice in :func:`decoder_batches` (``multimask_output=False``): as few calls
    as layouts on GPU, chunks of ``CPU_DECODE_CHUNK`` prompts on CPU (see above).

    Returns per-prompt probabilities (N, H, W) float32 and masks (N, H, W) bool on the display grid.
    """
    if chunk is None:
        chunk = len(prompts) if embedding.device.type == "cuda" else CPU_DECODE_CHUNK
    return decode_in_batches(prompts, max(chunk, 1),
                             lambda batch: _decode_batch(model, embedding, batch, original_size))


def _decode_batch(model: LoadedModel, embedding: torch.Tensor, prompts: list[DecodePrompt],
                  original_size: tuple[int, int]) -> Masks:
    sam = model.sam
    sparse = _sparse_embeddings(model, prompts, original_size, embedding.device)
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
