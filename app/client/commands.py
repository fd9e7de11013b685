"""``crowdsam client …``: datasets, upload, prompts (YOLO/COCO), segment, masks, export, evaluate.

Talks only to the HTTP API (:mod:`app.client.api`). Results go to stdout (ids, JSON), progress and
messages to stderr; an API refusal prints one ``error: HTTP 4xx: detail`` line and exits 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from app.client.api import Api, ApiError

app = typer.Typer(help="Researcher CLI over the HTTP API (CROWDSAM_URL, CROWDSAM_TOKEN)", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets", no_args_is_help=True)
prompts_app = typer.Typer(help="Prompt import/export (YOLO, COCO)", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(prompts_app, name="prompts")

err = Console(stderr=True)
NIFTI = (".nii.gz", ".nii")
LABEL_DIRS = ("labels", "labelsTr", "references")
REFERENCE_NAMES = ("reference", "seg", "label", "labels")
DICOM_MAGIC = b"DICM"


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None


@app.callback()
def connection(
    ctx: typer.Context,
    url: str = typer.Option("http://127.0.0.1:8000", envvar="CROWDSAM_URL", help="API base URL"),
    token: str | None = typer.Option(None, envvar="CROWDSAM_TOKEN", help="API token (researcher or admin)",
                                     show_default=False),
) -> None:
    """Every command talks to URL with TOKEN."""
    ctx.obj = Target(url, token)


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def connect(ctx: typer.Context) -> Iterator[Api]:
    """An :class:`Api` for the command; an :class:`ApiError` becomes one line and exit code 1."""
    target: Target = ctx.obj
    if not target.token:
        fail("no token: pass --token or set CROWDSAM_TOKEN")
    try:
        with Api(target.url, target.token) as api:
            yield api
    except ApiError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted (queued or running jobs go on on the server)")
        raise typer.Exit(130) from None


def _json_option(value: str | None, what: str) -> Any:
    """A JSON value given inline or as ``@file.json``."""
    if value is None:
        return None
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{what}: not JSON or not readable ({exc})") from exc


def emit(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


# --- datasets -----------------------------------------------------------------------------
@datasets_app.command("create")
def datasets_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="unique dataset name"),
    labels: str = typer.Option(..., help='JSON label name → value, e.g. \'{"liver": 5}\' or @labels.json'),
    prompt_classes: str | None = typer.Option(None, help='JSON YOLO class → label, e.g. \'{"0": "liver"}\''),
    annotators: list[str] = typer.Option([], "--annotator", help="annotator token names that may label it"),
    level: float | None = typer.Option(None, help="default CT window level"),
    width: float | None = typer.Option(None, help="default CT window width"),
) -> None:
    """Create a dataset; prints its id."""
    body: dict[str, Any] = {"name": name, "labels": _json_option(labels, "--labels")}
    if prompt_classes is not None:
        body["prompt_classes"] = _json_option(prompt_classes, "--prompt-classes")
    if annotators:
        body["annotators"] = annotators
    if level is not None and width is not None:
        body["window"] = {"level": level, "width": width}
    with connect(ctx) as api:
        dataset = api.post("/datasets", json=body)
    typer.echo(dataset["id"])


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="JSON on stdout")) -> None:
    """The datasets you are a member of."""
    with connect(ctx) as api:
        rows = list(api.pages("/datasets"))
    if as_json:
        emit(rows)
        return
    table = Table("id", "name", "labels")
    for row in rows:
        table.add_row(str(row["id"]), row["name"], ", ".join(sorted(row["labels"])))
    Console().print(table)


# --- upload -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path  # a NIfTI file, or a folder holding a DICOM series
    dicom: bool
    reference: Path | None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI) and not path.name.startswith(".")


def _is_dicom(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as fh:
        return fh.read(132)[128:132] == DICOM_MAGIC


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_dicom(p))


def _label_file(folder: Path, case_id: str) -> Path | None:
    for directory in LABEL_DIRS:
        for suffix in NIFTI:
            if (candidate := folder / directory / f"{case_id}{suffix}").is_file():
                return candidate
    return None


def find_cases(folder: Path, reference_suffix: str = "_seg") -> list[Case]:
    """Cases of a folder: ``<case>.nii.gz`` files and ``<case>/`` subfolders (a NIfTI image or DICOM files).

    References: ``<case>{suffix}.nii.gz`` beside the image (or inside the case folder, also named
    ``reference|seg|label.nii.gz``), else ``labels/<case>.nii.gz`` (``labelsTr/``, ``references/``).
    """
    cases: list[Case] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name in LABEL_DIRS:
            continue
        if _is_nifti(path) and not _stem(path).endswith(reference_suffix):
            case_id = _stem(path)
            reference = next((p for s in NIFTI if (p := folder / f"{case_id}{reference_suffix}{s}").is_file()), None)
            cases.append(Case(case_id, path, False, reference or _label_file(folder, case_id)))
        elif path.is_dir():
            case_id = path.name
            niftis = sorted(p for p in path.iterdir() if _is_nifti(p))
            refs = [p for p in niftis if _stem(p).endswith(reference_suffix) or _stem(p).lower() in REFERENCE_NAMES]
            images = [p for p in niftis if p not in refs]
            reference = refs[0] if len(refs) == 1 else _label_file(folder, case_id)
            if len(images) == 1:
                cases.append(Case(case_id, images[0], False, reference))
            elif not images and _dicom_files(path):
                cases.append(Case(case_id, path, True, reference))
            elif images:
                raise typer.BadParameter(f"{path}: several NIfTI images {[p.name for p in images]}; keep one per case")
    return cases


class _CountingReader(io.BufferedReader):
    """A file whose reads advance a progress task (httpx streams multipart files with ``read``)."""

    def __init__(self, path: Path, advance: Callable[[int], None]) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._advance = advance

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self._advance(len(data))
        return data


def _zip_series(files: list[Path], root: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in files:
            archive.write(path, path.relative_to(root).as_posix())


@app.command()
def upload(
    ctx: typer.Context,
    dataset_id: int = typer.Argument(..., help="dataset id"),
    folder: Path = typer.Argument(..., exists=True, file_okay=False, help="folder of cases"),
    split: str = typer.Option("train", help="train | test"),
    reference_map: str | None = typer.Option(None, help='JSON source value → label, e.g. \'{"5": "liver"}\' '
                                                        "or @map.json"),
    reference_other: str | None = typer.Option(None, help="'background': drop reference values the map omits"),
    reference_suffix: str = typer.Option("_seg", help="a reference beside an image is <case><suffix>.nii.gz"),
) -> None:
    """Upload every case of FOLDER: NIfTI files or case folders (a DICOM series is zipped here).

    Existing cases (409) are skipped, so a rerun uploads only what is missing.
    """
    cases = find_cases(folder, reference_suffix)
    if not cases:
        fail(f"{folder}: no cases (*.nii.gz files, or folders with one NIfTI image or DICOM files)")
    mapping = _json_option(reference_map, "--reference-map")
    form: dict[str, str] = {}  # reference options: sent with a reference only
    if mapping is not None:
        form["reference_map"] = json.dumps(mapping)
    if reference_other:
        form["reference_other"] = reference_other
    outcome: dict[str, list[str]] = {"uploaded": [], "skipped": [], "failed": []}
    failures: list[str] = []
    with connect(ctx) as api, tempfile.TemporaryDirectory(prefix="crowdsam-client-") as tmp, Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    ) as progress:
        for case in cases:
            image = case.image
            if case.dicom:
                image = Path(tmp) / f"{case.case_id}.zip"
                _zip_series(_dicom_files(case.image), case.image, image)
            parts = [image] + ([case.reference] if case.reference else [])
            size = sum(p.stat().st_size for p in parts)
            task = progress.add_task(f"{case.case_id}{' (DICOM)' if case.dicom else ''}", total=size)

            def build(case: Case = case, image: Path = image, task: TaskID = task) -> dict[str, Any]:
                progress.reset(task)

                def advance(n: int) -> None:
                    progress.advance(task, n)

                files: dict[str, Any] = {"image": (f"{case.case_id}.zip" if case.dicom else image.name,
                                                   _CountingReader(image, advance),
                                                   "application/zip" if case.dicom else "application/gzip")}
                if case.reference:
                    files["reference"] = (case.reference.name, _CountingReader(case.reference, advance),
                                          "application/gzip")
                data = {**(form if case.reference else {}), "split": split, "case_id": case.case_id}
                return {"files": files, "data": data}

            try:
                response = api.request("POST", f"/datasets/{dataset_id}/volumes", ok=(409,), build=build,
                                       timeout=600)
            except ApiError as exc:
                progress.update(task, description=f"[red]{case.case_id}: failed")
                failures.append(f"{case.case_id}: {exc}")
                outcome["failed"].append(case.case_id)
                continue
            finally:
                if case.dicom:
                    image.unlink(missing_ok=True)
            if response.status_code == 409:
                progress.update(task, description=f"[yellow]{case.case_id}: exists, skipped",
                                completed=size)
                outcome["skipped"].append(case.case_id)
            else:
                volume = response.json()
                progress.update(task, description=f"[green]{case.case_id}[/] → volume {volume['id']}")
                outcome["uploaded"].append(case.case_id)
    for line in failures:
        err.print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
    emit(outcome)
    if outcome["failed"]:
        raise typer.Exit(1)


# --- prompts ------------------------------------------------------------------------------
@prompts_app.command("import-yolo")
def prompts_import_yolo(
    ctx: typer.Context,
    dataset_id: int,
    paths: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="zips and/or .txt files"),
    annotator: str = typer.Option(..., help="whose boxes these are"),
    convention: str = typer.Option("display", help="display | seed (PNG frame of the files)"),
) -> None:
    """Import OpenLabeling/YOLO files (all or nothing)."""
    def build() -> dict[str, Any]:
        return {"files": [("files", (p.name, p.open("rb"), "application/octet-stream")) for p in paths],
                "data": {"annotator": annotator, "convention": convention}}

    with connect(ctx) as api:
        emit(api.request("POST", f"/datasets/{dataset_id}/prompts/yolo", build=build, timeout=600).json())


@prompts_app.command("import-coco")
def prompts_import_coco(
    ctx: typer.Context,
    dataset_id: int,
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="a COCO JSON file"),
    annotator: str | None = typer.Option(None, help="whose boxes these are (unless an annotation names one)"),
) -> None:
    """Import COCO boxes (display pixels; images named img{CASE}-slice{ZZZ}.png), all or nothing."""
    def build() -> dict[str, Any]:
        return {"files": {"file": (path.name, path.open("rb"), "application/json")},
                "data": {} if annotator is None else {"annotator": annotator}}

    with connect(ctx) as api:
        emit(api.request("POST", f"/datasets/{dataset_id}/prompts/coco", build=build, timeout=600).json())


def merge_coco(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Several volumes' COCO documents → one (image and annotation ids renumbered)."""
    merged: dict[str, Any] = {"info": {"description": "crowdsam prompts"}, "images": [], "annotations": [],
                              "categories": documents[0]["categories"] if documents else []}
    for doc in documents:
        renumber: dict[int, int] = {}
        for image in doc["images"]:
            renumber[image["id"]] = len(merged["images"]) + 1
            merged["images"].append({**image, "id": renumber[image["id"]]})
        for annotation in doc["annotations"]:
            merged["annotations"].append({**annotation, "id": len(merged["annotations"]) + 1,
                                          "image_id": renumber[annotation["image_id"]]})
    return merged


