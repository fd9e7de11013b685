"""Task assignment: every slice (organ-free ones too), fewest annotators first, disputed slices get extra views,
gold at its rate, never twice, leases spread annotators, and nothing read from the reference."""

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


def _kidney_slices() -> list[int]:
    """Slices of example_ct_sm that hold the right kidney (the others are organ-free for that reference)."""
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
    assert 0 <= task["slice"] < 30
    assert task["labels"] == dataset["labels"] and set(task["colors"]) == set(dataset["labels"])
    assert all(c.startswith("#") and len(c) == 7 for c in task["colors"].values())
    assert task["slice_url"] == f"/api/v1/volumes/{kidney_volume['id']}/slices/{task['slice']}.png"
    assert task["display_size"] == [122, 101] and task["done"] == 0
    assert client.get(task["slice_url"], headers=tokens.headers("annotator")).status_code == 200
    lease_s = get_settings().task_lease_s
    from datetime import UTC, datetime
    remaining = (datetime.fromisoformat(task["lease_expires_at"]) - datetime.now(UTC)).total_seconds()
    assert lease_s - 5 < remaining <= lease_s


def test_every_slice_is_a_candidate_and_reaches_min_views(client, tokens, dataset, kidney_volume):
    """Organ-free slices of a volume with a reference are handed out like the others, each to min_views annotators."""
    kidney = _kidney_slices()
    assert 0 < len(kidney) < 30  # the reference leaves 11 of example_ct_sm's slices organ-free
    assert get_settings().task_min_views == 3 and dataset["tasks"]["min_views"] == 3
    first = _work_through(client, tokens.headers("annotator"), dataset["id"])
    assert [k for _, k in first] == list(range(30))  # organ-free slices included, in slice order
    second = _work_through(client, tokens.headers("annotator2"), dataset["id"])
    assert sorted(k for _, k in second) == list(range(30))
    third = _work_through(client, _token("carol"), dataset["id"])
    assert sorted(k for _, k in third) == list(range(30))
    # three annotators saw every slice and agreed ("nothing here" everywhere): nothing is left
    assert _next(client, _token("dave"), dataset["id"]).status_code == 204
    cov = client.get(f"/api/v1/volumes/{kidney_volume['id']}/coverage", headers=tokens.headers("researcher")).json()
    assert {s["slice"]: s["seen_by"] for s in cov["slices"]} == dict.fromkeys(range(30), 3)


def test_fewest_annotators_first(client, tokens, dataset, kidney_volume):
    a = tokens.headers("annotator")
    seen_by_a = list(range(27))
    client.post(f"/api/v1/volumes/{kidney_volume['id']}/prompts", json={"seen": seen_by_a}, headers=a)
    b = tokens.headers("annotator2")
    order = _work_through(client, b, dataset["id"])
    assert [k for _, k in order[:3]] == [27, 28, 29]  # nobody's slices before once-seen ones
    assert sorted(k for _, k in order) == list(range(30))


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


def test_slices_across_volumes(client, tokens, dataset, kidney_volume):
    other = upload(client, tokens, dataset["id"], CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                   case_id="second", reference_map=json.dumps(KIDNEY_MAP), reference_other="background")
    assert other.status_code == 201
    order = _work_through(client, tokens.headers("annotator"), dataset["id"])
    assert len(order) == 2 * 30
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


# --- disagreement, gold and the reference ---------------------------------------------------------------


def _dataset(client, tokens, name: str, **tasks: object) -> int:  # type: ignore[no-untyped-def]
    r = client.post("/api/v1/datasets", headers=tokens.headers("researcher"), json={
        "name": name, "labels": {"liver": 5, "spleen": 1, "kidney_right": 2}, "tasks": tasks,
        "annotators": ["annotator", "annotator2"]})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _answer(client, headers, volume_id: int, k: int, boxes: list[list[float]], label: str = "liver") -> None:  # type: ignore[no-untyped-def]
    """An annotator's answer on slice k: these boxes, or "nothing of these organs here" when there are none."""
    r = client.post(f"/api/v1/volumes/{volume_id}/prompts", headers=headers, json={
        "boxes": [{"slice": k, "label": label, "box": b} for b in boxes], "seen": [k]})
    assert r.status_code == 201, r.text


