def test_healthz_needs_no_token(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_database_redis_and_admission(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("status", "database", "redis")} == {"status": "ok", "database": "ok", "redis": "ok"}
    assert body["admission"]["status"] == "ok"
    assert {"limit", "in_flight", "queued", "shed", "heavy", "thread_tokens"} <= set(body["admission"])


def test_volume_upload_and_slice(client, tokens, sm_volume):
    assert sm_volume["shape"] == [122, 101, 30]
    assert sm_volume["orientation"] == "RAS"
    assert sm_volume["n_slices"] == 30
    r = client.get(f"/api/v1/volumes/{sm_volume['id']}/slices/15.png", headers=tokens.headers("annotator"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
