"""The study's loop through the API only: crowd → SAM labels → nnU-Net trainings → evaluation → paired test.

What the study did (arXiv 2403.15218, BTCV: nnU-Net on reference labels Dice .896 vs on SAM-from-crowd
labels .799, Wilcoxon p < 0.001), done by one script against a running crowdsam:

1. a dataset with the five organs; cases uploaded with their reference label maps, split train / test;
2. a simulated crowd (``POST /volumes/{id}/prompts/simulate``) on every training case;
3. LiteMedSAM segmentations of the crowd's boxes (``POST /datasets/{id}/segmentations``);
4. three nnU-Net v2 exports: reference labels; crowd-SAM labels with unprompted slices as background; and
   with them as nnU-Net's ``ignore`` (its intensity fingerprint excludes ``ignore``: workers/fingerprint.py);
5. one training per export (``POST /datasets/{id}/trainings``, queue ``train``), predicting the test cases;
6. an evaluation of each training's predictions against the references (``source: training``);
7. ``POST /evaluations/compare`` between trainings (paired Wilcoxon per label and pooled);
8. a markdown table beside the study's numbers (``data/samples/seed/results/BTCV/*-nnunet-11-pred.csv``).

Data. The repo carries one abdominal CT with reference masks (TotalSegmentator's ``example_ct``, 122×101×112,
3 mm; the organs lie in slices 61..111). Its organ-bearing slab is cut into ``--blocks`` disjoint z-blocks,
uploaded as separate cases; ``--test-blocks`` of them are the test split. One patient cut in blocks is a
smoke test of the loop, not a replication: say so wherever the numbers are shown (docs/reproduction.md).

Budget. Default (CPU): ``3d_fullres``, fold ``all``, ``--epochs 4`` × ``--iterations 12`` with small patches
(``--patch 32 64 64``, batch 2), no test-time mirroring: minutes on 2 cores. ``--gpu``: device ``cuda``,
nnU-Net's own budget (1000 epochs × 250 iterations, planned patch size, mirroring) unless overridden.

Run against the embedded stack it starts itself (PostgreSQL, Redis, ``crowdsam serve``, one worker on
``sam``, ``cpu`` and ``train``)::

    .venv/bin/python bench/study_loop.py [--gpu] [--epochs N] [--out study-loop.md]

or against a running deployment: ``--url https://host --token …`` (its workers must serve ``train``);
``--dataset ID`` uses that dataset's cases (split, references, labels) instead of the sample blocks, and
``--real-crowd`` keeps the prompts already stored (a real crowd) instead of simulating one.
The last line printed is ``study loop: reference <dice> · crowd/background <dice> · crowd/ignore <dice>
(study: .896 vs .799)``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.client.api import Api  # noqa: E402

SAMPLES = ROOT / "data" / "samples" / "totalsegmentator"
STUDY = ROOT / "data" / "samples" / "seed" / "results" / "BTCV"
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}
TOTALSEG_MAP = {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver", "52": "aorta"}
STUDY_COLUMNS = {"spleen": "spleen_dice", "kidney_right": "rkidney_dice", "kidney_left": "lkidney_dice",
                 "liver": "liver_dice", "aorta": "aorta_dice"}
ORGAN_SLAB = (56, 112)  # z range of example_ct holding the five organs (61..111) with a margin
VARIANTS = (  # (name, export body)
    ("reference", {"label_source": "reference"}),
    ("crowd/background", {"label_source": "segmentation", "model": "litemedsam", "unprompted": "background"}),
    ("crowd/ignore", {"label_source": "segmentation", "model": "litemedsam", "unprompted": "ignore"}),
)
COMPARISONS = (("reference", "crowd/background"), ("reference", "crowd/ignore"),
               ("crowd/background", "crowd/ignore"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the embedded stack (when no --url is given) ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def embedded_stack(workdir: Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL + Redis (the servers in DATABASE_URL/REDIS_URL, else embedded ones), the API and one worker."""
    from app.core.runtime import stop_process

    os.environ.setdefault("CROWDSAM_DATA_DIR", str(workdir / "data"))
    from app import migrate
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope
    from app.core.services import database_url, redis_url

    os.environ["DATABASE_URL"] = database_url()
    os.environ["REDIS_URL"] = redis_url()
    migrate.upgrade()
    _forget_earlier_runs()
    with session_scope() as session:
        _, token = create_token(session, f"study-loop-{uuid.uuid4().hex[:6]}", Role("admin"))
        session.commit()
    port = _free_port()
    commands = {
        "api": [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--no-migrate"],
        "worker": [sys.executable, "-m", "app.cli", "worker", "-q", "sam", "-q", "cpu", "-q", "train"],
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for name, command in commands.items():
            handle = (workdir / f"{name}.log").open("wb")
            logs.append(handle)
            procs.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy()))
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, procs[0], workdir / "api.log")
        yield base, token
    finally:
        for proc in procs:
            stop_process(proc)
        for handle in logs:
            handle.close()