def test_task_policy_of_a_dataset(client, tokens):
    defaults = {"min_views": 3, "max_views": 5, "min_agreement": 0.7, "gold_rate": 0.0}
    plain = client.post("/api/v1/datasets", headers=tokens.headers("researcher"),
                        json={"name": "p", "labels": {"liver": 5}}).json()
    assert plain["tasks"] == defaults
    ds = _dataset(client, tokens, "own", min_views=2, max_views=4, gold_rate=0.1)
    url = f"/api/v1/datasets/{ds}"
    assert client.get(url, headers=tokens.headers("annotator")).json()["tasks"] == {
        "min_views": 2, "max_views": 4, "min_agreement": 0.7, "gold_rate": 0.1}
    r = client.patch(url, headers=tokens.headers("researcher"), json={"tasks": {"min_agreement": 0.8,
                                                                                 "gold_rate": None}})
    assert r.status_code == 200, r.text
    assert r.json()["tasks"] == {"min_views": 2, "max_views": 4, "min_agreement": 0.8, "gold_rate": 0.0}
    assert client.get(url, headers=tokens.headers("researcher")).json()["tasks"] == r.json()["tasks"]
    bad = client.patch(url, headers=tokens.headers("researcher"), json={"tasks": {"min_views": 6}})
    assert bad.status_code == 422 and "max_views" in bad.text  # 6 above the dataset's max_views 4
    assert client.patch(url, headers=tokens.headers("researcher"),
                        json={"tasks": {"min_views": 3, "max_views": 2}}).status_code == 422
    assert client.patch(url, headers=tokens.headers("researcher"),
                        json={"tasks": {"gold_rate": 1.5}}).status_code == 422
    assert client.patch(url, headers=tokens.headers("annotator"), json={"tasks": {}}).status_code == 403
    assert client.post("/api/v1/datasets", headers=tokens.headers("researcher"), json={
        "name": "q", "labels": {"liver": 5}, "tasks": {"min_views": 0}}).status_code == 422


def test_disputed_slices_get_extra_views_up_to_max_views(client, tokens):
    """min_views 2, max_views 4: after two annotators, only the slices they disagree on are served again."""
    ds = _dataset(client, tokens, "disputes", min_views=2, max_views=4)
    vid = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", case_id="plain").json()["id"]
    a, b, c, d, e = (_token(n) for n in ("ann-a", "ann-b", "ann-c", "ann-d", "ann-e"))
    liver = [20.0, 20.0, 60.0, 70.0]
    for k in range(30):
        boxes_a = boxes_b = []  # "nothing of these organs here"
        if k == 5:  # a sees the liver, b does not: split 1 of 2
            boxes_a = [liver]
        elif k in (7, 8):  # both draw nearly the same box: agreement
            boxes_a, boxes_b = [liver], [[21.0, 19.0, 61.0, 69.0]]
        elif k == 9:  # both draw a liver, far apart: IoU 0
            boxes_a, boxes_b = [liver], [[70.0, 10.0, 110.0, 50.0]]
        _answer(client, a, vid, k, boxes_a)
        _answer(client, b, vid, k, boxes_b)
    # c: the two disputed slices, most disputed first (IoU 0 on 9, an even split on 5), nothing else
    assert _next(client, c, ds).json()["slice"] == 9
    _answer(client, c, vid, 9, [[40.0, 60.0, 80.0, 100.0]])  # a third liver, elsewhere again
    assert _next(client, c, ds).json()["slice"] == 5
    _answer(client, c, vid, 5, [])  # 1 of 3 drew it: agreement 2/3, still below 0.7
    assert _next(client, c, ds).status_code == 204
    # d: 5 and 9 are still disputed
    assert _next(client, d, ds).json()["slice"] == 9  # IoU agreement ~0 < 2/3
    _answer(client, d, vid, 9, [liver])
    assert _next(client, d, ds).json()["slice"] == 5
    _answer(client, d, vid, 5, [])  # 1 of 4: agreement 3/4, settled
    assert _next(client, d, ds).status_code == 204
    # e: slice 9 has reached max_views (4) though still disputed; 5 is settled: nothing left
    assert _next(client, e, ds).status_code == 204
    cov = client.get(f"/api/v1/volumes/{vid}/coverage", headers=tokens.headers("researcher")).json()
    views = {s["slice"]: s["seen_by"] for s in cov["slices"]}
    assert views == {**dict.fromkeys(range(30), 2), 5: 4, 9: 4}


