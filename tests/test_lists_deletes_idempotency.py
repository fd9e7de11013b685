"""Issue 10 item 4: keyset pagination of the list endpoints, deletes of job rows (files after the
commit), ``Idempotency-Key`` on job-creating POSTs and the per-user cap on active jobs."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rq.job import Job
from sqlalchemy import func, select, update

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.redis import get_redis
from app.core.storage import get_storage
from app.evaluations.models import Evaluation
from app.exports.models import Export
from app.segmentations.models import Segmentation
from tests.conftest import CT_DIR, upload

BOX = {"slice": 10, "label": "liver", "box": [5, 6, 50, 60]}


def _follow(client: Any, headers: dict[str, str], url: str) -> tuple[list[int], int]:
    """Every id of a list, following ``Link: rel="next"``; (ids, pages)."""
    ids: list[int] = []
    pages = 0
    next_url: str | None = url
    while next_url is not None:
        response = client.get(next_url, headers=headers)
        assert response.status_code == 200, response.text
        assert isinstance(response.json(), list)
        ids += [row["id"] for row in response.json()]
        pages += 1
        link = response.headers.get("link")
        next_url = None
        if link is not None:
            assert link.endswith('>; rel="next"') and link.startswith("</api/v1/")
            next_url = link[1:link.index(">")]
        assert pages < 20
    return ids, pages


@pytest.fixture
def volume(client, tokens, dataset) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A volume without reference, with one prompt (enough to request a segmentation)."""
    response = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", case_id="v1")
    assert response.status_code == 201, response.text
    body = response.json()
    prompt = client.post(f"/api/v1/volumes/{body['id']}/prompts", json={"boxes": [BOX]},
                         headers=tokens.headers("researcher"))
    assert prompt.status_code == 201, prompt.text
    return dict(body)


def _add_segmentation(volume_id: int, status: str = "finished", created_by: str = "test") -> int:
    with session_scope() as session:
        row = Segmentation(volume_id=volume_id, model="litemedsam", fusion="majority", labels=None, status=status,
                           progress={}, stats={}, attempts=1, created_by=created_by)
        session.add(row)
        session.flush()
        if status == "finished":
            row.mask_key = f"volumes/{volume_id}/segmentations/{row.id}/mask.nii.gz"
            row.mask_sha256 = "0" * 64
            get_storage().write_bytes(row.mask_key, b"mask")
        session.commit()
        return row.id


# --- pagination ---------------------------------------------------------------------------------
def test_lists_are_keyset_pages_with_a_next_link(client, tokens, volume) -> None:  # type: ignore[no-untyped-def]
    admin, researcher = tokens.headers("admin"), tokens.headers("researcher")
    for i in range(4):
        made = client.post("/api/v1/datasets", json={"name": f"d{i}", "labels": {"liver": 1}}, headers=researcher)
        assert made.status_code == 201, made.text
    all_datasets = [d["id"] for d in client.get("/api/v1/datasets", headers=admin).json()]
    assert len(all_datasets) == 5 and all_datasets == sorted(all_datasets)
    assert client.get("/api/v1/datasets", headers=admin).headers.get("link") is None  # one page: no link
    assert _follow(client, admin, "/api/v1/datasets?limit=2") == (all_datasets, 3)
    page = client.get(f"/api/v1/datasets?limit=2&after={all_datasets[1]}", headers=admin)
    assert [d["id"] for d in page.json()] == all_datasets[2:4]
    assert f"after={all_datasets[3]}" in page.headers["link"] and "limit=2" in page.headers["link"]

    tokens_all = [t["id"] for t in client.get("/api/v1/tokens", headers=admin).json()]
    assert len(tokens_all) == 4
    assert _follow(client, admin, "/api/v1/tokens?limit=3") == (tokens_all, 2)

    second = upload(client, tokens, volume["dataset_id"], CT_DIR / "example_ct_sm.nii.gz", case_id="v2").json()
    assert _follow(client, admin, f"/api/v1/datasets/{volume['dataset_id']}/volumes?limit=1") == (
        [volume["id"], second["id"]], 2)

    seg_ids = [_add_segmentation(volume["id"]) for _ in range(3)]
    newest_first = sorted(seg_ids, reverse=True)
    assert _follow(client, admin, f"/api/v1/volumes/{volume['id']}/segmentations?limit=2") == (newest_first, 2)
    assert [s["id"] for s in client.get(f"/api/v1/volumes/{volume['id']}/segmentations?after={newest_first[0]}",
                                        headers=admin).json()] == newest_first[1:]

    for bad in ("limit=0", "limit=1001", "after=0", "limit=x", "after=2147483648"):
        for url in ("/api/v1/datasets", "/api/v1/tokens", f"/api/v1/datasets/{volume['dataset_id']}/volumes",
                    f"/api/v1/volumes/{volume['id']}/segmentations"):
            assert client.get(f"{url}?{bad}", headers=admin).status_code == 422, (url, bad)
    assert len(client.get("/api/v1/datasets?limit=1000", headers=admin).json()) == 5


