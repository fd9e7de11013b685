"""Task assignment: anatomy first, fewest annotators first, never twice, leases spread annotators."""

from __future__ import annotations

import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from app.auth.models import Role
from app.auth.service import create_token
from app.core.config import get_settings
from app.core.db import session_scope
from app.tasks import leases
from tests.conftest import CT_DIR, upload

KIDNEY_MAP = {"2": "kidney_right"}  # a reference with one organ that spans only part of the volume


def _expected_interest() -> list[int]:
    img = nib.load(str(CT_DIR / "example_seg.nii.gz"))  # RAS: canonical k == original z
    data = np.asarray(img.dataobj)
    present = np.isin(data, [int(v) for v in KIDNEY_MAP]).any(axis=(0, 1))
    return [int(k) for k in np.flatnonzero(present)]


@pytest.fixture
def kidney_volume(client, tokens, dataset) -> dict:  # type: ignore[no-untyped-def]
    r = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
               case_id="sm", reference_map=json.dumps(KIDNEY_MAP), reference_other="background")
    assert r.status_code == 201, r.text
    return r.json()


def _token(name: str, role: Role = Role.annotator) -> dict[str, str]:
    """A new annotator of every dataset there is."""
    from sqlalchemy import select

    from app.datasets.access import add_member
    from app.datasets.models import Dataset

    with session_scope() as session:
        row, token = create_token(session, name, role)
        for dataset in session.scalars(select(Dataset)):
            add_member(session, dataset, row)
        session.commit()
    return {"Authorization": f"Bearer {token}"}


def _next(client, headers, dataset_id):  # type: ignore[no-untyped-def]
    return client.get(f"/api/v1/tasks/next?dataset={dataset_id}", headers=headers)


