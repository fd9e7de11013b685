"""The HTML evaluation report (workers/report.py + its Jinja2 template): what a researcher opens in a browser."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from app.evaluations.statistics import json_safe
from app.imaging.coords import Orientation
from workers.metrics import SURFACE_LIBRARY, evaluate_case, summarize
from workers.report import render_report

HOSTILE_LABEL = '<script>alert("label")</script>'
MATH_LABEL = r"$\notamacro$ & co"  # matplotlib would parse $…$ as mathtext (and fail on it)
HOSTILE_CASE = "<img src=x onerror=alert(1)>"


def _result(labels: dict[str, int], case_ids: list[str], missing: list[str]) -> dict[str, Any]:
    """What the evaluation job hands render_report: two cases, one with three slices nobody saw."""
    ref = np.zeros((30, 30, 20), dtype=np.int32)
    values = list(labels.values())
    ref[5:15, 5:15, 5:12] = values[0]
    ref[20:25, 20:25, 2:6] = values[1]
    pred = ref.copy()
    pred[:, :, 5:8] = 0
    orientation = Orientation.from_affine(np.diag([1.0, 1.0, 3.0, 1.0]), ref.shape)
    known = [k for k in range(20) if k not in (5, 6, 7)]
    cases = [{"case_id": case_id, **evaluate_case(ref, p, labels, spacing=(1, 1, 3), orientation=orientation,
                                                  known_slices=known)}
             for case_id, p in zip(case_ids, (pred, ref), strict=True)]
    summary = summarize(cases, labels)
    return json_safe({"labels": labels, "source": "segmentation", "model": "litemedsam", "nsd_tolerance_mm": 2.0,
                      "surface_library": SURFACE_LIBRARY, "cases": cases, "mean": summary["mean"],
                      "foreground_mean": summary["foreground_mean"], "missing_cases": missing})


def _cells(html: str) -> list[list[str]]:
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def test_report_shows_tables_figures_and_the_scoring_note() -> None:
    result = _result({"spleen": 1, "liver": 5, "aorta": 52}, ["c1", "c2"], ["c3"])
    html = render_report(result, title="Evaluation 7 — dataset 'abdomen'")
    assert html.startswith("<!doctype html>") and "<title>Evaluation 7 — dataset &#39;abdomen&#39;</title>" in html
    assert "Source: segmentation / litemedsam; 2 case(s); NSD tolerance 2.0 mm" in html
    assert "Per prompted slice vs per volume Dice" in html and "<code>unprompted=ignore</code>" in html
    assert html.count('<img alt="figure" src="data:image/png;base64,') == 3  # Dice, NSD, HD95
    rows = _cells(html)
    header = rows[0]
    assert header[:3] == ["label", "Dice", "IoU"] and "Dice_known_slices" in header
    spleen = dict(zip(header, rows[1], strict=True))
    dice = result["mean"]["spleen"]["Dice"]
    assert spleen["label"] == "spleen" and spleen["Dice"] == f"{dice:.4f}"
    aorta = dict(zip(header, rows[3], strict=True))
    assert aorta["Dice"] == "–"  # empty in reference and prediction: NaN, shown as –
    assert rows[4][0] == "foreground mean"
    per_case = [r for r in rows if r and r[0] in ("c1", "c2")]
    assert [(r[0], r[1]) for r in per_case] == [(c, n) for c in ("c1", "c2") for n in ("spleen", "liver", "aorta")]
    assert "Cases with a reference but no prediction (not scored): c3</p>" in html


def test_hostile_label_and_case_names_are_text_not_markup() -> None:
    result = _result({HOSTILE_LABEL: 1, MATH_LABEL: 5, "aorta": 52}, [HOSTILE_CASE, "c2"], [HOSTILE_CASE])
    html = render_report(result, title=f"Evaluation 1 — dataset {HOSTILE_LABEL!r}")
    assert "<script" not in html and "<img src=x" not in html  # no markup from names anywhere
    assert "&lt;script&gt;alert(&#34;label&#34;)&lt;/script&gt;" in html  # shown as the text it is
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "$\\notamacro$ &amp; co" in html
    cells = [c for row in _cells(html) for c in row]
    assert cells.count("&lt;script&gt;alert(&#34;label&#34;)&lt;/script&gt;") == 1 + 2  # class means + 2 cases
    assert cells.count("&lt;img src=x onerror=alert(1)&gt;") == 3  # one per-case row per label
    # the figures are drawn with the names as plain text ($…$ is not mathtext, which failed the job before)
    assert html.count('<img alt="figure" src="data:image/png;base64,') == 3
