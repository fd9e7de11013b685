"""Where the encoder and decoder run: torch (any device, any precision) or ONNX Runtime (CPU).

Both backends take the same inputs and return the same things: :meth:`encode` a display slice →
(1, C, h, w) float32 embedding (a torch tensor on the engine's device), :meth:`decode` the prompts of
one slice → per-prompt probabilities and masks on the display grid. Preprocessing and mask
post-processing are the family's (:mod:`workers.sam.preprocess`), shared by both.

``CROWDSAM_BACKEND=auto`` (the default) picks ONNX Runtime on CPU — measured on the 2-core build
machine with LiteMedSAM: encoder ≈ 3× and decoder ≈ 2.5× faster than torch (bench/segment.py) —
and torch on CUDA. The two backends' embeddings are close but not bit-identical, so the backend is
part of every cache key (:meth:`workers.sam.engine.SegmentationEngine.identity`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import torch

from workers.sam.decode import DecodePrompt, Masks, decode, decode_in_batches, prompt_tokens
from workers.sam.models import LoadedModel
from workers.sam.onnx_export import EXPORTER_VERSION, OnnxModelFiles, export_model

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

BACKENDS = ("auto", "torch", "onnx")

# ONNX Runtime decoder batch: prompts per call on CPU. bench/segment.py's sweep on the 2-core build machine
# (LiteMedSAM, example_ct, 12 boxes/slice), ms/box: 1: 48.3, 2: 42.3, 4: 46.5, 8: 42.1, 16: 48.5 (±10 %
# between runs; a separate A/B of 4 vs 8 gave 49.8 vs 47.3).
ONNX_DECODE_CHUNK = 8


class Backend(Protocol):
    name: str
    tag: str  # what the backend adds to cache keys: its name, and the exporter version for ONNX
    model: LoadedModel

    def encode(self, display: npt.NDArray[np.generic], window: tuple[float, float]) -> torch.Tensor: ...

    def encode_batch(self, displays: list[npt.NDArray[np.generic]], window: tuple[float, float]) -> torch.Tensor: ...

    def decode(self, embedding: torch.Tensor, prompts: list[DecodePrompt], original_size: tuple[int, int],
               ) -> Masks: ...


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto`` → ``onnx`` on CPU, ``torch`` elsewhere; ``onnx`` on a non-CPU device is refused."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {requested!r}")
    if requested == "auto":
        return "onnx" if device.type == "cpu" else "torch"
    if requested == "onnx" and device.type != "cpu":
        raise ValueError(f"the onnx backend runs on CPU only (device {device}); use backend=torch")
    return requested


class TorchBackend:
    """The model's own modules; autocast to bf16/fp16 on CUDA when asked (embeddings stay float32)."""

    name = tag = "torch"

    def __init__(self, model: LoadedModel, device: torch.device, precision: str) -> None:
        self.model, self.device, self.precision = model, device, precision

    def encode(self, display: npt.NDArray[np.generic], window: tuple[float, float]) -> torch.Tensor:
        return self.encode_batch([display], window)

    @torch.inference_mode()
    def encode_batch(self, displays: list[npt.NDArray[np.generic]], window: tuple[float, float]) -> torch.Tensor:
        """(N, C, h, w) embeddings of N slices in one encoder call (the GPU path batches slices)."""
        family, sam = self.model.family, self.model.sam
        images = torch.cat([family.encoder_input(display, window, sam).tensor for display in displays])
        if self.precision != "fp32":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                return sam.image_encoder(images).float()
        return sam.image_encoder(images)

    def decode(self, embedding: torch.Tensor, prompts: list[DecodePrompt], original_size: tuple[int, int],
               ) -> Masks:
        return decode(self.model, embedding, prompts, original_size)


class OnnxBackend:
    """The model exported once (:func:`workers.sam.onnx_export.export_model`), run by ONNX Runtime."""

    name = "onnx"
    tag = f"onnx-e{EXPORTER_VERSION}"

    def __init__(self, model: LoadedModel, files: OnnxModelFiles, threads: int, *,
                 chunk: int = ONNX_DECODE_CHUNK) -> None:
        self.model, self.chunk = model, chunk
        self.encoder, self.decoder = _sessions(str(files.encoder), str(files.decoder), threads)

    @classmethod
    def export(cls, model: LoadedModel, onnx_dir: Path, weights_id: str, threads: int) -> OnnxBackend:
        return cls(model, export_model(model.sam, onnx_dir, model.name, weights_id), threads)

    @torch.inference_mode()
    def encode(self, display: npt.NDArray[np.generic], window: tuple[float, float]) -> torch.Tensor:
        prepared = self.model.family.encoder_input(display, window, self.model.sam)
        (embedding,) = self.encoder.run(None, {"image": prepared.tensor.cpu().numpy()})
        return torch.from_numpy(embedding)

    def encode_batch(self, displays: list[npt.NDArray[np.generic]], window: tuple[float, float]) -> torch.Tensor:
        return torch.cat([self.encode(display, window) for display in displays])  # batch 1 is fastest on CPU

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, prompts: list[DecodePrompt], original_size: tuple[int, int],
               ) -> Masks:
        image = np.ascontiguousarray(embedding.detach().cpu().numpy(), dtype=np.float32)

        def run(batch: list[DecodePrompt]) -> Masks:
            coords, labels = prompt_tokens(self.model, batch, original_size)
            (low_res,) = self.decoder.run(None, {"image_embeddings": image, "point_coords": coords,
                                                 "point_labels": labels})
            probs, masks = self.model.family.postprocess(torch.from_numpy(low_res), original_size, self.model.sam)
            return probs.numpy().astype(np.float32), masks.numpy().astype(bool)

        return decode_in_batches(prompts, self.chunk, run)


@functools.lru_cache(maxsize=8)
def _sessions(encoder: str, decoder: str, threads: int) -> tuple[InferenceSession, InferenceSession]:
    """One pair of sessions per exported model and thread count in a process (weights load once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    return (ort.InferenceSession(encoder, options, providers=providers),
            ort.InferenceSession(decoder, options, providers=providers))
