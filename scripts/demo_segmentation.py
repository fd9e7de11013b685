"""The segmentation half of ``make demo``: simulated crowd → LiteMedSAM on a real worker → Dice.

Everything goes through the HTTP API (the worker is a separate process); Dice is computed here
from the downloaded NIfTI against the volume's reference, per prompted slice and per volume. The volume's
figure (GET /segmentations/{id}/figure.png: prompted and unprompted slices with the fused mask, the
reference contours and the crowd's boxes, plus per-organ Dice bars) is written to the output folder.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.imaging.coords import Orientation
from app.imaging.metrics import dice

CROWD = {"annotators": 3, "jitter": 0.05, "coverage": 0.8, "seed": 0}


def _nifti(content: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content)


def _canonical(img: nib.Nifti1Image) -> npt.NDArray[Any]:
    return np.asarray(Orientation.from_affine(img.affine, img.shape).canonical(np.asarray(img.dataobj)))


def _wait(api: httpx.Client, sid: int, worker: Callable[[], None], console: Console) -> dict[str, Any]:
    """Run ``worker`` in the background and show the job's progress until it ends."""
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    columns = (TextColumn("[bold]segmentation {task.fields[sid]}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total} slices"), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("seg", total=None, sid=sid, status="queued")
        while True:
            seg: dict[str, Any] = api.get(f"/api/v1/segmentations/{sid}").raise_for_status().json()
            bar.update(task, completed=seg["progress"]["done"], total=seg["progress"]["total"] or None,
                       status=seg["status"])
            if seg["status"] in ("finished", "failed", "canceled"):
                break
            if not thread.is_alive():
                time.sleep(0.5)
                seg = api.get(f"/api/v1/segmentations/{sid}").raise_for_status().json()
                if seg["status"] not in ("finished", "failed", "canceled"):
                    raise SystemExit(f"the worker exited but segmentation {sid} is {seg['status']}")
                break
            time.sleep(0.25)
    thread.join()
    if seg["status"] != "finished":
        raise SystemExit(f"segmentation {sid} {seg['status']}: {seg.get('error')}")
    return seg


def _dice_tables(pred: npt.NDArray[Any], ref: npt.NDArray[Any], labels: dict[str, int], prompted: list[int],
                 console: Console) -> None:
    per_slice = Table(title="Dice per prompted slice (reference masks; '-' = organ absent from both)")
    per_slice.add_column("slice", justify="right")
    for name in labels:
        per_slice.add_column(name, justify="right")
    means: dict[str, list[float]] = {name: [] for name in labels}
    for k in prompted:
        row = [str(k)]
        for name, value in labels.items():
            p, r = pred[:, :, k] == value, ref[:, :, k] == value
            if not r.any() and not p.any():
                row.append("-")
                continue
            d = dice(r, p)
            if r.any():
                means[name].append(d)
            row.append(f"{d:.3f}")
        per_slice.add_row(*row)
    console.print(per_slice)

    summary = Table(title="Dice per organ")
    for column in ("organ", "mean per-slice Dice", "slices", "volume Dice (prompted slices)",
                   "volume Dice (all slices; unprompted = background, as the study scored)"):
        summary.add_column(column, justify="right" if column != "organ" else "left")
    for name, value in labels.items():
        sub_p, sub_r = pred[:, :, prompted] == value, ref[:, :, prompted] == value
        scores = means[name]
        summary.add_row(name, f"{np.mean(scores):.3f}" if scores else "-", str(len(scores)),
                        f"{dice(sub_r, sub_p):.3f}", f"{dice(ref == value, pred == value):.3f}")
    console.print(summary)


def write_figure(api: httpx.Client, segmentation_id: int, path: Path) -> Path:
    """Download the segmentation's montage (one readable figure per volume) to ``path``, atomically."""
    png = api.get(f"/api/v1/segmentations/{segmentation_id}/figure.png", timeout=120).raise_for_status().content
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(png)
    partial.replace(path)
    return path


def _timings(title: str, seg: dict[str, Any], wall_s: float, console: Console) -> None:
    stats = seg["stats"]
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("prompted slices", str(len(stats["prompted_slices"])))
    table.add_row("slices encoded / decoded", f"{stats['encoded']} / {stats['decoded']}")
    for key in ("encoder_s", "decoder_s", "fusion_s", "cache_s", "total_s", "load_s", "assemble_s", "job_s"):
        if key in stats["timings"]:
            table.add_row(key, f"{stats['timings'][key]:.2f} s")
    table.add_row("request → finished (incl. worker start + model load)", f"{wall_s:.1f} s")
    console.print(table)


def run(api: httpx.Client, volume: dict[str, Any], console: Console, output: Path,
        worker: Callable[[], None]) -> None:
    vid = volume["id"]
    started = time.perf_counter()
    crowd = api.post(f"/api/v1/volumes/{vid}/prompts/simulate", json=CROWD, timeout=120).raise_for_status().json()
    console.print(f"[bold]crowd[/] {len(crowd['annotators'])} simulated annotators drew {crowd['boxes']} boxes "
                  f"({crowd['per_label']}) in {time.perf_counter() - started:.1f} s")

    models = {m["name"]: m for m in api.get("/api/v1/models").raise_for_status().json()}
    console.print("[bold]models[/] " + ", ".join(
        f"{n} ({'available' if m['available'] else 'unavailable'})" for n, m in models.items()))
    requested = time.perf_counter()
    created = api.post(f"/api/v1/volumes/{vid}/segmentations", json={"model": "litemedsam", "fusion": "majority"})
    sid = created.raise_for_status().json()["id"]
    seg = _wait(api, sid, worker, console)
    wall = time.perf_counter() - requested

    mask_bytes = api.get(f"/api/v1/segmentations/{sid}/mask").raise_for_status().content
    ref_bytes = api.get(f"/api/v1/volumes/{vid}/reference").raise_for_status().content
    (output / "example_ct_mask.nii.gz").write_bytes(mask_bytes)
    (output / "example_ct_reference.nii.gz").write_bytes(ref_bytes)
    mask, ref = _nifti(mask_bytes), _nifti(ref_bytes)
    same = mask.shape == tuple(volume["shape"]) and np.allclose(mask.affine, np.asarray(volume["affine"]), atol=1e-5)
    console.print(f"[bold]mask[/] {mask.shape} {mask.get_data_dtype()}, geometry equals the image's: {same}")
    labels = seg["stats"]["labels"]
    prompted = seg["stats"]["prompted_slices"]
    _dice_tables(_canonical(mask), _canonical(ref), labels, prompted, console)
    _timings("timings (LiteMedSAM on this machine's CPU/GPU)", seg, wall, console)

    figure = write_figure(api, sid, output / f"figure_{volume['case_id']}.png")
    console.print(f"[bold]figure[/] {figure} (prompted and unprompted slices, reference contours, crowd boxes, "
                  "Dice per organ)")

    # Anytime: one more box on an already segmented slice → no encoder call, one slice decoded.
    k = prompted[len(prompted) // 2]
    first = next(b for b in api.get(f"/api/v1/volumes/{vid}/prompts", params={"slice": k, "limit": 1})
                 .raise_for_status().json()["items"])
    api.post(f"/api/v1/volumes/{vid}/prompts", json={"boxes": [
        {"slice": k, "label": first["label"], "box": first["box"]}]}).raise_for_status()
    requested = time.perf_counter()
    sid2 = api.post(f"/api/v1/volumes/{vid}/segmentations", json={"model": "litemedsam"}).raise_for_status().json()
    rerun = _wait(api, sid2["id"], worker, console)
    _timings(f"rerun after one added box on slice {k}", rerun, time.perf_counter() - requested, console)
    console.print(f"outputs in {output}: example_ct_mask.nii.gz, example_ct_reference.nii.gz, {figure.name}")
