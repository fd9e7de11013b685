"""Trainings over the API without running nnU-Net: request checks against real exports, the job row and its
queue entry, list/get/cancel/delete, artefact downloads, evaluation of a training's predictions (the real
evaluation job on label maps stored as a finished training's) and comparing two trainings.

The training itself (the ``train`` queue's worker) is tested where it runs; here a finished training is a
row whose result and files are written the way the worker writes them.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from tests.conftest import ABDOMEN_LABELS, CT_DIR
from tests.helpers_exporteval import reference_array, upload_case

H = "researcher"
SM = (CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz")


def upload_cases(client, tokens, dataset_id: int, train: int, test: int, start: int = 0) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """``train`` + ``test`` copies of the small example CT with its reference: case id → volume id."""
    cases = [(f"tr{start + i}", "train") for i in range(train)] + [(f"ts{start + i}", "test") for i in range(test)]
    return {case: upload_case(client, tokens, dataset_id, case, *SM, split=split)["id"] for case, split in cases}


def export(client, tokens, run_jobs, dataset_id: int, number: int, **body: Any) -> dict:  # type: ignore[no-untyped-def]
    """A finished reference export (the real export job)."""
    response = client.post(f"/api/v1/datasets/{dataset_id}/exports", json={"dataset_number": number, **body},
                           headers=tokens.headers(H))
    assert response.status_code == 202, response.text
    run_jobs("cpu")
    out = client.get(f"/api/v1/exports/{response.json()['id']}", headers=tokens.headers(H)).json()
    assert out["status"] == "finished", out
    return dict(out)


def post_training(client, tokens, dataset_id: int, role: str = H, key: str | None = None, **body: Any):  # type: ignore[no-untyped-def]
    headers = {**tokens.headers(role), **({"Idempotency-Key": key} if key else {})}
    return client.post(f"/api/v1/datasets/{dataset_id}/trainings", json=body, headers=headers)


def detail(response) -> str:  # type: ignore[no-untyped-def]
    return str(response.json()["detail"])


def test_request_validation(client, tokens, dataset, run_jobs):  # type: ignore[no-untyped-def]
    did = dataset["id"]
    upload_cases(client, tokens, did, train=1, test=0)
    queued = client.post(f"/api/v1/datasets/{did}/exports", json={"dataset_number": 21}, headers=tokens.headers(H))
    assert queued.status_code == 202
    bad_bodies = [
        {},  # export_id is required
        {"export_id": 0},
        {"export_id": queued.json()["id"], "folds": [5]},
        {"export_id": queued.json()["id"], "folds": [0, 0]},
        {"export_id": queued.json()["id"], "folds": []},
        {"export_id": queued.json()["id"], "folds": [True]},
        {"export_id": queued.json()["id"], "folds": ["1"]},
        {"export_id": queued.json()["id"], "configuration": "3d_cascade_fullres"},
        {"export_id": queued.json()["id"], "configuration": "2d", "patch_size": [64, 64, 64]},
        {"export_id": queued.json()["id"], "patch_size": [64, 64]},
        {"export_id": queued.json()["id"], "patch_size": [4, 64, 64]},
        {"export_id": queued.json()["id"], "trainer": "nnUNetTrainer; rm -rf /"},
        {"export_id": queued.json()["id"], "epochs": 0},
        {"export_id": queued.json()["id"], "epochs": 4001},
        {"export_id": queued.json()["id"], "batch_size": 0},
        {"export_id": queued.json()["id"], "gpu_memory_target_gb": 0},
        {"export_id": queued.json()["id"], "device": "tpu"},
        {"export_id": queued.json()["id"], "learning_rate": 0.01},
    ]
    for body in bad_bodies:
        response = post_training(client, tokens, did, **body)
        assert response.status_code == 422, (body, response.text)
    messages = {str(b): detail(post_training(client, tokens, did, **b)) for b in bad_bodies[2:4] + bad_bodies[8:9]}
    assert "folds 0..4" in messages[str(bad_bodies[2])] and "'all'" in messages[str(bad_bodies[2])]
    assert "repeat" in messages[str(bad_bodies[3])]
    assert "needs 2 values" in messages[str(bad_bodies[8])]

    unfinished = post_training(client, tokens, did, export_id=queued.json()["id"], folds=["all"])
    assert unfinished.status_code == 409 and "queued" in detail(unfinished) and "finished" in detail(unfinished)
    missing = post_training(client, tokens, did, export_id=4242)
    assert missing.status_code == 422 and f"not an export of dataset {did}" in detail(missing)
    other = client.post("/api/v1/datasets", json={"name": "other", "labels": ABDOMEN_LABELS},
                        headers=tokens.headers(H)).json()
    foreign = post_training(client, tokens, other["id"], export_id=queued.json()["id"], folds=["all"])
    # the same answer as for an export that does not exist: nothing of another dataset shows
    assert foreign.status_code == 422
    assert detail(foreign) == f"export_id: export {queued.json()['id']} is not an export of dataset {other['id']}"
    assert post_training(client, tokens, 987654, export_id=queued.json()["id"]).status_code == 404
    annotator = post_training(client, tokens, did, role="annotator", export_id=queued.json()["id"])
    assert annotator.status_code == 403
    with_rows = client.get(f"/api/v1/datasets/{did}/trainings", headers=tokens.headers(H))
    assert with_rows.status_code == 200 and with_rows.json() == []  # nothing refused left a row


def test_folds_need_five_training_cases_and_a_queued_training_is_canceled_and_deleted(  # type: ignore[no-untyped-def]
        client, tokens, dataset, run_jobs):
    from rq.job import Job

    from app.core.config import get_settings
    from app.core.redis import get_queue, get_redis

    did = dataset["id"]
    volumes = upload_cases(client, tokens, did, train=2, test=1)
    small = export(client, tokens, run_jobs, did, 31)
    few = post_training(client, tokens, did, export_id=small["id"], folds=[0, "all"])
    assert few.status_code == 422
    assert "at least 5 training cases" in detail(few) and "has 2" in detail(few) and "['all']" in detail(few)

    body = {"export_id": small["id"], "folds": ["all"], "configuration": "2d", "patch_size": [64, 64],
            "epochs": 2, "iterations_per_epoch": 3, "val_iterations_per_epoch": 2, "batch_size": 2, "device": "cpu",
            "tta": False}
    first = post_training(client, tokens, did, key="train-1", **body)
    assert first.status_code == 202, first.text
    out = first.json()
    assert out["status"] == "queued" and out["export_id"] == small["id"] and out["warnings"] == []
    assert out["configuration"] == "2d" and out["folds"] == ["all"]
    assert out["checkpoint_url"] is None and out["predictions_url"] is None
    params = out["params"]
    assert params["folder"] == small["folder"] == "Dataset031_abdomen" and params["dataset_number"] == 31
    assert params["test_cases"] == [{"case_id": "ts0", "volume_id": volumes["ts0"]}]
    assert params["label_values_original"] == small["dataset_json"]["label_values_original"] == ABDOMEN_LABELS
    assert params["label_source"] == "reference" and params["unprompted"] == "background"
    assert params["trainer"] == "nnUNetTrainer" and params["epochs"] == 2 and params["patch_size"] == [64, 64]
    # One job on the train queue, with the trainings' own time limit.
    job = Job.fetch(f"training-{out['id']}", connection=get_redis())
    assert job.origin == "train" and job.func_name == "workers.jobs.train.run_training"
    assert job.timeout == get_settings().training_timeout_s == 172800
    assert [j.id for j in get_queue("train").get_jobs()] == [f"training-{out['id']}"]

    replay = post_training(client, tokens, did, key="train-1", **body)
    assert replay.status_code == 202 and replay.json()["id"] == out["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert post_training(client, tokens, did, key="train-1", **{**body, "epochs": 3}).status_code == 422
    second = post_training(client, tokens, did, **{**body, "configuration": "3d_fullres", "patch_size": None})
    assert second.status_code == 202 and second.json()["configuration"] == "3d_fullres"

    researcher = tokens.headers(H)
    listed = client.get(f"/api/v1/datasets/{did}/trainings?limit=1", headers=researcher)
    assert [t["id"] for t in listed.json()] == [second.json()["id"]] and "rel=\"next\"" in listed.headers["link"]
    rest = client.get(f"/api/v1/datasets/{did}/trainings?after={second.json()['id']}", headers=researcher)
    assert [t["id"] for t in rest.json()] == [out["id"]] and "link" not in rest.headers
    assert client.get(f"/api/v1/datasets/{did}/trainings", headers=tokens.headers("annotator")).status_code == 403
    assert client.get(f"/api/v1/trainings/{out['id']}", headers=tokens.headers("annotator")).status_code == 403

    for what in ("checkpoint", "predictions"):
        early = client.get(f"/api/v1/trainings/{out['id']}/{what}", headers=researcher)
        assert early.status_code == 409 and "queued" in detail(early)
    canceled = client.post(f"/api/v1/trainings/{out['id']}/cancel", headers=researcher)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert Job.fetch(f"training-{out['id']}", connection=get_redis()).get_status() == "canceled"
    again = client.post(f"/api/v1/trainings/{out['id']}/cancel", headers=researcher)
    assert again.status_code == 409 and "already canceled" in detail(again)
    assert [j.id for j in get_queue("train").get_jobs()] == [f"training-{second.json()['id']}"]

    _set_status(second.json()["id"], "running")
    running = client.delete(f"/api/v1/trainings/{second.json()['id']}", headers=researcher)
    assert running.status_code == 409 and "cancel it first" in detail(running)
    from app.core.storage import get_storage

    get_storage().write_bytes(f"trainings/{out['id']}/model.tar.gz", b"leftover")
    assert client.delete(f"/api/v1/trainings/{out['id']}", headers=researcher).status_code == 204
    assert not get_storage().exists(f"trainings/{out['id']}/model.tar.gz")
    assert client.get(f"/api/v1/trainings/{out['id']}", headers=researcher).status_code == 404
    assert client.delete(f"/api/v1/trainings/{out['id']}", headers=researcher).status_code == 404

    # Five training cases: numbered folds are accepted; an export without test cases is, with a warning.
    upload_cases(client, tokens, did, train=3, test=0, start=2)
    five = export(client, tokens, run_jobs, did, 32, include_test=False)
    folds = post_training(client, tokens, did, export_id=five["id"], folds=[0, 1, 2, 3, 4])
    assert folds.status_code == 202, folds.text
    assert folds.json()["params"]["test_cases"] == []
    assert len(folds.json()["warnings"]) == 1 and "no test cases" in folds.json()["warnings"][0]
    # Deleting the export keeps the training (its id stays in params).
    _set_status(folds.json()["id"], "failed")
    assert client.delete(f"/api/v1/exports/{five['id']}", headers=researcher).status_code == 204
    kept = client.get(f"/api/v1/trainings/{folds.json()['id']}", headers=researcher).json()
    assert kept["export_id"] is None and kept["params"]["export_id"] == five["id"]


def _set_status(training_id: int, status: str) -> None:
    from app.core.db import session_scope
    from app.trainings.models import Training

    with session_scope() as session:
        row = session.get(Training, training_id)
        assert row is not None
        row.status = status
        session.commit()


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def finished_training(dataset_id: int, export_id: int | None, predictions: dict[str, tuple[int, np.ndarray]],
                      *, test_cases: list[tuple[str, int]] | None = None) -> int:
    """A finished training row as the worker leaves it: label maps (dataset values, volume grid) under
    ``trainings/{id}/predictions/``, result["predictions"], and the two archives."""
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.imaging.labelmaps import save_label_map
    from app.trainings.jobs import TrainingCase, TrainingParams
    from app.trainings.models import Training

    storage = get_storage()
    img = nib.load(str(SM[0]))  # every case here is a copy of this image: its grid is theirs
    assert isinstance(img, nib.Nifti1Image)
    cases = test_cases if test_cases is not None else [(c, v) for c, (v, _) in predictions.items()]
    params = TrainingParams(
        export_id=export_id or 1, configuration="3d_fullres", folds=["all"], trainer="nnUNetTrainer", epochs=1,
        device="cpu", tta=False, dataset_number=41, folder="Dataset041_abdomen",
        test_cases=[TrainingCase(case_id=c, volume_id=v) for c, v in cases],
        label_values_original=ABDOMEN_LABELS, label_source="reference", unprompted="background",
    )
    with session_scope() as session:
        row = Training(dataset_id=dataset_id, export_id=export_id, params=params.model_dump(mode="json"),
                       status="finished", progress={"done": 1, "total": 1, "phase": "done"}, attempts=1,
                       created_by="researcher")
        session.add(row)
        session.flush()
        prefix = f"trainings/{row.id}"
        listed, files = [], {}
        with tempfile.TemporaryDirectory() as tmp:
            for case_id, (volume_id, mask) in predictions.items():
                path = Path(tmp) / f"{case_id}.nii.gz"
                save_label_map(mask, img, path)
                key = f"{prefix}/predictions/{case_id}.nii.gz"
                storage.put_file(key, path)
                files[f"{case_id}.nii.gz"] = path.read_bytes()
                listed.append({"case_id": case_id, "volume_id": volume_id, "key": key})
        model = _tar({"Dataset041_abdomen/plans.json": b"{}"})
        storage.write_bytes(f"{prefix}/model.tar.gz", model)
        storage.write_bytes(f"{prefix}/predictions.tar.gz", _tar(files))
        row.result = {"predictions": listed, "history": [{"epoch": 1, "train_loss": -0.5}],
                      "model": {"path": "model.tar.gz", "size": len(model),
                                "sha256": hashlib.sha256(model).hexdigest()}}
        row.model_key, row.predictions_key = f"{prefix}/model.tar.gz", f"{prefix}/predictions.tar.gz"
        row.started_at = row.finished_at = datetime.now(UTC)
        session.commit()
        return int(row.id)


def eroded(ref: np.ndarray) -> np.ndarray:
    """The reference with every organ's boundary removed (Dice below 1)."""
    out = ref.copy()
    for value in ABDOMEN_LABELS.values():
        organ = ref == value
        out[organ & ~binary_erosion(organ)] = 0
    return out