def test_a_disputed_slice_is_served_again_before_an_undisputed_one(client, tokens):
    """min_views 3: every slice needs a third annotator; the one two annotators disagree on comes first."""
    ds = _dataset(client, tokens, "first")
    vid = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", case_id="plain").json()["id"]
    a, b, c = (_token(n) for n in ("ann-a", "ann-b", "ann-c"))
    for k in range(30):
        _answer(client, a, vid, k, [[20.0, 20.0, 60.0, 70.0]] if k in (12, 20) else [])
        _answer(client, b, vid, k, [[20.0, 20.0, 60.0, 70.0]] if k == 20 else [])
    order = _work_through(client, c, ds)
    assert [k for _, k in order] == [12] + [k for k in range(30) if k != 12]


def test_agreement_follows_deleted_prompts_and_a_new_threshold(client, tokens):
    ds = _dataset(client, tokens, "changes", min_views=2, max_views=5)
    vid = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", case_id="plain").json()["id"]
    a, b, c, d, e = (_token(n) for n in ("ann-a", "ann-b", "ann-c", "ann-d", "ann-e"))
    for k in range(30):
        _answer(client, a, vid, k, [[20.0, 20.0, 60.0, 70.0]] if k in (3, 4) else [])
        _answer(client, b, vid, k, [])
    assert _next(client, c, ds).json()["slice"] == 3  # 3 and 4 split 1 of 2; c holds 3 now
    assert _next(client, d, ds).json()["slice"] == 4
    _answer(client, d, vid, 4, [])  # 1 of 3 drew on 4: agreement 2/3
    # a takes back the box on 3: nobody drew there, nothing to dispute
    mine = client.get(f"/api/v1/volumes/{vid}/prompts?slice=3", headers=a).json()["items"]
    assert client.delete(f"/api/v1/prompts/{mine[0]['id']}", headers=a).status_code == 204
    assert _next(client, e, ds).json()["slice"] == 4  # not 3, though a lease slot is free there
    # agreement 2/3 passes a lower threshold: no slice is disputed any more (4 would have a free slot left)
    r = client.patch(f"/api/v1/datasets/{ds}", headers=tokens.headers("researcher"),
                     json={"tasks": {"min_agreement": 0.6}})
    assert r.status_code == 200
    assert _next(client, _token("ann-f"), ds).status_code == 204


def _crowd_order(client, tokens, dataset_id: int, volume_id: int, names: list[str]) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """A scripted crowd taking turns (answers depend only on who and which slice); the (annotator, slice) served."""
    headers = {n: _token(n) for n in names}
    served: list[tuple[str, int]] = []
    done: set[str] = set()
    while len(done) < len(names):
        for i, name in enumerate(names):
            if name in done:
                continue
            r = _next(client, headers[name], dataset_id)
            if r.status_code == 204:
                done.add(name)
                continue
            k = r.json()["slice"]
            served.append((name, k))
            boxes = [[10.0 + 9 * i, 10.0, 50.0 + 9 * i, 60.0]] if (k + i) % 4 == 0 else []
            _answer(client, headers[name], volume_id, k, boxes)
    return served