def _forget_earlier_runs() -> None:
    """This private stack's queues may still hold an interrupted run's jobs (a training retry): drop them, so the
    new run's jobs do not wait behind work nobody will read."""
    from rq.registry import ScheduledJobRegistry

    from app.core.redis import get_queue

    for name in ("sam", "cpu", "train"):
        queue = get_queue(name)
        queue.empty()
        registry = ScheduledJobRegistry(queue=queue)
        for job_id in registry.get_job_ids():
            registry.remove(job_id, delete_job=True)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], logfile: Path) -> None:
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API exited early; see {logfile}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit("the API did not become ready in 90 s")


# --- data ----------------------------------------------------------------------------------------
def write_blocks(tmp: Path, blocks: int) -> list[tuple[str, Path, Path]]:
    """The organ slab of example_ct cut into ``blocks`` disjoint z-blocks: (case id, image, reference)."""
    import nibabel as nib
    import numpy as np

    image: Any = nib.load(SAMPLES / "example_ct.nii.gz")
    reference: Any = nib.load(SAMPLES / "example_seg_fast_force_split.nii.gz")
    edges = np.linspace(ORGAN_SLAB[0], ORGAN_SLAB[1], blocks + 1).round().astype(int)
    out = []
    for i, (start, stop) in enumerate(itertools.pairwise(edges)):
        case = f"ct_block{i}"
        paths = (tmp / f"{case}.nii.gz", tmp / f"{case}_seg.nii.gz")
        nib.save(image.slicer[:, :, start:stop], paths[0])
        nib.save(reference.slicer[:, :, start:stop], paths[1])
        out.append((case, *paths))
    return out


def study_numbers() -> dict[str, dict[str, float]]:
    """The study's BTCV nnU-Net Dice per organ (mean over its 15 test cases): trained on GT vs on SAM labels."""
    numbers: dict[str, dict[str, float]] = {}
    for name, file in (("GT", "GT-nnunet-11-pred.csv"), ("SAM", "SAM-nnunet-11-pred.csv")):
        with (STUDY / file).open() as handle:
            rows = list(csv.DictReader(handle))
        numbers[name] = {organ: statistics.fmean(float(r[col]) for r in rows) for organ, col in STUDY_COLUMNS.items()}
        numbers[name]["mean"] = statistics.fmean(float(r[c]) for r in rows for c in STUDY_COLUMNS.values())
    return numbers


# --- the loop --------------------------------------------------------------------------------------
def wait(api: Api, paths: list[str], what: str, timeout: float) -> list[dict[str, Any]]:
    seen: dict[str, str] = {}

    def progress(path: str, row: dict[str, Any]) -> None:
        text = f"{row['status']} {json.dumps(row.get('progress') or {}, sort_keys=True)[:160]}"
        if seen.get(path) != text:
            seen[path] = text
            log(f"  {what} {path}: {text}")

    rows = api.wait(paths, on_progress=progress, interval=2.0, timeout=timeout)
    failed = {path: row.get("error") for path, row in rows.items() if row["status"] != "finished"}
    if failed:
        raise SystemExit(f"{what} did not finish: {failed}")
    return list(rows.values())


