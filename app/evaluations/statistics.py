"""Paired statistics for comparing two sets of scores (``json_safe``, re-exported: strict JSON of results).

Paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) with the matched-pairs rank-biserial
correlation as effect size. Used by the API (comparisons) and the evaluation worker; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from app.core.jsonsafe import json_safe

__all__ = ["json_safe", "paired_wilcoxon", "rank_biserial"]


def rank_biserial(x: Sequence[float] | npt.NDArray[np.float64], y: Sequence[float] | npt.NDArray[np.float64]) -> float:
    """Matched-pairs rank-biserial correlation (W+ − W−) / (W+ + W−) over non-zero differences of x − y;
    +1 when every pair favours x, −1 when every pair favours y."""
    from scipy.stats import rankdata

    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = rankdata(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    w_minus = float(ranks[d < 0].sum())
    return (w_plus - w_minus) / (w_plus + w_minus)


def paired_wilcoxon(x: Sequence[float | None], y: Sequence[float | None]) -> dict[str, Any]:
    """Wilcoxon signed-rank test of paired samples (pairs with a missing/NaN side are dropped)."""
    from scipy.stats import wilcoxon

    pairs = [(float(a), float(b)) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    n = len(pairs)
    out: dict[str, Any] = {"n": n, "statistic": None, "p_value": None, "effect_size_rank_biserial": None,
                           "mean_a": None, "mean_b": None, "median_a": None, "median_b": None,
                           "median_difference": None}
    if n == 0:
        return out
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    out.update(mean_a=float(a.mean()), mean_b=float(b.mean()), median_a=float(np.median(a)),
               median_b=float(np.median(b)), median_difference=float(np.median(a - b)),
               effect_size_rank_biserial=rank_biserial(a, b))
    if np.any(a != b):
        result = wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
        out["statistic"] = float(result.statistic)
        out["p_value"] = float(result.pvalue)
    else:
        out["p_value"] = 1.0
        out["statistic"] = 0.0
    return out
