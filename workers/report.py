"""HTML evaluation report: tables and matplotlib box plots (PNG, base64-embedded; one self-contained file).

Figures follow the study's: the distribution of per-slice Dice beside per-volume Dice for each organ,
plus per-case Dice, NSD and HD95 box plots.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TABLE_METRICS = ("Dice", "IoU", "NSD", "HD95", "Dice_prompted_slices", "slice_dice_mean", "n_ref", "n_pred")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return html.escape(str(value))


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return '<img alt="figure" src="data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode() + '">'


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
        ax.plot([], [], color=colors[s % len(colors)], linewidth=8, alpha=0.7, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(loc="lower left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(result: dict[str, Any], *, title: str) -> str:
    labels = list(result["labels"])
    cases = result["cases"]
    has_slices = any("slice_dice" in c for c in cases)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Source: {html.escape(str(result.get('source')))}"
             f"{' / ' + html.escape(str(result['model'])) if result.get('model') else ''}; "
             f"{len(cases)} case(s); NSD tolerance {result['nsd_tolerance_mm']} mm; surface metrics: "
             f"{html.escape(result['surface_library'])}. Dice/IoU follow nnU-Net v2 (NaN = both empty, shown "
             f"as –; means are nanmeans over cases).</p>"]
    metrics = [m for m in TABLE_METRICS if any(m in result["mean"][n] for n in labels)]
    parts.append("<h2>Class means</h2>")
    parts.append(_table(["label", *metrics], [[n, *(result["mean"][n].get(m) for m in metrics)] for n in labels]
                        + [["foreground mean", *(result["foreground_mean"].get(m) for m in metrics)]]))
    if has_slices:
        parts.append("<h2>Per prompted slice vs per volume Dice</h2><p><em>per volume</em> counts every slice, "
                     "unprompted ones included (the study's scoring); <em>volume, prompted slices</em> is what an "
                     "export with <code>unprompted=ignore</code> scores; <em>per slice</em> is the mean 2D Dice "
                     "over the slices where the organ was prompted.</p>")
        groups = {n: [_clean([c["metrics"][n].get("Dice") for c in cases]),
                      _clean([c["metrics"][n].get("Dice_prompted_slices") for c in cases]),
                      _clean([v for c in cases for v in (c.get("slice_dice", {}).get(n) or {}).values()])]
                  for n in labels}
        parts.append(_boxplot(groups, ["per volume", "volume, prompted slices", "per slice"],
                              "Dice: per slice vs per volume", "Dice"))
    else:
        groups = {n: [_clean([c["metrics"][n].get("Dice") for c in cases])] for n in labels}
        parts.append(_boxplot(groups, ["per volume"], "Dice per case", "Dice"))
    for metric, unit in (("NSD", f"NSD @ {result['nsd_tolerance_mm']} mm"), ("HD95", "HD95 (mm)")):
        groups = {n: [_clean([c["metrics"][n].get(metric) for c in cases])] for n in labels}
        if any(g[0] for g in groups.values()):
            parts.append(_boxplot(groups, [metric], f"{metric} per case", unit))
    parts.append("<h2>Per case</h2>")
    rows = [[c["case_id"], n, *(c["metrics"][n].get(m) for m in metrics), c["metrics"][n].get("TP"),
             c["metrics"][n].get("FP"), c["metrics"][n].get("FN")] for c in cases for n in labels]
    parts.append(_table(["case", "label", *metrics, "TP", "FP", "FN"], rows))
    if result.get("missing_cases"):
        parts.append(f"<p>Cases with a reference but no prediction (not scored): "
                     f"{html.escape(', '.join(result['missing_cases']))}</p>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