def test_the_order_of_tasks_does_not_depend_on_the_reference(client, tokens):
    """gold_rate 0: the same crowd answering the same way is served the same slices in the same order, whether
    the volume has a kidney-only reference, a five-organ reference or none."""
    orders = []
    for case, reference in (("kidney", KIDNEY_MAP), ("abdomen", {"1": "spleen", "2": "kidney_right", "5": "liver"}),
                            ("none", None)):
        ds = _dataset(client, tokens, f"leak-{case}", min_views=2, max_views=3)
        if reference is None:
            r = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", case_id=case)
        else:
            r = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                       case_id=case, reference_map=json.dumps(reference), reference_other="background")
        assert r.status_code == 201, r.text
        assert (r.json()["has_reference"]) == (reference is not None)
        orders.append(_crowd_order(client, tokens, ds, r.json()["id"], [f"{case}-{i}" for i in range(4)]))
    plain = [[(name.split("-")[1], k) for name, k in order] for order in orders]
    assert plain[0] == plain[1] == plain[2]
    assert len(plain[0]) > 2 * 30  # every slice twice, plus extra views where the scripted crowd disagreed
    assert {k for _, k in plain[0]} == set(range(30))


def test_gold_slices_are_mixed_in_at_the_gold_rate_and_look_like_any_task(client, tokens):
    ds = _dataset(client, tokens, "gold", min_views=10, max_views=10, gold_rate=0.3)
    gold = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", CT_DIR / "example_seg.nii.gz",
                  case_id="gold", reference_map=json.dumps(KIDNEY_MAP), reference_other="background").json()
    work = upload(client, tokens, ds, CT_DIR / "example_ct_sm.nii.gz", case_id="work").json()
    assert gold["id"] < work["id"]  # ordinary tasks still go to the volume without a reference first
    served = []
    for n in range(6):
        headers = _token(f"g{n}")
        for _ in range(20):
            task = _next(client, headers, ds).json()
            served.append(task)
            _answer(client, headers, task["volume_id"], task["slice"], [])
    on_gold = [t for t in served if t["volume_id"] == gold["id"]]
    assert 0.2 < len(on_gold) / len(served) < 0.4  # 120 tasks at a rate of 0.3
    assert {tuple(sorted(t)) for t in served} == {tuple(sorted(served[0]))}  # one shape: gold is not revealed
    assert len({t["slice"] for t in on_gold}) > 10  # drawn at random over the gold volume, organ-free slices too
    assert {t["slice"] for t in on_gold} - set(_kidney_slices())
    # without gold, the volume with the reference is ordinary work, in volume order
    client.patch(f"/api/v1/datasets/{ds}", headers=tokens.headers("researcher"), json={"tasks": {"gold_rate": 0}})
    assert _next(client, _token("g-late"), ds).json()["volume_id"] == gold["id"]


def _ahead(client, headers, dataset_id, ahead=1):  # type: ignore[no-untyped-def]
    return client.get(f"/api/v1/tasks/next?dataset={dataset_id}&ahead={ahead}", headers=headers)


def _expiry(task: dict) -> float:
    from datetime import datetime
    return datetime.fromisoformat(task["lease_expires_at"]).timestamp()


def _pair(task: dict) -> tuple[tuple[int, int], tuple[int, int] | None]:
    nxt = task["next"]
    return (task["volume_id"], task["slice"]), (nxt["volume_id"], nxt["slice"]) if nxt else None