def test_pagination_is_documented(client) -> None:  # type: ignore[no-untyped-def]
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/datasets", "/api/v1/tokens", "/api/v1/datasets/{dataset_id}/volumes",
                 "/api/v1/volumes/{volume_id}/segmentations"):
        operation = paths[path]["get"]
        params = {p["name"]: p["schema"] for p in operation["parameters"]}
        assert params["limit"]["maximum"] == 1000 and params["limit"]["minimum"] == 1
        assert params["limit"]["default"] == 100
        assert "Link" in operation["responses"]["200"]["headers"]
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "array"
        assert "422" in operation["responses"]


# --- deletes ------------------------------------------------------------------------------------
def _add_job(model: type, dataset_id: int, status: str, params: dict[str, Any] | None = None,
             result: dict[str, Any] | None = None) -> int:
    with session_scope() as session:
        extra = {"format": "nnunet-v2"} if model is Export else {}
        row = model(dataset_id=dataset_id, status=status, params=params or {}, progress={}, attempts=0,
                    created_by="test", result=result, **extra)
        session.add(row)
        session.commit()
        return int(row.id)


def test_delete_segmentation_export_evaluation(client, tokens, volume) -> None:  # type: ignore[no-untyped-def]
    staff, storage = tokens.headers("researcher"), get_storage()
    vid, did = volume["id"], volume["dataset_id"]
    used_by_done, used_by_queued, running = (_add_segmentation(vid) for _ in range(3))
    with session_scope() as session:
        session.execute(update(Segmentation).where(Segmentation.id == running).values(status="running"))
        session.commit()
    result = {"cases": [{"case_id": "v1", "metrics": {"liver": {"Dice": 0.5}}}], "labels": ["liver"]}
    done = [_add_job(Evaluation, did, "finished", {"cases": [{"segmentation_id": used_by_done}]}, result)
            for _ in range(2)]
    blocking = _add_job(Evaluation, did, "queued", {"cases": [{"segmentation_id": used_by_queued}]})

    assert client.delete(f"/api/v1/segmentations/{vid}", headers=tokens.headers("annotator")).status_code == 403
    refused = client.delete(f"/api/v1/segmentations/{used_by_queued}", headers=staff)
    assert refused.status_code == 409 and f"evaluation {blocking}" in refused.json()["detail"]
    busy = client.delete(f"/api/v1/segmentations/{running}", headers=staff)
    assert busy.status_code == 409 and "cancel it first" in busy.json()["detail"]
    assert storage.exists(f"volumes/{vid}/segmentations/{running}/mask.nii.gz")

    assert client.delete(f"/api/v1/segmentations/{used_by_done}", headers=staff).status_code == 204
    assert not storage.exists(f"volumes/{vid}/segmentations/{used_by_done}")
    assert client.get(f"/api/v1/segmentations/{used_by_done}", headers=staff).status_code == 404
    assert client.delete(f"/api/v1/segmentations/{used_by_done}", headers=staff).status_code == 404
    # Finished evaluations that used it keep their results; nothing 500s.
    got = client.get(f"/api/v1/evaluations/{done[0]}", headers=staff)
    assert got.status_code == 200 and got.json()["params"]["cases"][0]["segmentation_id"] == used_by_done
    compared = client.post("/api/v1/evaluations/compare", json={"a": done[0], "b": done[1], "metric": "dice"},
                           headers=staff)
    assert compared.status_code == 200, compared.text
    assert client.get(f"/api/v1/volumes/{vid}/segmentations", headers=staff).status_code == 200

    # A queued job is canceled (its RQ job too) and deleted; its worker would find nothing to do.
    queued = client.post(f"/api/v1/volumes/{vid}/segmentations", json={}, headers=staff).json()["id"]
    assert client.delete(f"/api/v1/segmentations/{queued}", headers=staff).status_code == 204
    assert Job.fetch(f"segmentation-{queued}", connection=get_redis()).get_status() == "canceled"
    from workers.jobs.segment import run_segmentation

    assert run_segmentation(queued)["status"] == "skipped"

    for model, kind in ((Export, "exports"), (Evaluation, "evaluations")):
        finished = _add_job(model, did, "finished")
        storage.write_bytes(f"{kind}/{finished}/result/file.txt", b"x")
        assert client.delete(f"/api/v1/{kind}/{finished}", headers=staff).status_code == 204
        assert not storage.exists(f"{kind}/{finished}")
        assert client.get(f"/api/v1/{kind}/{finished}", headers=staff).status_code == 404
        assert client.delete(f"/api/v1/{kind}/{finished}", headers=staff).status_code == 404
        busy_id = _add_job(model, did, "running")
        assert client.delete(f"/api/v1/{kind}/{busy_id}", headers=staff).status_code == 409
        assert client.delete(f"/api/v1/{kind}/{busy_id}", headers=tokens.headers("annotator")).status_code == 403
    assert client.get(f"/api/v1/evaluations/{blocking}", headers=staff).status_code == 200