def test_artefacts_evaluation_of_trainings_and_compare(client, tokens, dataset, run_jobs):  # type: ignore[no-untyped-def]
    did = dataset["id"]
    researcher = tokens.headers(H)
    volumes = upload_cases(client, tokens, did, train=0, test=3)
    refs = {case: reference_array(vid)[0] for case, vid in volumes.items()}
    exact = finished_training(did, None, {c: (volumes[c], refs[c]) for c in volumes})
    worse = finished_training(did, None, {c: (volumes[c], eroded(refs[c])) for c in volumes})

    # Artefacts: streamed with a file name and an ETag; If-None-Match → 304.
    for what, name in (("checkpoint", "model"), ("predictions", "predictions")):
        got = client.get(f"/api/v1/trainings/{exact}/{what}", headers=researcher)
        assert got.status_code == 200 and got.headers["content-type"] == "application/gzip"
        assert f"training{exact}_{name}.tar.gz" in got.headers["content-disposition"]
        assert int(got.headers["content-length"]) == len(got.content)
        with tarfile.open(fileobj=io.BytesIO(got.content), mode="r:gz") as tar:
            names = tar.getnames()
        assert names == (["Dataset041_abdomen/plans.json"] if what == "checkpoint" else
                         [f"{c}.nii.gz" for c in volumes])
        if what == "checkpoint":  # the worker records the model archive's sha256: that is its ETag
            assert got.headers["etag"] == f'"{hashlib.sha256(got.content).hexdigest()}"'
        cached = client.get(f"/api/v1/trainings/{exact}/{what}",
                            headers={**researcher, "If-None-Match": got.headers["etag"]})
        assert cached.status_code == 304 and cached.content == b""
    out = client.get(f"/api/v1/trainings/{exact}", headers=researcher).json()
    assert out["checkpoint_url"] == f"/api/v1/trainings/{exact}/checkpoint"
    assert out["predictions_url"] == f"/api/v1/trainings/{exact}/predictions"

    # Compare by trainings before either was evaluated: 409 naming the training.
    none_yet = client.post("/api/v1/evaluations/compare", json={"training_a": exact, "training_b": worse},
                           headers=researcher)
    assert none_yet.status_code == 409 and f"training {exact} has no finished evaluation" in detail(none_yet)

    evaluations = {}
    for training in (exact, worse):
        posted = client.post(f"/api/v1/datasets/{did}/evaluations",
                             json={"source": "training", "training": training, "nsd_tolerance_mm": 2},
                             headers=researcher)
        assert posted.status_code == 202, posted.text
        assert posted.json()["params"]["source"] == "training" and posted.json()["params"]["training_id"] == training
        run_jobs("cpu")
        result = client.get(f"/api/v1/evaluations/{posted.json()['id']}", headers=researcher).json()
        assert result["status"] == "finished", result
        evaluations[training] = result
    exact_cases = evaluations[exact]["result"]["cases"]
    assert [c["case_id"] for c in exact_cases] == ["ts0", "ts1", "ts2"]
    assert evaluations[exact]["result"]["source"] == "training"
    for case in exact_cases:
        for name in ABDOMEN_LABELS:
            dice = case["metrics"][name]["Dice"]
            assert dice is None or dice == 1.0  # None: the organ is absent from both (NaN)
    liver = [c["metrics"]["liver"]["Dice"] for c in evaluations[worse]["result"]["cases"]]
    ref, pred = refs["ts0"] == 5, eroded(refs["ts0"]) == 5
    assert liver[0] == pytest.approx(2 * np.count_nonzero(ref & pred) / (ref.sum() + pred.sum()), abs=1e-12)
    assert all(0 < d < 1 for d in liver)

    compared = client.post("/api/v1/evaluations/compare", json={"training_a": exact, "training_b": worse},
                           headers=researcher)
    assert compared.status_code == 200, compared.text
    body = compared.json()
    ids = {"a": evaluations[exact]["id"], "b": evaluations[worse]["id"]}
    assert body["evaluations"] == ids and body["trainings"] == {"a": exact, "b": worse}
    assert body["cases"] == ["ts0", "ts1", "ts2"] and body["metric"] == "dice"
    assert body["per_label"]["liver"]["n"] == 3 and body["per_label"]["liver"]["effect_size_rank_biserial"] == 1.0
    by_ids = client.post("/api/v1/evaluations/compare", json=ids, headers=researcher).json()
    assert by_ids["pooled"] == body["pooled"] and "trainings" not in by_ids
    # The newest finished evaluation is the one compared.
    again = client.post(f"/api/v1/datasets/{did}/evaluations", json={"source": "training", "training": exact},
                        headers=researcher)
    run_jobs("cpu")
    newest = client.post("/api/v1/evaluations/compare", json={"training_a": exact, "training_b": worse},
                         headers=researcher).json()
    assert newest["evaluations"]["a"] == again.json()["id"]
    for bad in ({"a": ids["a"], "training_b": worse}, {"a": ids["a"], "b": ids["b"], "training_a": exact,
                                                       "training_b": worse}, {"training_a": exact}, {}):
        refused = client.post("/api/v1/evaluations/compare", json=bad, headers=researcher)
        assert refused.status_code == 422, (bad, refused.text)
    assert client.post("/api/v1/evaluations/compare", json={"training_a": exact, "training_b": 987654},
                       headers=researcher).status_code == 404
    assert client.post("/api/v1/evaluations/compare", json={"training_a": exact, "training_b": worse},
                       headers=tokens.headers("annotator")).status_code == 403


