"""Datasets: label schema validation, YOLO class map, default window, list/get."""

from __future__ import annotations

import pytest

from tests.conftest import ABDOMEN_LABELS


def create(client, tokens, body: dict, role: str = "researcher"):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/datasets", json=body, headers=tokens.headers(role))


def test_create_returns_the_dataset_with_defaults(client, tokens):
    response = create(client, tokens, {"name": "abdomen", "labels": ABDOMEN_LABELS})
    assert response.status_code == 201, response.text
    body = response.json()
    assert isinstance(body["id"], int)
    assert body["name"] == "abdomen"
    assert body["labels"] == ABDOMEN_LABELS
    assert body["prompt_classes"] is None
    assert body["window"] == {"level": 40.0, "width": 400.0}
    assert body["created_at"]


def test_create_with_prompt_classes_and_window(client, tokens):
    body = {
        "name": "btcv",
        "labels": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 6, "aorta": 8},
        "prompt_classes": {"0": "spleen", "1": "kidney_right", "2": "kidney_left", "5": "liver", "7": "aorta"},
        "window": {"level": 50, "width": 350},
    }
    response = create(client, tokens, body)
    assert response.status_code == 201, response.text
    assert response.json()["prompt_classes"] == body["prompt_classes"]
    assert response.json()["window"] == {"level": 50.0, "width": 350.0}


def test_duplicate_name_is_409(client, tokens, dataset):
    response = create(client, tokens, {"name": "abdomen", "labels": {"liver": 1}}, role="admin")
    assert response.status_code == 409
    assert "abdomen" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": "d", "labels": {}}, "at least one label"),
        ({"name": "d", "labels": {"background": 1}}, "reserved"),
        ({"name": "d", "labels": {"liver": 1, "ignore": 2}}, "reserved"),
        ({"name": "d", "labels": {"liver": 1, "spleen": 1}}, "repeated: [1]"),
        ({"name": "d", "labels": {"liver": 0}}, "1..65535"),
        ({"name": "d", "labels": {"liver": -3}}, "1..65535"),
        ({"name": "d", "labels": {"liver": 70000}}, "1..65535"),
        ({"name": "d", "labels": {"liver": 1.5}}, "integer"),
        ({"name": "d", "labels": {"  ": 1}}, "non-blank"),
        ({"name": "d", "labels": {"liver": 1}, "prompt_classes": {"0": "pancreas"}}, "pancreas"),
        ({"name": "d", "labels": {"liver": 1}, "prompt_classes": {"a": "liver"}}, "non-negative integer"),
        ({"name": "d", "labels": {"liver": 1}, "window": {"level": 40, "width": 0}}, "width"),
        ({"name": "", "labels": {"liver": 1}}, "name"),
        ({"labels": {"liver": 1}}, "name"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_datasets_are_422_naming_the_problem(client, tokens, body, needle):
    response = create(client, tokens, body)
    assert response.status_code == 422, response.text
    assert needle in response.text
    assert client.get("/api/v1/datasets", headers=tokens.headers("admin")).json() == []


def test_list_and_get(client, tokens, dataset):
    second = create(client, tokens, {"name": "liver-only", "labels": {"liver": 1}}).json()
    listed = client.get("/api/v1/datasets", headers=tokens.headers("researcher"))  # the owner of both
    assert listed.status_code == 200
    assert [d["id"] for d in listed.json()] == [dataset["id"], second["id"]]
    one = client.get(f"/api/v1/datasets/{second['id']}", headers=tokens.headers("researcher"))
    assert one.status_code == 200 and one.json() == second
    # An annotator sees only the datasets they may label ("annotator" is a member of the first only).
    mine = client.get("/api/v1/datasets", headers=tokens.headers("annotator")).json()
    assert [d["id"] for d in mine] == [dataset["id"]]
    hidden = client.get(f"/api/v1/datasets/{second['id']}", headers=tokens.headers("annotator"))
    assert hidden.status_code == 404 and hidden.json()["detail"] == f"dataset {second['id']} not found"
    missing = client.get("/api/v1/datasets/999", headers=tokens.headers("researcher"))
    assert missing.status_code == 404
    assert missing.json() == {"detail": "dataset 999 not found"}


def test_annotator_cannot_create(client, tokens):
    assert create(client, tokens, {"name": "x", "labels": {"liver": 1}}, role="annotator").status_code == 403


def _race(create) -> BaseException | None:  # type: ignore[no-untyped-def]
    """Run ``create(session)`` in two sessions whose inserts collide; return the loser's error."""
    import threading
    import time

    from app.core.db import session_scope

    first, second = session_scope(), session_scope()
    outcome: dict[str, BaseException | None] = {}

    def run_second() -> None:
        try:
            create(second)
            outcome["error"] = None
        except BaseException as exc:
            outcome["error"] = exc
            second.rollback()

    try:
        create(first)  # flushed, not committed
        thread = threading.Thread(target=run_second)
        thread.start()
        time.sleep(0.5)  # the second insert now waits on the unique index
        first.commit()
        thread.join(30)
        return outcome["error"]
    finally:
        first.close()
        second.close()


def test_concurrent_duplicate_dataset_name_is_conflict_not_500():
    from app.auth.models import Role
    from app.auth.security import Principal
    from app.core.errors import Conflict
    from app.datasets.schemas import DatasetCreate
    from app.datasets.service import create_dataset

    admin = Principal(0, "admin", Role.admin)  # admins own no membership row: only the name can collide
    error = _race(lambda s: create_dataset(s, DatasetCreate(name="race", labels={"liver": 1}), admin))
    assert isinstance(error, Conflict) and "race" in error.detail


def test_concurrent_duplicate_token_name_is_conflict_not_500():
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.errors import Conflict

    error = _race(lambda s: create_token(s, "race", Role.annotator))
    assert isinstance(error, Conflict) and "race" in error.detail
