"""CT windowing and PNG encoding of display slices."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image


def window_to_uint8(values: npt.NDArray[Any], level: float, width: float) -> npt.NDArray[np.uint8]:
    """CT window: ``[level - width/2, level + width/2]`` → 0..255 (rounded), everything else clipped.

    The one CT window of the project: the slices the annotators see and the SAM encoder's input
    (workers/sam/preprocess.py) come from this function. Computed in float64 (the SAM path's
    arithmetic, so cached embeddings stay valid); exact half-way ties round half to even.
    """
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = float(level) - float(width) / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - low) / float(width)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_bytes(gray_or_rgb: npt.NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray_or_rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