def test_evaluation_of_a_training_is_checked(client, tokens, dataset, run_jobs):  # type: ignore[no-untyped-def]
    did = dataset["id"]
    researcher = tokens.headers(H)
    volumes = upload_cases(client, tokens, did, train=1, test=1)
    no_ref = upload_case(client, tokens, did, "noref", SM[0], None, split="test")["id"]
    ref = reference_array(volumes["ts0"])[0]

    def evaluate(training: int):  # type: ignore[no-untyped-def]
        return client.post(f"/api/v1/datasets/{did}/evaluations", json={"source": "training", "training": training},
                           headers=researcher)

    unfinished = finished_training(did, None, {"ts0": (volumes["ts0"], ref)})
    _set_status(unfinished, "running")
    response = evaluate(unfinished)
    assert response.status_code == 409 and "running" in detail(response)
    empty = finished_training(did, None, {}, test_cases=[])
    response = evaluate(empty)
    assert response.status_code == 422 and "no predictions" in detail(response)
    unreferenced = finished_training(did, None, {"noref": (no_ref, np.zeros_like(ref))})
    response = evaluate(unreferenced)
    assert response.status_code == 422 and "no prediction of a case with a reference" in detail(response)
    other = client.post("/api/v1/datasets", json={"name": "other", "labels": ABDOMEN_LABELS}, headers=researcher)
    theirs = finished_training(other.json()["id"], None, {})
    for training in (theirs, 987654):
        response = evaluate(training)
        assert response.status_code == 422 and f"not a training of dataset {did}" in detail(response)
    for body in ({"source": "training"}, {"source": "training", "training": 0},
                 {"source": "training", "training": unfinished, "model": "litemedsam"},
                 {"source": "nnunet", "training": unfinished}):
        response = client.post(f"/api/v1/datasets/{did}/evaluations", json=body, headers=researcher)
        assert response.status_code == 422, (body, response.text)
    # A training predicting a case with and one without a reference: the one with is scored.
    mixed = finished_training(did, None, {"ts0": (volumes["ts0"], ref), "noref": (no_ref, np.zeros_like(ref))})
    response = evaluate(mixed)
    assert response.status_code == 202, response.text
    assert [c["case_id"] for c in response.json()["params"]["cases"]] == ["ts0"]
    assert response.json()["params"]["missing_cases"] == ["noref"]
    # A training a queued evaluation reads is not deleted; once that has finished it is, and the result stays.
    refused = client.delete(f"/api/v1/trainings/{mixed}", headers=researcher)
    assert refused.status_code == 409 and f"evaluation {response.json()['id']}" in detail(refused)
    run_jobs("cpu")
    assert client.delete(f"/api/v1/trainings/{mixed}", headers=researcher).status_code == 204
    kept = client.get(f"/api/v1/evaluations/{response.json()['id']}", headers=researcher).json()
    assert kept["status"] == "finished" and kept["result"]["cases"][0]["metrics"]["liver"]["Dice"] == 1.0