def test_ahead_leases_the_next_task_too(client, tokens, dataset, kidney_volume):
    """?ahead=1 hands the task and the one after it (both leased); a reload gives the same pair; once the task
    is answered the former ``next`` is the task and a new ``next`` comes; others are steered away from both."""
    a, ds, vid = tokens.headers("annotator"), dataset["id"], kidney_volume["id"]
    first = _ahead(client, a, ds)
    assert first.status_code == 200, first.text
    task = first.json()
    (tv, tk), nxt = _pair(task)
    assert nxt is not None and nxt != (tv, tk) and (tk, nxt[1]) == (0, 1)  # the order the next calls would take
    assert task["done"] == 0 and task["next"]["done"] == 1 and "next" not in task["next"]
    assert task["next"]["slice_url"] == f"/api/v1/volumes/{vid}/slices/{nxt[1]}.png"
    mine = {(x.volume_id, x.slice) for x in leases.active(ds) if x.annotator == "annotator"}
    assert mine == {(tv, tk), nxt}
    # A reload (any number of them) gives the same pair in the same order, both leases renewed.
    for _ in range(3):
        again = _ahead(client, a, ds).json()
        assert _pair(again) == ((tv, tk), nxt)
        assert _expiry(again) >= _expiry(task) and _expiry(again["next"]) > _expiry(again)
    # ahead=0 from the same annotator hands the task (not the look-ahead slice), without `next`.
    plain = _next(client, a, ds).json()
    assert (plain["volume_id"], plain["slice"]) == (tv, tk) and "next" not in plain
    # Another annotator is steered away from both.
    other = _ahead(client, tokens.headers("annotator2"), ds).json()
    theirs = _pair(other)
    assert not {theirs[0], theirs[1]} & {(tv, tk), nxt} and theirs[0] != theirs[1]
    # Answering the task: the former `next` becomes the task (lease renewed), a new `next` is leased.
    assert client.post(f"/api/v1/volumes/{tv}/prompts", json={"seen": [tk]}, headers=a).status_code == 201
    after = _ahead(client, a, ds).json()
    (av, ak), new_next = _pair(after)
    assert (av, ak) == nxt and after["done"] == 1 and new_next is not None
    assert new_next not in ((tv, tk), nxt, theirs[0], theirs[1])
    assert _expiry(after) > _expiry(task["next"])  # the former `next` was renewed as it became the task
    assert _pair(_ahead(client, a, ds).json()) == (nxt, new_next)


def test_ahead_walks_every_slice_once_and_ends_with_no_next(client, tokens, dataset, kidney_volume):
    """Working through a volume with ?ahead=1 hands every slice once, in the order ahead=0 would, and the last
    task's ``next`` is null."""
    a, ds, vid = _token("ahead-walker"), dataset["id"], kidney_volume["id"]
    handed: list[int] = []
    previous_next = None
    while True:
        r = _ahead(client, a, ds)
        if r.status_code == 204:
            break
        task = r.json()
        assert task["done"] == len(handed)
        if previous_next is not None:
            assert task["slice"] == previous_next
        handed.append(task["slice"])
        previous_next = task["next"]["slice"] if task["next"] else None
        if len(handed) < 30:
            assert previous_next is not None
        assert client.post(f"/api/v1/volumes/{vid}/prompts", json={"seen": [task["slice"]]},
                           headers=a).status_code == 201
    assert handed == list(range(30)) and previous_next is None


def test_ahead_is_validated(client, tokens, dataset, kidney_volume):
    a, ds = tokens.headers("annotator"), dataset["id"]
    for bad in ("2", "-1", "x"):
        r = client.get(f"/api/v1/tasks/next?dataset={ds}&ahead={bad}", headers=a)
        assert r.status_code == 422, (bad, r.text)
        assert "ahead" in r.text
    assert not [x for x in leases.active(ds) if x.annotator == "annotator"]  # nothing leased by a refused call
    zero = _ahead(client, a, ds, ahead=0)
    assert zero.status_code == 200 and "next" not in zero.json()


def test_annotator_may_fetch_the_embedding_of_next(client, tokens, dataset, kidney_volume):
    a, ds, vid = tokens.headers("annotator"), dataset["id"], kidney_volume["id"]
    task = _ahead(client, a, ds).json()
    nk = task["next"]["slice"]
    url = f"/api/v1/volumes/{vid}/slices/{nk}/embedding?model=litemedsam"
    assert client.get(url, headers=tokens.headers("annotator2")).status_code == 403  # not theirs
    fetched = client.get(url, headers=a)
    assert fetched.status_code in (200, 202), fetched.text
    assert client.get(task["next"]["slice_url"], headers=a).status_code == 200