def _work_through(client, headers, dataset_id) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Take tasks and mark each seen until 204; returns the (volume, slice) handed out in order."""
    done = []
    while True:
        r = _next(client, headers, dataset_id)
        if r.status_code == 204:
            return done
        assert r.status_code == 200, r.text
        task = r.json()
        assert task["done"] == len(done)
        done.append((task["volume_id"], task["slice"]))
        assert len(done) == len(set(done)), "a slice was handed out twice"
        posted = client.post(f"/api/v1/volumes/{task['volume_id']}/prompts", json={"seen": [task["slice"]]},
                             headers=headers)
        assert posted.status_code == 201


def test_task_shape(client, tokens, dataset, kidney_volume):
    r = _next(client, tokens.headers("annotator"), dataset["id"])
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["dataset_id"] == dataset["id"] and task["volume_id"] == kidney_volume["id"] and task["case_id"] == "sm"
    assert task["slice"] in _expected_interest()
    assert task["labels"] == dataset["labels"] and set(task["colors"]) == set(dataset["labels"])
    assert all(c.startswith("#") and len(c) == 7 for c in task["colors"].values())
    assert task["slice_url"] == f"/api/v1/volumes/{kidney_volume['id']}/slices/{task['slice']}.png"
    assert task["display_size"] == [122, 101] and task["done"] == 0
    assert client.get(task["slice_url"], headers=tokens.headers("annotator")).status_code == 200
    lease_s = get_settings().task_lease_s
    from datetime import UTC, datetime
    remaining = (datetime.fromisoformat(task["lease_expires_at"]) - datetime.now(UTC)).total_seconds()
    assert lease_s - 5 < remaining <= lease_s


def test_each_annotator_gets_every_slice_of_interest_once_until_enough_annotators(client, tokens, dataset,
                                                                                 kidney_volume):
    interest = _expected_interest()
    assert 0 < len(interest) < 30  # the reference does not cover every slice of example_ct_sm
    assert get_settings().annotators_per_slice == 3
    first = _work_through(client, tokens.headers("annotator"), dataset["id"])
    assert sorted(k for _, k in first) == interest
    second = _work_through(client, tokens.headers("annotator2"), dataset["id"])
    assert sorted(k for _, k in second) == interest
    third = _work_through(client, _token("carol"), dataset["id"])
    assert sorted(k for _, k in third) == interest
    assert _next(client, _token("dave"), dataset["id"]).status_code == 204  # three annotators saw every slice
    cov = client.get(f"/api/v1/volumes/{kidney_volume['id']}/coverage", headers=tokens.headers("researcher")).json()
    assert {s["slice"]: s["seen_by"] for s in cov["slices"]} == dict.fromkeys(interest, 3)


def test_fewest_annotators_first(client, tokens, dataset, kidney_volume):
    interest = _expected_interest()
    a = tokens.headers("annotator")
    seen_by_a = interest[: len(interest) - 3]
    client.post(f"/api/v1/volumes/{kidney_volume['id']}/prompts", json={"seen": seen_by_a}, headers=a)
    b = tokens.headers("annotator2")
    order = _work_through(client, b, dataset["id"])
    unseen = [k for k in interest if k not in seen_by_a]
    assert [k for _, k in order[:3]] == unseen  # nobody's slices before once-seen ones
    assert sorted(k for _, k in order) == interest


def test_leases_spread_annotators_and_are_renewed(client, tokens, dataset, kidney_volume):
    a, b = tokens.headers("annotator"), tokens.headers("annotator2")
    first = _next(client, a, dataset["id"]).json()
    other = _next(client, b, dataset["id"]).json()
    assert other["slice"] != first["slice"]
    again = _next(client, a, dataset["id"]).json()  # a reload hands back the same leased slice
    assert again["slice"] == first["slice"] and again["lease_expires_at"] >= first["lease_expires_at"]
    # drawing on it releases the lease: the next task is a new slice
    client.post(f"/api/v1/volumes/{kidney_volume['id']}/prompts", json={
        "boxes": [{"slice": first["slice"], "label": "liver", "box": [1, 1, 9, 9]}]}, headers=a)
    assert not [x for x in leases.active(dataset["id"]) if x.annotator == "annotator"]
    following = _next(client, a, dataset["id"]).json()
    assert following["slice"] not in (first["slice"], other["slice"])


def test_concurrent_annotators_get_different_slices(client, tokens, dataset, kidney_volume):
    headers = [_token(f"crowd{i}") for i in range(8)]
    results: list[int] = []
    barrier = threading.Barrier(len(headers))

    def worker(h: dict[str, str]) -> None:
        barrier.wait()
        r = _next(client, h, dataset["id"])
        assert r.status_code == 200, r.text
        results.append(r.json()["slice"])

    threads = [threading.Thread(target=worker, args=(h,)) for h in headers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 8, results


def test_lease_capacity_and_expiry():
    assert leases.claim(1, 7, 3, "a", capacity=2, ttl_s=1) is not None
    assert leases.claim(1, 7, 3, "b", capacity=2, ttl_s=1) is not None
    assert leases.claim(1, 7, 3, "c", capacity=2, ttl_s=1) is None  # full
    assert leases.claim(1, 7, 3, "a", capacity=2, ttl_s=1) is not None  # renewal always works
    assert leases.claim(1, 7, 4, "c", capacity=2, ttl_s=1, max_busy=0) is not None
    assert leases.claim(1, 7, 4, "d", capacity=2, ttl_s=1, max_busy=0) is None  # busier than ranked
    assert {(x.slice, x.annotator) for x in leases.active(1)} == {(3, "a"), (3, "b"), (4, "c")}
    time.sleep(1.1)
    assert leases.active(1) == []
    assert leases.claim(1, 7, 3, "c", capacity=2, ttl_s=1) is not None


def test_without_reference_every_slice_is_offered(client, tokens):
    r = client.post("/api/v1/datasets", json={"name": "plain", "labels": {"liver": 1}, "annotators": ["annotator"]},
                    headers=tokens.headers("researcher"))
    ds = r.json()["id"]
    assert _next(client, tokens.headers("annotator"), ds).status_code == 204  # no volumes yet
    upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", case_id="plain")
    order = _work_through(client, tokens.headers("annotator"), ds)
    assert sorted(k for _, k in order) == list(range(30))
    assert _next(client, tokens.headers("annotator"), 999).status_code == 404
    assert client.get(f"/api/v1/tasks/next?dataset={ds}").status_code == 401


def test_reference_slices_across_volumes(client, tokens, dataset, kidney_volume):
    other = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                   case_id="second", reference_map=json.dumps(KIDNEY_MAP), reference_other="background")
    assert other.status_code == 201
    order = _work_through(client, tokens.headers("annotator"), dataset["id"])
    assert len(order) == 2 * len(_expected_interest())
    assert {v for v, _ in order} == {kidney_volume["id"], other.json()["id"]}


def test_a_tasks_only_dataset_takes_prompts_only_on_handed_out_slices(client, tokens):  # type: ignore[no-untyped-def]
    import uuid

    created = client.post("/api/v1/datasets", headers=tokens.headers("researcher"), json={
        "name": "strict", "labels": {"liver": 5, "spleen": 1}, "tasks_only": True, "annotators": ["annotator"]})
    assert created.status_code == 201 and created.json()["tasks_only"] is True
    ds = created.json()["id"]
    volume = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz").json()
    headers = tokens.headers("annotator")
    url = f"/api/v1/volumes/{volume['id']}/prompts"

    task = _next(client, headers, ds).json()
    k = task["slice"]
    other = (k + 1) % volume["n_slices"]
    refused = client.post(url, headers=headers, json={"seen": [other]})
    assert refused.status_code == 403 and f"[{other}]" in refused.json()["detail"]
    box = {"slice": k, "label": "liver", "box": [10, 10, 40, 40], "client_id": str(uuid.uuid4())}
    first = client.post(url, headers=headers, json={"boxes": [box]})
    assert first.status_code == 201, first.text
    # The lease went with the first answer; a retry of the same request (a lost response) still succeeds.
    retry = client.post(url, headers=headers, json={"boxes": [box]})
    assert retry.status_code == 201 and retry.json()["duplicates"] == first.json()["ids"]
    # Researchers are not bound to tasks.
    assert client.post(url, headers=tokens.headers("researcher"), json={"seen": [other]}).status_code == 201