def test_files_go_only_once_the_deletion_commits(client, tokens, volume) -> None:  # type: ignore[no-untyped-def]
    from app.exports.jobs import KIND
    from app.jobs import submit

    storage = get_storage()
    export_id = _add_job(Export, volume["dataset_id"], "failed")
    storage.write_bytes(f"exports/{export_id}/a.txt", b"x")
    with session_scope() as session:
        submit.delete(session, KIND, export_id, lambda row: [f"exports/{row.id}"])
        assert storage.exists(f"exports/{export_id}/a.txt")  # not before the commit
        session.rollback()
    assert storage.exists(f"exports/{export_id}/a.txt")  # rolled back: row and files stay
    with session_scope() as session:
        assert session.get(Export, export_id) is not None
        submit.delete(session, KIND, export_id, lambda row: [f"exports/{row.id}"])
        session.commit()
    assert not storage.exists(f"exports/{export_id}")


# --- Idempotency-Key ----------------------------------------------------------------------------
def _count(model: type) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_idempotency_key_replays_the_first_answer(client, tokens, volume) -> None:  # type: ignore[no-untyped-def]
    url = f"/api/v1/volumes/{volume['id']}/segmentations"
    headers = {**tokens.headers("researcher"), "Idempotency-Key": "seg-1"}
    first = client.post(url, json={"fusion": "majority"}, headers=headers)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    same_json = b'{ "fusion" : "majority" }'  # serialized differently: the same request
    again = client.post(url, content=same_json, headers={**headers, "content-type": "application/json"})
    assert again.status_code == 202 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert _count(Segmentation) == 1 and get_redis().llen("rq:queue:sam") == 1

    other_body = client.post(url, json={"fusion": "staple"}, headers=headers)
    assert other_body.status_code == 422 and "another request" in other_body.json()["detail"]
    other_path = client.post(f"/api/v1/datasets/{volume['dataset_id']}/segmentations", json={"fusion": "majority"},
                             headers=headers)
    assert other_path.status_code == 422
    # Keys are per token; a new key is a new request.
    admin = {**tokens.headers("admin"), "Idempotency-Key": "seg-1"}
    by_admin = client.post(url, json={"fusion": "majority"}, headers=admin)
    assert by_admin.status_code == 202 and by_admin.json()["id"] != first.json()["id"]
    assert client.post(url, json={}, headers={**headers, "Idempotency-Key": "seg-2"}).status_code == 202
    assert _count(Segmentation) == 3
    # A refused request stores nothing: the same key can be used once it is fixed.
    bad = client.post(url, json={"model": "nope"}, headers={**headers, "Idempotency-Key": "seg-3"})
    assert bad.status_code == 422
    assert client.post(url, json={}, headers={**headers, "Idempotency-Key": "seg-3"}).status_code == 202
    # After 24 h the key is forgotten.
    with session_scope() as session:
        from app.auth.models import IdempotencyKey

        session.execute(update(IdempotencyKey).values(created_at=datetime.now(UTC) - timedelta(hours=25)))
        session.commit()
    late = client.post(url, json={"fusion": "majority"}, headers=headers)
    assert late.status_code == 202 and "idempotent-replayed" not in late.headers
    assert late.json()["id"] != first.json()["id"]

    for key in ("", "x" * 201, "a\x7fb"):
        response = client.post(url, json={}, headers={**headers, "Idempotency-Key": key})
        assert response.status_code == 422, key
    assert client.post(url, json={}, headers={**headers, "Idempotency-Key": "x" * 200}).status_code == 202


