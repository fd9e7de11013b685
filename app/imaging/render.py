"""CT windowing and PNG encoding of display slices."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image


def window_to_uint8(values: npt.NDArray[Any], level: float, width: float) -> npt.NDArray[np.uint8]:
    """Map HU to 0..255: ``level ± width/2`` clipped, linear in between."""
    lo = level - width / 2.0
    scaled = (values.astype(np.float32) - lo) * (255.0 / max(width, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def png_bytes(gray_or_rgb: npt.NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray_or_rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
