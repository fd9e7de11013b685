"""When Redis (the job queue) is unreachable, job requests answer 503 and nothing is recorded."""

from __future__ import annotations

import socket

import pytest
from redis import Redis

from app.core import redis as redis_module
from app.jobs import submit


@pytest.fixture
def dead_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the queue at a real TCP port on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    monkeypatch.setattr(redis_module, "get_redis", lambda: dead)
    monkeypatch.setattr(submit, "get_redis", lambda: dead)


def test_segmentation_request_with_the_queue_down_is_503_and_leaves_no_row(client, tokens, sm_volume, dead_queue):
    staff = tokens.headers("researcher")
    posted = client.post(
        f"/api/v1/volumes/{sm_volume['id']}/prompts",
        json={"boxes": [{"slice": 15, "label": "liver", "box": [10, 10, 60, 60]}]},
        headers=staff,
    )
    assert posted.status_code == 201, posted.text
    response = client.post(
        f"/api/v1/volumes/{sm_volume['id']}/segmentations", json={"model": "litemedsam"}, headers=staff
    )
    assert response.status_code == 503
    assert "queue is unavailable" in response.json()["detail"]
    listed = client.get(f"/api/v1/volumes/{sm_volume['id']}/segmentations", headers=staff)
    assert listed.status_code == 200 and listed.json() == []


def test_export_request_with_the_queue_down_is_503(client, tokens, sm_volume, dead_queue):
    response = client.post(
        f"/api/v1/datasets/{sm_volume['dataset_id']}/exports",
        json={"format": "nnunet-v2", "dataset_number": 501, "label_source": "reference", "unprompted": "background"},
        headers=tokens.headers("researcher"),
    )
    assert response.status_code == 503, response.text
    assert "queue is unavailable" in response.json()["detail"]
