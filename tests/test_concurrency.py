"""50 concurrent clients against a real uvicorn server: 2,000 boxes with retries → exactly 2,000 rows."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict

import httpx
from sqlalchemy import func, select

from app.auth.models import Role
from app.auth.service import create_token
from app.core.db import session_scope
from app.datasets.access import add_member
from app.datasets.models import Dataset
from app.prompts.models import Prompt

N_CLIENTS = 50
N_BOXES = 2000
BATCH = 10
N_ANNOTATORS = 5


def test_concurrent_clients_with_retries_store_each_box_once(live_server, client, tokens, sm_volume):
    headers = []
    with session_scope() as session:
        dataset = session.get(Dataset, sm_volume["dataset_id"])
        assert dataset is not None
        for i in range(N_ANNOTATORS):
            row, secret = create_token(session, f"crowd{i}", Role.annotator)
            add_member(session, dataset, row)
            headers.append({"Authorization": f"Bearer {secret}"})
        session.commit()
    rng = random.Random(0)
    batches = []
    for b in range(N_BOXES // BATCH):
        boxes = []
        for _ in range(BATCH):
            x0, y0 = rng.uniform(0, 100), rng.uniform(0, 80)
            boxes.append({"slice": rng.randrange(30), "label": rng.choice(["liver", "spleen", "aorta"]),
                          "box": [x0, y0, x0 + rng.uniform(1, 20), y0 + rng.uniform(1, 20)],
                          "client_id": str(uuid.uuid4())})
        batches.append((b % N_ANNOTATORS, {"boxes": boxes}))
    per_client = len(batches) // N_CLIENTS
    # every batch: posted by its client, retried by it, and posted at the same time by the next client
    plans = []
    for c in range(N_CLIENTS):
        own = list(range(c * per_client, (c + 1) * per_client))
        neighbour = [(b + per_client) % len(batches) for b in own]
        plan = own + own + neighbour
        random.Random(c).shuffle(plan)
        plans.append(plan)

    responses: dict[int, list[dict]] = defaultdict(list)
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(N_CLIENTS)
    url = f"{live_server}/api/v1/volumes/{sm_volume['id']}/prompts"

    def run(plan: list[int]) -> None:
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            for b in plan:
                annotator, body = batches[b]
                for attempt in range(6):
                    try:
                        r = http.post(url, json=body, headers=headers[annotator])
                    except httpx.TransportError:
                        time.sleep(0.05 * 2**attempt)
                        continue
                    with lock:
                        statuses.append(r.status_code)
                        if r.status_code == 201:
                            responses[b].append(r.json())
                    if r.status_code == 201:
                        break
                    time.sleep(0.05 * 2**attempt)

    threads = [threading.Thread(target=run, args=(plan,)) for plan in plans]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started

    assert not [s for s in statuses if s >= 500], "a 5xx is a bug"
    assert set(statuses) == {201}
    assert len(responses) == len(batches)
    all_ids: set[int] = set()
    for outs in responses.values():
        assert len(outs) == 3
        assert all(o["ids"] == outs[0]["ids"] for o in outs)  # every retry gets the same answer
        fresh = [o for o in outs if not o["duplicates"]]
        assert len(fresh) == 1, "exactly one post of a batch stores it; the others see it whole"
        assert all(sorted(o["duplicates"]) == sorted(o["ids"]) for o in outs if o is not fresh[0])
        all_ids.update(outs[0]["ids"])
    assert len(all_ids) == N_BOXES
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Prompt)) == N_BOXES
        assert session.scalar(select(func.count(func.distinct(Prompt.client_id)))) == N_BOXES
    print(f"{len(statuses)} requests from {N_CLIENTS} clients in {elapsed:.1f}s")