def _write_json(target: Path, value: Any) -> None:
    """Atomic: a temporary file beside ``target``, renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(value, out)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@prompts_app.command("export-coco")
def prompts_export_coco(
    ctx: typer.Context,
    dataset_id: int,
    out: Path = typer.Argument(..., help="a .json file (every volume in one document) or a folder (one per case)"),
    case: list[str] = typer.Option([], "--case", help="only these case ids"),
    annotator: str | None = typer.Option(None, help="only this annotator's boxes and views"),
) -> None:
    """Export boxes as COCO JSON (re-importable with import-coco)."""
    params = {} if annotator is None else {"annotator": annotator}
    with connect(ctx) as api:
        volumes = [v for v in api.pages(f"/datasets/{dataset_id}/volumes") if not case or v["case_id"] in case]
        missing = sorted(set(case) - {v["case_id"] for v in volumes})
        if missing:
            fail(f"no volume with case id {missing} in dataset {dataset_id}")
        documents = {v["case_id"]: api.get(f"/volumes/{v['id']}/prompts.coco.json", params=params) for v in volumes}
    if out.suffix.lower() == ".json":
        _write_json(out, merge_coco(list(documents.values())))
    else:
        for case_id, doc in documents.items():
            _write_json(out / f"{case_id}.coco.json", doc)
    err.print(f"{sum(len(d['annotations']) for d in documents.values())} boxes of {len(documents)} volumes → {out}")


# --- jobs ---------------------------------------------------------------------------------
def _job_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err)


def wait_jobs(api: Api, paths: dict[str, str], unit: str) -> dict[str, dict[str, Any]]:
    """Poll jobs (name → path) with one progress bar each, driven by their ``progress``; their last rows."""
    name_of = {path: name for name, path in paths.items()}
    with _job_progress() as progress:
        tasks = {path: progress.add_task(name, total=None, status="queued") for name, path in paths.items()}

        def show(path: str, job: dict[str, Any]) -> None:
            p = job.get("progress") or {}
            progress.update(tasks[path], completed=p.get("done", 0), total=p.get("total") or None,
                            status=f"{job['status']} ({unit})")

        return {name_of[path]: job for path, job in api.wait(list(paths.values()), show).items()}


def _check_finished(jobs: dict[str, dict[str, Any]]) -> None:
    bad = {name: f"{job['status']}: {job.get('error') or ''}".strip(": ") for name, job in jobs.items()
           if job["status"] != "finished"}
    if bad:
        fail("; ".join(f"{name} {why}" for name, why in bad.items()))


@app.command()
def segment(
    ctx: typer.Context,
    dataset_id: int,
    model: str = typer.Option("litemedsam", help="a model from GET /models"),
    fusion: str = typer.Option("majority", help="how annotators' masks merge"),
    label: list[str] = typer.Option([], "--label", help="only these organs"),
    fill_gaps: int = typer.Option(0, help="interpolate boxes across gaps of at most this many slices"),
    wait: bool = typer.Option(False, "--wait", help="wait with a progress bar per volume"),
) -> None:
    """Segment every volume of the dataset that has prompts (one job per volume)."""
    body: dict[str, Any] = {"model": model, "fusion": fusion, "fill_gaps": fill_gaps}
    if label:
        body["labels"] = label
    with connect(ctx) as api:
        answer = api.post(f"/datasets/{dataset_id}/segmentations", json=body,
                          headers={"Idempotency-Key": f"crowdsam-client-{uuid.uuid4()}"})
        if answer["skipped"]:
            err.print(f"volumes without prompts, skipped: {answer['skipped']}")
        if not wait:
            emit(answer)
            return
        jobs = wait_jobs(api, {f"segmentation {i}": f"/segmentations/{i}" for i in answer["ids"]}, "slices")
    emit({name: {k: job[k] for k in ("id", "volume_id", "status", "error")} for name, job in jobs.items()})
    _check_finished(jobs)


@app.command()
def masks(
    ctx: typer.Context,
    dataset_id: int,
    out_dir: Path = typer.Argument(..., file_okay=False, help="folder for <case>.nii.gz / <case>.dcm"),
    fmt: str = typer.Option("nifti", "--format", help="nifti | dicom-seg"),
    model: str | None = typer.Option(None, help="the newest finished segmentation of this model (default any)"),
    figure: bool = typer.Option(False, "--figure", help="also <case>_figure.png, a montage with Dice"),
) -> None:
    """Download the newest finished mask of every volume of the dataset."""
    if fmt not in ("nifti", "dicom-seg"):
        raise typer.BadParameter("--format: nifti or dicom-seg")
    params = {"format": fmt} if fmt != "nifti" else None
    suffix = ".dcm" if fmt == "dicom-seg" else ".nii.gz"
    written: dict[str, str] = {}
    with connect(ctx) as api:
        for volume in api.pages(f"/datasets/{dataset_id}/volumes"):
            seg = next((s for s in api.pages(f"/volumes/{volume['id']}/segmentations")
                        if s["status"] == "finished" and (model is None or s["model"] == model)), None)
            if seg is None:
                err.print(f"[yellow]{volume['case_id']}: no finished segmentation, skipped")
                continue
            target = api.download(f"/segmentations/{seg['id']}/mask", out_dir / f"{volume['case_id']}{suffix}",
                                  params=params)
            written[volume["case_id"]] = str(target)
            if figure:
                api.download(f"/segmentations/{seg['id']}/figure.png", out_dir / f"{volume['case_id']}_figure.png")
            err.print(f"{volume['case_id']}: segmentation {seg['id']} → {target}")
    emit(written)


@app.command()
def export(
    ctx: typer.Context,
    dataset_id: int,
    number: int = typer.Option(..., help="nnU-Net dataset id, 11..999"),
    name: str | None = typer.Option(None, help="folder suffix (default: the dataset's name)"),
    label_source: str = typer.Option("reference", help="reference | segmentation"),
    model: str | None = typer.Option(None, help="segmentation model (label source segmentation)"),
    unprompted: str = typer.Option("background", help="background | ignore"),
    wait: bool = typer.Option(False, "--wait", help="wait with a progress bar"),
    out: Path | None = typer.Option(None, help="download the .tar.gz here (implies --wait)"),
) -> None:
    """Export the dataset as an nnU-Net v2 raw dataset."""
    body: dict[str, Any] = {"dataset_number": number, "label_source": label_source, "unprompted": unprompted}
    if name:
        body["dataset_name"] = name
    if model:
        body["model"] = model
    with connect(ctx) as api:
        job = api.post(f"/datasets/{dataset_id}/exports", json=body,
                       headers={"Idempotency-Key": f"crowdsam-client-{uuid.uuid4()}"})
        if wait or out:
            job = wait_jobs(api, {f"export {job['id']}": f"/exports/{job['id']}"}, "cases")[f"export {job['id']}"]
            _check_finished({f"export {job['id']}": job})
            if out:
                api.download(f"/exports/{job['id']}/archive", out)
                err.print(f"export {job['id']} → {out}")
    emit({k: job.get(k) for k in ("id", "status", "folder", "error")})


@app.command()
def evaluate(
    ctx: typer.Context,
    dataset_id: int,
    model: str = typer.Option("litemedsam", help="score the newest finished segmentation of this model"),
    predictions: Path | None = typer.Option(None, exists=True, dir_okay=False,
                                            help="score an archive of predictions instead (zip / tar.gz)"),
    nsd_tolerance_mm: float = typer.Option(2.0, help="NSD tolerance"),
    wait: bool = typer.Option(False, "--wait", help="wait with a progress bar"),
    out: Path | None = typer.Option(None, help="download the HTML report here (implies --wait)"),
    summary: Path | None = typer.Option(None, help="download summary.json here (implies --wait)"),
) -> None:
    """Evaluate segmentations (or uploaded predictions) against the references."""
    key = {"Idempotency-Key": f"crowdsam-client-{uuid.uuid4()}"}
    with connect(ctx) as api:
        if predictions is None:
            job = api.post(f"/datasets/{dataset_id}/evaluations", headers=key,
                           json={"source": "segmentation", "model": model, "nsd_tolerance_mm": nsd_tolerance_mm})
        else:
            def build() -> dict[str, Any]:
                assert predictions is not None
                archive = (predictions.name, predictions.open("rb"), "application/octet-stream")
                return {"files": {"predictions": archive},
                        "data": {"nsd_tolerance_mm": str(nsd_tolerance_mm)}}

            job = api.request("POST", f"/datasets/{dataset_id}/evaluations", build=build, headers=key,
                              timeout=600).json()
        if wait or out or summary:
            name = f"evaluation {job['id']}"
            job = wait_jobs(api, {name: f"/evaluations/{job['id']}"}, "cases")[name]
            _check_finished({name: job})
            if out:
                api.download(f"/evaluations/{job['id']}/report", out)
            if summary:
                api.download(f"/evaluations/{job['id']}/summary.json", summary)
    emit({k: job.get(k) for k in ("id", "status", "error")})
