"""Per-family preprocessing: CT window → model input, prompt transforms, mask post-processing.

Every family starts from the same CT step (window L/W → uint8 → 3 channels) and then applies its
own normalisation, resize, prompt transform and threshold:

- ``litemedsam``: per-slice min-max to 0..255, ``ResizeLongestSide(256)`` + pad (SamPredictor's
  path; the model's pixel mean 0 / std 255 gives [0, 1]); prompts scaled by the same factor;
  mask = logits > 0 (= sigmoid > 0.5).
- ``sam`` (ViT-B/L/H): SamPredictor's path — ``ResizeLongestSide(1024)``, ImageNet pixel mean/std,
  pad to 1024; prompts by ``apply_boxes``/``apply_coords``; mask = logits > 0.
- ``medsam``: 1024×1024 squashed (aspect not kept) bicubic resize, min-max to [0, 1], fed to the
  image encoder directly; prompts scaled per axis into the 1024 frame; sigmoid, bilinear resize
  to the slice, > 0.5 (MedSAM's published inference).

Coordinates in and out are DISPLAY pixels of one slice (x = column, y = row).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from app.core.hashing import sha256_text
from app.imaging.render import window_to_uint8

PREPROCESS_VERSION = "1"


def to_rgb(gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def minmax_uint8(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Stretch to the full 0..255 range (a constant image becomes 0)."""
    values = image.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-8:
        return np.zeros_like(image, dtype=np.uint8)
    return np.rint((values - lo) / (hi - lo) * 255.0).astype(np.uint8)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU → ``device``; to a GPU through pinned memory, asynchronously (the uint8 image, 4× smaller than
    its float form, is what crosses the bus on the longest-side families)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class EncoderInput:
    tensor: torch.Tensor  # (1, 3, S, S) float32, ready for ``sam.image_encoder``
    input_size: tuple[int, int]  # (h, w) of the resized image inside the S×S frame (before padding)
    original_size: tuple[int, int]  # (H, W) of the display slice


class Family(ABC):
    """One preprocessing family. ``img_size`` is the encoder's square input side."""

    name: str

    def __init__(self, img_size: int) -> None:
        self.img_size = img_size

    def signature(self, window: tuple[float, float]) -> str:
        """Everything that changes the embedding besides the pixels and the weights."""
        text = f"{self.name}:v{PREPROCESS_VERSION}:{self.img_size}:L{float(window[0])!r}:W{float(window[1])!r}"
        return sha256_text(text)[:16]

    def rgb(self, display: npt.NDArray[np.generic], window: tuple[float, float]) -> npt.NDArray[np.uint8]:
        return to_rgb(window_to_uint8(display, window[0], window[1]))

    @abstractmethod
    def encoder_input(self, display: npt.NDArray[np.generic], window: tuple[float, float], sam: Sam) -> EncoderInput:
        ...

    @abstractmethod
    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        ...

    @abstractmethod
    def coords(self, coords: npt.NDArray[np.floating], original_size: tuple[int, int]) -> npt.NDArray[np.float64]:
        """(..., 2) display (x, y) → model frame."""

    def boxes(self, boxes: npt.NDArray[np.floating], original_size: tuple[int, int]) -> npt.NDArray[np.float64]:
        """(N, 4) display boxes → model frame."""
        return self.coords(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @abstractmethod
    def postprocess(self, low_res: torch.Tensor, original_size: tuple[int, int], sam: Sam
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, h, w) decoder logits → (probabilities (N, H, W) float32, masks (N, H, W) bool)."""


class _LongestSide(Family):
    """SamPredictor's geometry: ResizeLongestSide, model pixel mean/std, pad bottom/right."""

    def __init__(self, img_size: int) -> None:
        super().__init__(img_size)
        self.transform = ResizeLongestSide(img_size)

    def intensity(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        return rgb

    def encoder_input(self, display: npt.NDArray[np.generic], window: tuple[float, float], sam: Sam) -> EncoderInput:
        rgb = self.intensity(self.rgb(display, window))
        resized = self.transform.apply_image(rgb)
        tensor = sam.preprocess(to_device(torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None],
                                          sam.device).to(torch.float32))
        return EncoderInput(tensor, (int(resized.shape[0]), int(resized.shape[1])),
                            (int(display.shape[0]), int(display.shape[1])))

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], self.img_size)

    def coords(self, coords: npt.NDArray[np.floating], original_size: tuple[int, int]) -> npt.NDArray[np.float64]:
        return np.asarray(self.transform.apply_coords(np.asarray(coords, dtype=np.float64), original_size))

    def postprocess(self, low_res: torch.Tensor, original_size: tuple[int, int], sam: Sam
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = sam.postprocess_masks(low_res, self.input_size(original_size), original_size)[:, 0]
        return torch.sigmoid(logits), logits > sam.mask_threshold


class LiteMedSAMFamily(_LongestSide):
    name = "litemedsam"

    def __init__(self, img_size: int = 256) -> None:
        super().__init__(img_size)

    def intensity(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        return minmax_uint8(rgb)


class SamFamily(_LongestSide):
    name = "sam"

    def __init__(self, img_size: int = 1024) -> None:
        super().__init__(img_size)


class MedSAMFamily(Family):
    name = "medsam"

    def __init__(self, img_size: int = 1024) -> None:
        super().__init__(img_size)

    def encoder_input(self, display: npt.NDArray[np.generic], window: tuple[float, float], sam: Sam) -> EncoderInput:
        rgb = self.rgb(display, window)
        image = torch.as_tensor(rgb).permute(2, 0, 1)[None].to(torch.float32)
        image = F.interpolate(image, (self.img_size, self.img_size), mode="bicubic", align_corners=False,
                              antialias=True)
        lo, hi = image.min(), image.max()
        image = (image - lo) / torch.clamp(hi - lo, min=1e-8)
        return EncoderInput(to_device(image, sam.device), (self.img_size, self.img_size),
                            (int(display.shape[0]), int(display.shape[1])))

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return (self.img_size, self.img_size)

    def coords(self, coords: npt.NDArray[np.floating], original_size: tuple[int, int]) -> npt.NDArray[np.float64]:
        out = np.array(coords, dtype=np.float64, copy=True)
        height, width = original_size
        out[..., 0] *= self.img_size / width
        out[..., 1] *= self.img_size / height
        return out

    def postprocess(self, low_res: torch.Tensor, original_size: tuple[int, int], sam: Sam
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.sigmoid(low_res)
        probs = F.interpolate(probs, original_size, mode="bilinear", align_corners=False)[:, 0]
        return probs, probs > 0.5


def family_for(name: str, img_size: int | None = None) -> Family:
    """The family object for a registry family name (``img_size`` overrides the encoder side)."""
    classes: dict[str, type[Family]] = {"litemedsam": LiteMedSAMFamily, "sam": SamFamily, "medsam": MedSAMFamily}
    cls = classes[name]
    return cls() if img_size is None else cls(img_size)  # type: ignore[call-arg]
