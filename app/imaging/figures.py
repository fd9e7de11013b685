"""One readable figure per volume: a montage of prompted and unprompted display slices plus per-organ Dice.

Pure (numpy + matplotlib's Agg canvas, no pyplot state, so it is safe in API threads and workers). Each panel
is a display slice exactly as the annotation page shows it (:func:`app.imaging.coords.display_slice`, the
dataset's CT window via :func:`app.imaging.render.window_to_uint8`), drawn at a legible size with the true
pixel aspect from the voxel spacing; the fused mask is a translucent fill, the reference a contour line and
the crowd's boxes rectangles, all in the label colours of :mod:`app.imaging.palette` (the web pages' colours;
annotators told apart by line style, as on the review page). A bar panel shows each organ's Dice of the
fused mask against the reference (:func:`app.imaging.metrics.dice`): over the whole volume and over the
prompted slices only. Output is deterministic: fixed size and dpi, no timestamp or software tag in the PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from app.imaging.coords import Orientation, display_slice
from app.imaging.metrics import dice
from app.imaging.palette import label_color
from app.imaging.render import window_to_uint8

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_VERSION = 1  # bump when the drawing changes (the endpoint's ETag includes it)
DPI = 100
COLUMNS = 4
LEGEND_COLUMNS = 6
PANEL_PX = 400  # panel width in pixels (≥ 300 px: legible even for 100-pixel-wide slices)
FILL_ALPHA = 0.45  # the fused mask's fill, as the overlay PNGs (app.segmentations.masks.OVERLAY_ALPHA)
DASHES: list[Literal["solid"] | tuple[float, tuple[float, ...]]] = [
    "solid", (0, (6, 3)), (0, (2, 2)), (0, (8, 2, 2, 2)), (0, (4, 4)),
]  # one line style per annotator (review page: DASHES in app/static/js/review.js)


@dataclass(frozen=True)
class Mark:
    """One crowd prompt on a display slice: a box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) or a point ``(x, y)``."""

    label: str
    annotator: str
    coords: tuple[float, ...]
    positive: bool = True

    @property
    def is_box(self) -> bool:
        return len(self.coords) == 4


@dataclass(frozen=True)
class Panel:
    """A montage panel: canonical slice ``k`` and whether the crowd prompted it."""

    k: int
    prompted: bool


def canonical_spacing(affine: npt.ArrayLike, shape: Sequence[int], spacing: Sequence[float]) -> list[float]:
    """Voxel size in mm along the canonical (R, A, S) axes from the original axes' ``spacing``."""
    orientation = Orientation.from_affine(affine, shape)
    out = [0.0, 0.0, 0.0]
    for axis, size in enumerate(spacing[:3]):
        out[orientation.canonical_axis_of(axis)[0]] = float(size)
    return out


def choose_slices(
    fused: npt.NDArray[Any], reference: npt.NDArray[Any] | None, prompted: Sequence[int], n_slices: int = 12
) -> list[Panel]:
    """Up to ``n_slices`` slices spread evenly over the organs' extent (where the fused mask or the
    reference has a label), about half prompted and half not; sorted by slice."""
    n = int(fused.shape[2])
    present = np.asarray(fused).any(axis=(0, 1))
    if reference is not None:
        present = present | np.asarray(reference).any(axis=(0, 1))
    ks = np.flatnonzero(present)
    lo, hi = (int(ks[0]), int(ks[-1])) if ks.size else (0, n - 1)
    wanted = {int(k) for k in prompted if 0 <= int(k) < n}
    inside = range(lo, hi + 1)
    on = [k for k in inside if k in wanted] or sorted(wanted)
    off = [k for k in inside if k not in wanted]
    half = n_slices // 2
    take_on = min(len(on), max(half, n_slices - len(off)))
    take_off = min(len(off), n_slices - take_on)
    chosen = [Panel(k, True) for k in _spread(on, take_on)] + [Panel(k, False) for k in _spread(off, take_off)]
    return sorted(chosen, key=lambda p: p.k)


def _spread(values: Sequence[int], count: int) -> list[int]:
    """``count`` values evenly spaced over ``values`` (ends included)."""
    if count <= 0 or not values:
        return []
    if count >= len(values):
        return list(values)
    return [values[int(i)] for i in np.unique(np.rint(np.linspace(0, len(values) - 1, count)).astype(int))]


