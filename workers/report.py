"""HTML evaluation report: tables and matplotlib box plots (PNG, base64-embedded; one self-contained file).

The page is ``workers/templates/report.html.j2`` (Jinja2, autoescaped: label names, case ids and titles are
text, never markup); this module computes the tables and figures it shows.

Figures follow the study's: the distribution of per-slice Dice beside per-volume Dice for each organ,
plus per-case Dice, NSD and HD95 box plots.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TABLE_METRICS = ("Dice", "IoU", "NSD", "HD95", "Dice_known_slices", "slice_dice_mean", "n_ref", "n_pred")


def _fmt(value: Any) -> str:
    """A table cell as text (the template escapes it): numbers to 4 decimals, NaN/None as –."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


_ENV = jinja2.Environment(loader=jinja2.PackageLoader("workers", "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters["fmt"] = _fmt


def _png(fig: Any) -> str:
    """The figure as base64 PNG (the template embeds it as a data: URL)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plain(text: str) -> str:
    """Text for matplotlib as it is: ``$`` would start mathtext (a label like ``$\\x$`` fails the figure)."""
    return text.replace("$", r"\$")


def _clean(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _boxplot(groups: dict[str, list[list[float]]], series: Sequence[str], title: str, ylabel: str) -> str:
    """One box per (label, series), grouped by label."""
    labels = list(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) * len(series)), 3.6))
    width = 0.8 / len(series)
    colors = ["#4c72b0", "#dd8452", "#55a868"]
    for s, name in enumerate(series):
        data = [groups[label][s] or [math.nan] for label in labels]
        pos = [i + (s - (len(series) - 1) / 2) * width for i in range(len(labels))]
        parts = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=True)
        for patch in parts["boxes"]:
            patch.set_facecolor(colors[s % len(colors)])
            patch.set_alpha(0.7)
        ax.plot([], [], color=colors[s % len(colors)], linewidth=8, alpha=0.7, label=_plain(name))
    ax.set_xticks(range(len(labels)), [_plain(label) for label in labels])
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title))
    if len(series) > 1:
        ax.legend(loc="lower left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _figures(result: dict[str, Any], labels: list[str], has_slices: bool) -> list[str]:
    """Dice per slice beside per volume (or per case), then NSD and HD95 per case when computed."""
    cases = result["cases"]
    figures = []
    if has_slices:
        groups = {n: [_clean([c["metrics"][n].get("Dice") for c in cases]),
                      _clean([c["metrics"][n].get("Dice_known_slices") for c in cases]),
                      _clean([v for c in cases for v in (c.get("slice_dice", {}).get(n) or {}).values()])]
                  for n in labels}
        figures.append(_boxplot(groups, ["per volume", "volume, known slices", "per slice"],
                                "Dice: per slice vs per volume", "Dice"))
    else:
        groups = {n: [_clean([c["metrics"][n].get("Dice") for c in cases])] for n in labels}
        figures.append(_boxplot(groups, ["per volume"], "Dice per case", "Dice"))
    for metric, unit in (("NSD", f"NSD @ {result['nsd_tolerance_mm']} mm"), ("HD95", "HD95 (mm)")):
        groups = {n: [_clean([c["metrics"][n].get(metric) for c in cases])] for n in labels}
        if any(g[0] for g in groups.values()):
            figures.append(_boxplot(groups, [metric], f"{metric} per case", unit))
    return figures


def render_report(result: dict[str, Any], *, title: str, montages: Sequence[dict[str, str]] = ()) -> str:
    """The report page; ``montages``: {caption, case_id, png (base64)} of the worst and best case
    (workers/evaluator.py draws them with app.imaging.figures.volume_montage)."""
    labels = list(result["labels"])
    cases = result["cases"]
    has_slices = any("slice_dice" in c for c in cases)
    metrics = [m for m in TABLE_METRICS if any(m in result["mean"][n] for n in labels)]
    means = {"header": ["label", *metrics],
             "rows": [[n, *(result["mean"][n].get(m) for m in metrics)] for n in labels]
             + [["foreground mean", *(result["foreground_mean"].get(m) for m in metrics)]]}
    per_case = {"header": ["case", "label", *metrics, "TP", "FP", "FN"],
                "rows": [[c["case_id"], n, *(c["metrics"][n].get(m) for m in (*metrics, "TP", "FP", "FN"))]
                         for c in cases for n in labels]}
    return _ENV.get_template("report.html.j2").render(
        title=title, source=str(result.get("source")), model=result.get("model"), n_cases=len(cases),
        nsd_tolerance_mm=result["nsd_tolerance_mm"], surface_library=result["surface_library"],
        means=means, has_slices=has_slices, figures=_figures(result, labels, has_slices), per_case=per_case,
        missing_cases=result.get("missing_cases") or [], montages=list(montages))
