"""The project's one Dice (numpy only: used by the API, the workers, the benches and ``make demo``).

Dice = 2|A ∩ B| / (|A| + |B|). When both masks are empty the score is undefined: NaN by default,
as nnU-Net's ``compute_metrics`` reports it (the score is left out of means, not counted as 0 or 1).
A caller that needs another value says so with ``empty`` (crowd agreement: 1.0, workers/sam/fusion.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt


def dice(ref: npt.NDArray[Any], pred: npt.NDArray[Any], *, empty: float = math.nan) -> float:
    """Dice of two masks of the same shape (any dtype: non-zero is in); ``empty`` when both are empty."""
    ref, pred = np.asarray(ref, dtype=bool), np.asarray(pred, dtype=bool)
    denom = int(np.count_nonzero(ref)) + int(np.count_nonzero(pred))
    if denom == 0:
        return empty
    return 2 * int(np.count_nonzero(ref & pred)) / denom