def present_labels(labels: Mapping[str, int], *volumes: npt.NDArray[Any] | None) -> dict[str, int]:
    """The labels that occur in any of ``volumes`` (legend and bars list only those: a 100-label dataset's
    figure of five organs shows five)."""
    found: set[int] = set()
    for volume in volumes:
        if volume is None:
            continue
        data = np.asarray(volume)
        if np.issubdtype(data.dtype, np.integer) and data.size and int(data.min()) >= 0:
            found.update(int(v) for v in np.flatnonzero(np.bincount(data.ravel())))
        else:
            found.update(int(v) for v in np.unique(data))
    return {name: value for name, value in labels.items() if value in found}


def dice_by_label(
    fused: npt.NDArray[Any], reference: npt.NDArray[Any], labels: Mapping[str, int], prompted: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Per label, Dice of the fused mask vs the reference over the whole volume (``volume``: unprompted slices
    count, the study's scoring) and over the prompted slices (``prompted``); NaN when both are empty."""
    ks = sorted({int(k) for k in prompted})
    out = {}
    for name, value in labels.items():
        f, r = fused == value, reference == value
        out[name] = {"volume": dice(r, f), "prompted": dice(r[:, :, ks], f[:, :, ks]) if ks else math.nan}
    return out


def volume_montage(
    ct_canonical: npt.NDArray[Any],
    fused_labels_canonical: npt.NDArray[Any],
    reference_canonical: npt.NDArray[Any] | None,
    boxes_by_slice: Mapping[int, Sequence[Mark]],
    labels: Mapping[str, int],
    *,
    window: tuple[float, float],
    spacing: Sequence[float],
    title: str,
    prompted: Sequence[int],
    n_slices: int = 12,
) -> bytes:
    """The montage as PNG bytes (see the module docstring). ``spacing`` is the canonical voxel size in mm,
    ``window`` the (level, width) of the CT window, ``boxes_by_slice`` the crowd's prompts by canonical slice."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported on first drawing, not at API start
    from matplotlib.figure import Figure
    panels = choose_slices(fused_labels_canonical, reference_canonical, prompted, n_slices)
    annotators = sorted({m.annotator for marks in boxes_by_slice.values() for m in marks})
    labels = present_labels(labels, fused_labels_canonical, reference_canonical)
    rows = max(1, math.ceil(len(panels) / COLUMNS))
    height_px, width_px = fused_labels_canonical.shape[1], fused_labels_canonical.shape[0]
    aspect = float(spacing[1]) / float(spacing[0])  # display rows run along A, columns along R
    panel_h = PANEL_PX * height_px * aspect / width_px + 30
    bars = reference_canonical is not None and len(labels) > 0
    bar_h = 320 if bars else 0
    legend_h = 22 * math.ceil((len(labels) + 2 + len(annotators)) / LEGEND_COLUMNS) + 26
    fig_h = (rows * panel_h + bar_h + legend_h + 60) / DPI
    fig = Figure(figsize=(COLUMNS * PANEL_PX / DPI, fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 12 / (fig_h * DPI), title, ha="center", va="top", fontsize=15, weight="bold",
             parse_math=False)
    top = 1 - 50 / (fig_h * DPI)
    grid_h = rows * panel_h / (fig_h * DPI)
    grid = fig.add_gridspec(rows, COLUMNS, left=0.01, right=0.99, top=top, bottom=top - grid_h,
                            wspace=0.04, hspace=0.12)
    level, width = window
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(grid[i // COLUMNS, i % COLUMNS])
        _panel(ax, ct_canonical, fused_labels_canonical, reference_canonical, boxes_by_slice.get(panel.k, ()),
               labels, annotators, panel, level, width, aspect, bool(prompted))
    for j in range(len(panels), rows * COLUMNS):
        fig.add_subplot(grid[j // COLUMNS, j % COLUMNS]).axis("off")
    _legend(fig, labels, annotators, bottom=(bar_h + 8) / (fig_h * DPI), reference=reference_canonical is not None)
    if bars:
        assert reference_canonical is not None
        ax = fig.add_axes((0.07, 40 / (fig_h * DPI), 0.9, (bar_h - 80) / (fig_h * DPI)))
        _bars(ax, dice_by_label(fused_labels_canonical, reference_canonical, labels, prompted), bool(prompted))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _rgb(value: int) -> tuple[float, float, float]:
    r, g, b = label_color(value)
    return (r / 255, g / 255, b / 255)


def _panel(ax: Any, ct: npt.NDArray[Any], fused: npt.NDArray[Any], reference: npt.NDArray[Any] | None,
           marks: Sequence[Mark], labels: Mapping[str, int], annotators: list[str], panel: Panel,
           level: float, width: float, aspect: float, any_prompted: bool) -> None:
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle
    gray = window_to_uint8(np.asarray(display_slice(ct, panel.k)), level, width)
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="bilinear", aspect=aspect)
    mask = np.asarray(display_slice(fused, panel.k))
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    for value in labels.values():
        where = mask == value
        rgba[where, :3] = _rgb(value)
        rgba[where, 3] = FILL_ALPHA
    ax.imshow(rgba, interpolation="nearest", aspect=aspect)
    if reference is not None:
        ref = np.asarray(display_slice(reference, panel.k))
        for value in labels.values():
            organ = (ref == value).astype(np.float32)
            if organ.any():
                contour = ax.contour(organ, levels=[0.5], colors=[_rgb(value)], linewidths=1.8)
                contour.set_path_effects([patheffects.withStroke(linewidth=3.2, foreground="black")])
    values = dict(labels)
    for mark in marks:
        if mark.label not in values:
            continue
        color = _rgb(values[mark.label])
        style = DASHES[annotators.index(mark.annotator) % len(DASHES)]
        if mark.is_box:
            x0, y0, x1, y1 = mark.coords
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                   linewidth=1.4, linestyle=style))
        else:
            x, y = mark.coords
            ax.plot([x], [y], marker="o", markersize=6, color=color if mark.positive else "black",
                    markeredgecolor=color)
    ax.set_xlim(-0.5, mask.shape[1] - 0.5)
    ax.set_ylim(mask.shape[0] - 0.5, -0.5)
    kind = ("prompted" if panel.prompted else "unprompted") if any_prompted else ""
    ax.set_title(f"slice {panel.k} · {kind}" if kind else f"slice {panel.k}", fontsize=11,
                 color="black" if panel.prompted else "#555555")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("#1f77b4" if panel.prompted else "#999999")
        spine.set_linewidth(2.5 if panel.prompted else 1.0)


def _legend(fig: Figure, labels: Mapping[str, int], annotators: list[str], *, bottom: float,
            reference: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles: list[Any] = [Patch(facecolor=(*_rgb(v), FILL_ALPHA), edgecolor=_rgb(v), label=n)
                          for n, v in labels.items()]
    handles.append(Patch(facecolor=(0.5, 0.5, 0.5, FILL_ALPHA), label="fused mask (fill)"))
    if reference:
        handles.append(Line2D([], [], color="black", linewidth=1.8, label="reference (contour)"))
    handles += [Line2D([], [], color="black", linewidth=1.4, linestyle=DASHES[i % len(DASHES)],
                       label=f"box: {name}") for i, name in enumerate(annotators)]
    legend = fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, bottom),
                        ncol=min(LEGEND_COLUMNS, len(handles)), fontsize=10, frameon=False)
    for text in legend.get_texts():
        text.set_parse_math(False)


def _bars(ax: Any, scores: Mapping[str, Mapping[str, float]], with_prompted: bool) -> None:
    names = list(scores)
    x = np.arange(len(names))
    series = [(-0.2, "volume", "#4c72b0", "Dice, whole volume"), (0.2, "prompted", "#dd8452", "Dice, prompted slices")]
    if not with_prompted:  # e.g. an uploaded prediction: no prompts
        series = [(0.0, "volume", "#4c72b0", "Dice, whole volume")]
    for offset, key, color, caption in series:
        values = [scores[n][key] for n in names]
        heights = [0.0 if math.isnan(v) else v for v in values]
        ax.bar(x + offset, heights, width=0.38, color=color, label=caption)
        for xi, v in zip(x + offset, values, strict=True):
            ax.text(xi, (0 if math.isnan(v) else v) + 0.02, "n/a" if math.isnan(v) else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names)
    for tick in ax.get_xticklabels():
        tick.set_parse_math(False)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("Dice (fused vs reference)")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=9, ncol=2, frameon=False)  # above the bars
    ax.grid(axis="y", alpha=0.3)