def test_idempotency_key_on_dataset_jobs_and_evaluations(client, tokens, sm_volume) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers_exporteval import add_finished_segmentation

    did = sm_volume["dataset_id"]
    headers = {**tokens.headers("researcher"), "Idempotency-Key": "k"}
    add_finished_segmentation(sm_volume["id"])
    for path, body, model in (
        (f"/api/v1/datasets/{did}/exports", {"dataset_number": 501}, Export),
        (f"/api/v1/datasets/{did}/evaluations", {"source": "segmentation"}, Evaluation),
    ):
        key = {"Idempotency-Key": f"k-{model.__name__}"}
        first = client.post(path, json=body, headers={**headers, **key})
        assert first.status_code == 202, first.text
        again = client.post(path, json=body, headers={**headers, **key})
        assert again.status_code == 202 and again.json() == first.json(), again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert _count(model) == 1
        assert client.post(path, json={**body, "extra": 1}, headers={**headers, **key}).status_code == 422


def test_concurrent_requests_with_one_key_make_one_row(tokens) -> None:  # type: ignore[no-untyped-def]
    """The second claim waits on the first's uncommitted row, then replays its answer."""
    from app.auth.idempotency import Idempotency
    from app.auth.models import ApiToken
    from app.auth.security import Principal

    with session_scope() as session:
        token = session.scalar(select(ApiToken).where(ApiToken.name == "researcher"))
        assert token is not None
        principal = Principal(token_id=token.id, name=token.name, role=token.role)
    request = Idempotency("same", "f" * 64)
    first = session_scope()
    assert request.claim(first, principal) is None  # the key is ours, not committed yet
    outcome: dict[str, Any] = {}

    def second() -> None:
        with session_scope() as session:
            outcome["answer"] = request.run(session, principal, 202, lambda: {"id": "second"})
            session.commit()

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive()  # waiting on the first request's row
    request.remember(first, principal, 202, {"id": "first"})
    first.commit()
    first.close()
    thread.join(10)
    replay = outcome["answer"]
    assert replay.status_code == 202 and replay.body == b'{"id":"first"}'
    assert replay.headers["idempotent-replayed"] == "true"


# --- per-user cap on active jobs ----------------------------------------------------------------
def test_active_jobs_are_capped_per_user(client, tokens, volume, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CROWDSAM_MAX_ACTIVE_JOBS_PER_USER", "2")
    get_settings.cache_clear()
    try:
        staff = tokens.headers("researcher")
        url = f"/api/v1/volumes/{volume['id']}/segmentations"
        ids = [client.post(url, json={}, headers=staff).json()["id"] for _ in range(2)]
        _add_segmentation(volume["id"], status="finished", created_by="researcher")  # finished rows do not count
        over = client.post(url, json={}, headers=staff)
        assert over.status_code == 429 and over.headers["retry-after"] == "60"
        assert "at most 2" in over.json()["detail"] and "CROWDSAM_MAX_ACTIVE_JOBS_PER_USER" in over.json()["detail"]
        assert _count(Segmentation) == 3 and get_redis().llen("rq:queue:sam") == 2
        # Every kind counts: a running export of the same name fills the slot a cancel frees.
        assert client.post(f"/api/v1/segmentations/{ids[0]}/cancel", headers=staff).status_code == 200
        _add_job(Export, volume["dataset_id"], "running")
        with session_scope() as session:
            session.execute(update(Export).values(created_by="researcher"))
            session.commit()
        assert client.post(url, json={}, headers=staff).status_code == 429
        assert client.post(url, json={}, headers=tokens.headers("admin")).status_code == 202  # another user
        with session_scope() as session:
            session.execute(update(Export).values(status="finished"))
            session.commit()
        assert client.post(url, json={}, headers=staff).status_code == 202
    finally:
        get_settings.cache_clear()


def test_cap_is_documented(client) -> None:  # type: ignore[no-untyped-def]
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/volumes/{volume_id}/segmentations", "/api/v1/datasets/{dataset_id}/segmentations",
                 "/api/v1/datasets/{dataset_id}/exports", "/api/v1/datasets/{dataset_id}/evaluations"):
        operation = paths[path]["post"]
        assert "429" in operation["responses"]
        assert "Idempotency-Key" in {p["name"] for p in operation["parameters"]}
