"""Training requests: every check runs before a row exists; the worker (queue ``train``) does the work.

A request is refused when nnU-Net would refuse it or could not do what was asked: an export of another
dataset or one that does not exist (422), an export that has not finished (409), an export without
labelled training cases (422), integer folds with fewer than five training cases (nnU-Net's 5-fold split
needs five; 422 says to use 'all'). An export without test cases is accepted: the training then predicts
nothing, and the answer says so in ``warnings``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.errors import Conflict, Invalid, NotFound
from app.datasets.models import Dataset
from app.exports.jobs import ExportParams
from app.exports.models import Export
from app.exports.repository import ExportRepository
from app.jobs import submit
from app.jobs.states import JobStatus
from app.jobs.submit import stopping
from app.trainings.jobs import KIND, TrainingCase, TrainingParams
from app.trainings.models import Training
from app.trainings.repository import TrainingRepository
from app.trainings.schemas import N_FOLDS, TrainingOut, TrainingRequest

NO_TEST_CASES = ("export {export_id} has no test cases: the training predicts nothing (predictions stay empty) "
                 "and cannot be evaluated; export with test cases (split 'test', include_test) to evaluate it")


def _finished_export(session: Session, dataset: Dataset, export_id: int) -> Export:
    """The export to train on: of this dataset (422 otherwise, the same answer as for a missing one) and finished."""
    try:
        export = ExportRepository(session).get(export_id)
    except NotFound:
        export = None
    if export is None or export.dataset_id != dataset.id:
        raise Invalid(f"export_id: export {export_id} is not an export of dataset {dataset.id}")
    if export.status != JobStatus.finished or not export.result:
        raise Conflict(f"export {export.id} is {export.status}: train on it once it has finished")
    return export


def _train_cases(export: Export, params: ExportParams) -> list[str]:
    """The export's training cases, each with its label file (422 when there is none or one lacks it)."""
    result = export.result or {}
    train = [c.case_id for c in params.cases if c.split == "train"]
    if not train:
        raise Invalid(f"export {export.id} has no training cases: nnU-Net needs at least one labelled case")
    files = {f["path"] for f in result.get("files", [])}
    unlabelled = [c for c in train if f"{params.folder}/labelsTr/{c}.nii.gz" not in files]
    if unlabelled:
        raise Invalid(f"export {export.id}: training cases without a label file: {unlabelled[:20]}")
    fingerprint = result.get("dataset_json", {}).get("crowdsam", {}).get("fingerprint")
    if fingerprint is not None and fingerprint.get("file") is None:
        raise Invalid(f"export {export.id}: {fingerprint.get('why', 'no labelled organ voxel')} — "
                      "prompt and segment some slices of the training cases, then export again")
    return train


def create_training(session: Session, dataset: Dataset, body: TrainingRequest, principal: Principal) -> Training:
    """Validate and add a queued training row (flushed; the router submits it, it is enqueued after the commit)."""
    export = _finished_export(session, dataset, body.export_id)
    export_params = ExportParams.model_validate(export.params)
    train = _train_cases(export, export_params)
    numbered = [f for f in body.folds if f != "all"]
    if numbered and len(train) < N_FOLDS:
        raise Invalid(f"folds {numbered}: nnU-Net's {N_FOLDS}-fold cross-validation needs at least {N_FOLDS} "
                      f"training cases and export {export.id} has {len(train)}; use folds ['all'] to train on "
                      "every training case")
    original = (export.result or {}).get("dataset_json", {}).get("label_values_original") or {}
    if not original:
        raise Invalid(f"export {export.id} records no labels (dataset.json label_values_original)")
    params = TrainingParams(
        **body.model_dump(),
        dataset_number=export_params.dataset_number,
        folder=export_params.folder,
        test_cases=[TrainingCase(case_id=c.case_id, volume_id=c.volume_id)
                    for c in export_params.cases if c.split == "test"],
        label_values_original={str(k): int(v) for k, v in original.items()},
        label_source=export_params.label_source,
        unprompted=export_params.unprompted,
    )
    row = TrainingRepository(session).add(
        Training(
            dataset_id=dataset.id,
            export_id=export.id,
            params=params.model_dump(mode="json"),
            status=JobStatus.queued,
            progress={"done": 0, "total": body.epochs * len(body.folds), "phase": "queued"},
            attempts=0,
            created_by=principal.name,
        )
    )
    session.flush()
    return row


def delete(session: Session, training_id: int) -> None:
    """Delete a training and (after the commit) its files; see :func:`app.jobs.submit.delete`.

    Refused (409) while a queued or running evaluation reads its predictions; finished evaluations keep
    their results (their ``params`` keep the training's id).
    """
    repo = TrainingRepository(session)
    row = repo.get(training_id)
    user = repo.active_evaluation(row)
    if user is not None:
        raise Conflict(f"training {row.id} is used by evaluation {user}, which has not finished: "
                       "wait for it or cancel it first")
    submit.delete(session, KIND, row.id, lambda r: [f"trainings/{r.id}"])


def finished(row: Training) -> Training:
    """The row, once it has finished (409 before: its artefacts exist from then on)."""
    if row.status != JobStatus.finished:
        raise Conflict(f"training {row.id} is {row.status}: its artefacts exist once it has finished")
    return row


def predictions(row: Training) -> list[dict[str, Any]]:
    """The finished training's predictions: [{case_id, volume_id, key}] (dataset label values)."""
    return list((finished(row).result or {}).get("predictions") or [])


def warnings(row: Training) -> list[str]:
    params = row.params or {}
    out = []
    if not params.get("test_cases"):
        out.append(NO_TEST_CASES.format(export_id=params.get("export_id")))
    return out


def to_out(row: Training) -> TrainingOut:
    params = row.params or {}
    done = row.status == JobStatus.finished
    return TrainingOut(
        id=row.id,
        dataset_id=row.dataset_id,
        export_id=row.export_id,
        configuration=str(params.get("configuration", "")),
        folds=list(params.get("folds", [])),
        status=row.status,
        params=params,
        progress=row.progress or {},
        error=row.error,
        attempts=row.attempts,
        cancel_requested=stopping(KIND, row),
        created_by=row.created_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        result=row.result,
        checkpoint_url=f"/api/v1/trainings/{row.id}/checkpoint" if done and row.model_key else None,
        predictions_url=f"/api/v1/trainings/{row.id}/predictions" if done and row.predictions_key else None,
        warnings=warnings(row),
    )