def training_body(args: argparse.Namespace, export_id: int) -> dict[str, Any]:
    body: dict[str, Any] = {"export_id": export_id, "configuration": args.configuration, "folds": args.folds,
                            "device": "cuda" if args.gpu else "cpu", "tta": args.gpu}
    if args.epochs is not None or not args.gpu:
        body["epochs"] = args.epochs or 4
    if args.iterations is not None or not args.gpu:
        body["iterations_per_epoch"] = args.iterations or 12
        body["val_iterations_per_epoch"] = max(1, (args.iterations or 12) // 4)
    if args.patch or not args.gpu:
        body["patch_size"] = args.patch or [32, 64, 64]
        body["batch_size"] = args.batch or 2
    elif args.batch:
        body["batch_size"] = args.batch
    return body


def upload_blocks(api: Api, args: argparse.Namespace, tmp: Path, stamp: str,
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A new dataset with the sample CT's z-blocks as cases (``--test-blocks`` of them the test split)."""
    dataset = api.post("/datasets", json={"name": f"study-loop-{stamp}", "labels": LABELS,
                                          "window": {"level": 40, "width": 400}})
    test_blocks = {int(b) for b in args.test_blocks.split(",")}
    volumes: dict[str, dict[str, Any]] = {}
    for i, (case, image, reference) in enumerate(write_blocks(tmp, args.blocks)):
        split = "test" if i in test_blocks else "train"

        def files(image: Path = image, reference: Path = reference) -> dict[str, Any]:
            return {"files": {"image": (image.name, image.open("rb"), "application/gzip"),
                              "reference": (reference.name, reference.open("rb"), "application/gzip")}}

        volumes[case] = api.post(f"/datasets/{dataset['id']}/volumes", build=files, data={
            "case_id": case, "split": split, "reference_map": json.dumps(TOTALSEG_MAP),
            "reference_other": "background"})
        log(f"uploaded {case} ({split}): volume {volumes[case]['id']}, shape {volumes[case]['shape']}")
    return dataset, volumes


def run(api: Api, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    stamp = uuid.uuid4().hex[:6]
    if args.dataset is not None:  # the researcher's own cases: their split, references and labels
        dataset = api.get(f"/datasets/{args.dataset}")
        volumes = {v["case_id"]: v for v in api.pages(f"/datasets/{args.dataset}/volumes")}
    else:
        dataset, volumes = upload_blocks(api, args, tmp, stamp)
    did, labels = dataset["id"], list(dataset["labels"])
    train = [v for v in volumes.values() if v["split"] == "train"]
    timings["upload_s"] = time.perf_counter() - started

    t0 = time.perf_counter()
    for seed, volume in enumerate([] if args.real_crowd else train):
        crowd = api.post(f"/volumes/{volume['id']}/prompts/simulate", json={
            "annotators": args.annotators, "coverage": args.coverage, "jitter": args.jitter, "seed": seed})
        log(f"crowd on {volume['case_id']}: {crowd['boxes']} boxes, {crowd['seen_slices']} seen slices")
    segs = api.post(f"/datasets/{did}/segmentations", json={"model": "litemedsam", "fusion": "majority",
                                                          "labels": labels})  # absent organs: background
    wait(api, [f"/segmentations/{i}" for i in segs["ids"]], "segmentation", args.timeout)
    timings["crowd_and_sam_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exports = {}
    for n, (name, body) in enumerate(VARIANTS):
        exports[name] = api.post(f"/datasets/{did}/exports", json={
            **body, "dataset_number": args.dataset_number + n, "dataset_name": f"loop{stamp}{n}"})
    wait(api, [f"/exports/{e['id']}" for e in exports.values()], "export", args.timeout)
    timings["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trainings = {name: api.post(f"/datasets/{did}/trainings", json=training_body(args, e["id"]))
                 for name, e in exports.items()}
    rows = wait(api, [f"/trainings/{t['id']}" for t in trainings.values()], "training", args.timeout)
    timings["train_s"] = time.perf_counter() - t0
    trained = dict(zip(trainings, rows, strict=True))

    t0 = time.perf_counter()
    evaluations = {name: api.post(f"/datasets/{did}/evaluations", json={"source": "training", "training": t["id"]})
                   for name, t in trainings.items()}
    scored = wait(api, [f"/evaluations/{e['id']}" for e in evaluations.values()], "evaluation", args.timeout)
    timings["evaluate_s"] = time.perf_counter() - t0
    comparisons = {f"{a} vs {b}": api.post("/evaluations/compare", json={
        "training_a": trainings[a]["id"], "training_b": trainings[b]["id"], "metric": "dice"})
        for a, b in COMPARISONS}
    timings["total_s"] = time.perf_counter() - started
    return {"dataset": did, "labels": labels, "volumes": volumes, "trainings": trained,
            "evaluations": dict(zip(evaluations, scored, strict=True)), "comparisons": comparisons,
            "timings": timings, "budget": {name: t["params"] for name, t in trained.items()}}


# --- report --------------------------------------------------------------------------------------
def dice_by_label(evaluation: dict[str, Any], labels: list[str]) -> dict[str, float | None]:
    """Mean Dice over the test cases per label (NaN cases — organ absent from both — left out) and overall."""
    result = evaluation["result"]
    out: dict[str, float | None] = {}
    values_all = []
    for label in labels:
        values = [c["metrics"][label]["Dice"] for c in result["cases"]
                  if label in c["metrics"] and c["metrics"][label].get("Dice") is not None]
        out[label] = statistics.fmean(values) if values else None
        values_all += values
    out["mean"] = statistics.fmean(values_all) if values_all else None
    return out


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(outcome: dict[str, Any], args: argparse.Namespace) -> str:
    study = study_numbers()
    labels = outcome["labels"]
    dice = {name: dice_by_label(e, labels) for name, e in outcome["evaluations"].items()}
    budget = training_body(args, 0)
    budget.pop("export_id")
    test_cases = [c for c, v in outcome["volumes"].items() if v["split"] == "test"]
    source = f"dataset {args.dataset}" if args.dataset else "z-blocks of one CT"
    lines = [
        f"Budget: {json.dumps(budget)} — {'GPU' if args.gpu else 'CPU'}; train cases: "
        f"{sum(v['split'] == 'train' for v in outcome['volumes'].values())}, test cases: {', '.join(test_cases)} "
        f"({source}). The study trained nnU-Net with its full budget on BTCV; its rows are the mean Dice "
        "over its 15 test cases (seed/results/BTCV/*-nnunet-11-pred.csv): far more data and training than this.",
        "",
        "| labels of the training | " + " | ".join(labels) + " | mean |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for name in dice:
        lines.append(f"| {name} (this run) | " + " | ".join(fmt(dice[name][k]) for k in [*labels, "mean"]) + " |")
    for name, label in (("GT", "reference (study, BTCV)"), ("SAM", "crowd-SAM (study, BTCV)")):
        lines.append(f"| {label} | " + " | ".join(fmt(study[name].get(k)) for k in [*labels, "mean"]) + " |")
    lines += ["", "| comparison (Dice, paired Wilcoxon) | pairs | p (pooled) | effect size |", "|---|---|---|---|"]
    for name, result in outcome["comparisons"].items():
        pooled = result["pooled"]
        lines.append(f"| {name} | {pooled.get('n')} | {fmt(pooled.get('p_value'))} | "
                     f"{fmt(pooled.get('effect_size_rank_biserial'))} |")
    timings = outcome["timings"]
    lines += ["", "Wall times: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running crowdsam (default: start an embedded stack)")
    parser.add_argument("--token", default=os.environ.get("CROWDSAM_TOKEN"), help="admin or researcher token")
    parser.add_argument("--gpu", action="store_true", help="train on CUDA with nnU-Net's own budget")
    parser.add_argument("--configuration", default="3d_fullres", choices=["2d", "3d_fullres", "3d_lowres"])
    parser.add_argument("--folds", nargs="+", default=["all"], type=lambda v: v if v == "all" else int(v))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--iterations", type=int, help="training iterations per epoch")
    parser.add_argument("--patch", type=int, nargs="+", help="patch size (z y x or y x)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dataset", type=int, help="use this dataset's cases (its train/test split, references "
                        "and labels) instead of uploading the sample CT's blocks")
    parser.add_argument("--real-crowd", action="store_true",
                        help="keep the prompts already stored (a real crowd) instead of simulating one")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--test-blocks", default="1,3")
    parser.add_argument("--annotators", type=int, default=3)
    parser.add_argument("--coverage", type=float, default=0.8)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--dataset-number", type=int, default=700)
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per stage")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "study-loop",
                        help="the embedded stack's data and logs")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write every row the loop read here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the embedded API and worker on the way out

    with tempfile.TemporaryDirectory(prefix="crowdsam-study-loop-") as tmp, contextlib.ExitStack() as stack:
        if args.url:
            if not args.token:
                raise SystemExit("--url needs --token (or CROWDSAM_TOKEN)")
            url, token = args.url, args.token
        else:
            args.workdir.mkdir(parents=True, exist_ok=True)
            log(f"embedded stack: data and the api/worker logs under {args.workdir}")
            url, token = stack.enter_context(embedded_stack(args.workdir))
        with Api(url, token) as api:
            outcome = run(api, args, Path(tmp))
    table = markdown(outcome, args)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(outcome, indent=1, default=str))
    dice = {name: dice_by_label(e, outcome["labels"])["mean"] for name, e in outcome["evaluations"].items()}
    print("study loop: " + " · ".join(f"{name} {fmt(value)}" for name, value in dice.items())
          + " (study: .896 vs .799)")


if __name__ == "__main__":
    main()
