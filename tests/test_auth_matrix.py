"""Every route × every kind of caller: 401 without a valid token, 403 for a role not allowed,
404 for a dataset (or anything in it) the caller is not a member of.

HOW TO ADD A ROUTE (every helper who adds an endpoint does this):
  add ONE row to ``EXPECTED`` below — ``("METHOD", "/api/v1/path/{param}"): ANYONE | STAFF | ADMIN``
  (the path exactly as FastAPI declares it, placeholders included). Routes outside ``/api/v1``
  (health, docs, browser pages, static files) go to ``PUBLIC`` instead and must work without a token.
  The matrix fails for any app route without a row, and for any row whose route no longer exists.

Callers: no token, a malformed/unknown token, a revoked token, a wrong auth scheme → 401;
admin / researcher / annotator → 403 when the row does not allow the role, otherwise anything but
401/403 (ids in the path point at nothing, so allowed roles typically get 404 or 422). Never 5xx.
Annotators never get reference labels, masks, exports or tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

ADMIN = frozenset({"admin"})
STAFF = frozenset({"admin", "researcher"})
ANYONE = frozenset({"admin", "researcher", "annotator"})

EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    # auth
    ("GET", "/api/v1/me"): ANYONE,
    ("POST", "/api/v1/tokens"): ADMIN,
    ("GET", "/api/v1/tokens"): ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): ADMIN,
    # datasets
    ("POST", "/api/v1/datasets"): STAFF,
    ("GET", "/api/v1/datasets"): ANYONE,
    ("GET", "/api/v1/datasets/{dataset_id}"): ANYONE,
    ("PATCH", "/api/v1/datasets/{dataset_id}"): STAFF,
    ("GET", "/api/v1/datasets/{dataset_id}/members"): STAFF,
    ("PUT", "/api/v1/datasets/{dataset_id}/members/{name}"): STAFF,
    ("DELETE", "/api/v1/datasets/{dataset_id}/members/{name}"): STAFF,
    ("GET", "/api/v1/datasets/{dataset_id}/annotators"): STAFF,
    # volumes
    ("POST", "/api/v1/datasets/{dataset_id}/volumes"): STAFF,
    ("GET", "/api/v1/datasets/{dataset_id}/volumes"): ANYONE,
    ("GET", "/api/v1/volumes/{volume_id}"): ANYONE,
    ("DELETE", "/api/v1/volumes/{volume_id}"): STAFF,
    ("GET", "/api/v1/volumes/{volume_id}/slices/{k}.png"): ANYONE,
    ("GET", "/api/v1/volumes/{volume_id}/slices/{k}/embedding"): ANYONE,  # annotators: their slices only
    ("GET", "/api/v1/models/{model}/decoders/{decoder_id}.onnx"): ANYONE,  # the browser's SAM decoder
    ("GET", "/api/v1/volumes/{volume_id}/image"): STAFF,
    ("GET", "/api/v1/volumes/{volume_id}/reference"): STAFF,
    # prompts and tasks
    ("POST", "/api/v1/volumes/{volume_id}/prompts"): ANYONE,
    ("GET", "/api/v1/volumes/{volume_id}/prompts"): ANYONE,
    ("DELETE", "/api/v1/prompts/{prompt_id}"): ANYONE,
    ("GET", "/api/v1/volumes/{volume_id}/coverage"): ANYONE,
    ("POST", "/api/v1/datasets/{dataset_id}/prompts/yolo"): STAFF,
    ("GET", "/api/v1/volumes/{volume_id}/prompts.yolo"): STAFF,
    ("POST", "/api/v1/datasets/{dataset_id}/prompts/coco"): STAFF,
    ("GET", "/api/v1/volumes/{volume_id}/prompts.coco.json"): STAFF,
    ("POST", "/api/v1/volumes/{volume_id}/prompts/simulate"): STAFF,
    ("GET", "/api/v1/tasks/next"): ANYONE,
    # segmentations
    ("GET", "/api/v1/models"): ANYONE,
    ("POST", "/api/v1/volumes/{volume_id}/segmentations"): STAFF,
    ("POST", "/api/v1/datasets/{dataset_id}/segmentations"): STAFF,
    ("GET", "/api/v1/segmentations/{segmentation_id}"): STAFF,
    ("GET", "/api/v1/volumes/{volume_id}/segmentations"): STAFF,
    ("POST", "/api/v1/segmentations/{segmentation_id}/cancel"): STAFF,
    ("DELETE", "/api/v1/segmentations/{segmentation_id}"): STAFF,
    ("GET", "/api/v1/segmentations/{segmentation_id}/mask"): STAFF,
    ("GET", "/api/v1/segmentations/{segmentation_id}/slices/{k}.png"): STAFF,
    ("GET", "/api/v1/segmentations/{segmentation_id}/figure.png"): STAFF,
    # exports
    ("POST", "/api/v1/datasets/{dataset_id}/exports"): STAFF,
    ("GET", "/api/v1/exports/{export_id}"): STAFF,
    ("POST", "/api/v1/exports/{export_id}/cancel"): STAFF,
    ("DELETE", "/api/v1/exports/{export_id}"): STAFF,
    ("GET", "/api/v1/exports/{export_id}/archive"): STAFF,
    # evaluations
    ("POST", "/api/v1/datasets/{dataset_id}/evaluations"): STAFF,
    ("GET", "/api/v1/evaluations/{evaluation_id}"): STAFF,
    ("POST", "/api/v1/evaluations/{evaluation_id}/cancel"): STAFF,
    ("DELETE", "/api/v1/evaluations/{evaluation_id}"): STAFF,
    ("GET", "/api/v1/evaluations/{evaluation_id}/summary.json"): STAFF,
    ("GET", "/api/v1/evaluations/{evaluation_id}/report"): STAFF,
    ("POST", "/api/v1/evaluations/compare"): STAFF,
    # trainings
    ("POST", "/api/v1/datasets/{dataset_id}/trainings"): STAFF,
    ("GET", "/api/v1/datasets/{dataset_id}/trainings"): STAFF,
    ("GET", "/api/v1/trainings/{training_id}"): STAFF,
    ("POST", "/api/v1/trainings/{training_id}/cancel"): STAFF,
    ("DELETE", "/api/v1/trainings/{training_id}"): STAFF,
    ("GET", "/api/v1/trainings/{training_id}/checkpoint"): STAFF,
    ("GET", "/api/v1/trainings/{training_id}/predictions"): STAFF,
}

# Routes outside /api/v1 that must answer without a token.
PUBLIC: set[tuple[str, str]] = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/annotate"),
    ("GET", "/review/{volume_id}"),
    ("GET", "/static/palette.js"),
    ("GET", "/static/{path:path}"),
}

# Routes outside /api/v1 that need a token all the same (operations: the Prometheus scrape).
OPERATIONS: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/metrics"): STAFF,
}

# What never reaches an annotator (issue 2): reference labels, masks, exports, tokens.
ANNOTATOR_FORBIDDEN = re.compile(r"/reference|/mask|/segmentations|export|/tokens|archive|/image$")

API_PREFIX = "/api/v1"
PLACEHOLDER = re.compile(r"\{([^}:]+)(?::[^}]+)?\}")
PARAM_VALUES = {"k": "0", "path": "no-such-file.js"}  # everything else: an id that does not exist
MISSING_ID = "987654"
REJECTED = ("none", "unknown", "revoked", "basic")
ROLES = ("admin", "researcher", "annotator")


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of a fresh app, walking included routers on any FastAPI version."""
    from app.main import create_app

    found: set[tuple[str, str]] = set()

    def visit(route: Any) -> None:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):  # FastAPI >= 0.16x wraps included routers
            for context in contexts():
                methods = getattr(context.original_route, "methods", None) or set()
                found.update((m, context.path) for m in methods if m != "HEAD")
            return
        for m in getattr(route, "methods", None) or set():
            if m != "HEAD":
                found.add((m, route.path))

    for route in create_app().routes:
        visit(route)
    return found


ROUTES = app_routes()
API_ROUTES = sorted(r for r in ROUTES if r[1].startswith(API_PREFIX + "/"))


def concrete(path: str) -> str:
    return PLACEHOLDER.sub(lambda m: PARAM_VALUES.get(m.group(1), MISSING_ID), path)


def call(client, method: str, path: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    kwargs: dict[str, Any] = {"headers": headers}
    if method in ("POST", "PUT", "PATCH"):
        kwargs["json"] = {}
    return client.request(method, concrete(path), **kwargs)


@pytest.fixture
def callers(tokens) -> Iterator[dict[str, dict[str, str]]]:  # type: ignore[no-untyped-def]
    from app.auth.models import Role
    from app.auth.service import create_token, revoke_token
    from app.core.db import session_scope

    with session_scope() as session:
        row, revoked = create_token(session, "revoked-user", Role.admin)
        revoke_token(session, row.id)
        session.commit()
    yield {
        "none": {},
        "unknown": {"Authorization": "Bearer csam_this-token-does-not-exist"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "basic": {"Authorization": f"Basic {tokens.admin}"},
        **{role: tokens.headers(role) for role in ROLES},
    }


# --- the table itself ---------------------------------------------------------------------------
def test_every_route_has_a_row():
    missing = sorted(r for r in ROUTES if r not in EXPECTED and r not in PUBLIC and r not in OPERATIONS)
    assert not missing, f"add these routes to EXPECTED (or PUBLIC) in {__file__}: {missing}"


def test_no_stale_rows():
    stale = sorted(r for r in [*EXPECTED, *PUBLIC, *OPERATIONS] if r not in ROUTES)
    assert not stale, f"rows for routes the app does not have: {stale}"


def test_public_routes_are_outside_the_api_and_api_rows_inside():
    assert all(not path.startswith(API_PREFIX) for _, path in PUBLIC)
    assert all(path.startswith(API_PREFIX + "/") for _, path in EXPECTED)
    assert len(API_ROUTES) >= 20


def test_annotators_never_get_labels_masks_exports_or_tokens():
    leaks = sorted(r for r, roles in EXPECTED.items() if ANNOTATOR_FORBIDDEN.search(r[1]) and "annotator" in roles)
    assert not leaks, f"annotators must not reach {leaks}"


# --- the matrix -------------------------------------------------------------------------------
@pytest.mark.parametrize("route", API_ROUTES + sorted(OPERATIONS), ids=lambda r: f"{r[0]} {r[1]}")
def test_route_matrix(client, callers, route):
    assert route in EXPECTED or route in OPERATIONS, f"{route} has no row in EXPECTED ({__file__})"
    method, path = route
    allowed = EXPECTED[route] if route in EXPECTED else OPERATIONS[route]
    problems = []
    for caller, headers in callers.items():
        response = call(client, method, path, headers)
        status = response.status_code
        if status >= 500:
            problems.append(f"{caller}: {status} {response.text[:200]}")
        elif caller in REJECTED:
            if status != 401 or response.headers.get("www-authenticate") != "Bearer":
                problems.append(f"{caller}: expected 401 with WWW-Authenticate, got {status}")
        elif caller in allowed:
            if status in (401, 403):
                problems.append(f"{caller}: allowed but got {status} {response.text[:200]}")
        elif status != 403:
            problems.append(f"{caller}: expected 403, got {status}")
        elif "role" not in response.json()["detail"]:
            problems.append(f"{caller}: 403 without a detail naming the role: {response.text}")
    assert not problems, f"{method} {path}: " + "; ".join(problems)


@pytest.mark.parametrize("route", sorted(PUBLIC), ids=lambda r: f"{r[0]} {r[1]}")
def test_public_routes_need_no_token(client, route):
    method, path = route
    response = call(client, method, path, {})
    assert response.status_code not in (401, 403), response.text
    assert response.status_code < 500, response.text


def test_health_and_docs_answer_200_without_token(client):
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# --- member / non-member ------------------------------------------------------------------------
SCOPED = re.compile(
    r"\{(dataset_id|volume_id|segmentation_id|export_id|evaluation_id|training_id|prompt_id)\}|/tasks/next$")


@pytest.fixture
def real_ids(client, tokens, sm_volume) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A real resource of every kind, all in the ``dataset`` fixture's dataset."""
    from app.core.db import session_scope
    from app.evaluations.models import Evaluation
    from app.exports.models import Export
    from app.trainings.models import Training
    from tests.helpers_exporteval import add_finished_segmentation

    vid = sm_volume["id"]
    posted = client.post(f"/api/v1/volumes/{vid}/prompts", headers=tokens.headers("annotator"),
                         json={"boxes": [{"slice": 3, "label": "liver", "box": [10, 10, 50, 50]}]})
    assert posted.status_code == 201, posted.text
    sid, _, _ = add_finished_segmentation(vid)
    with session_scope() as session:
        export = Export(dataset_id=sm_volume["dataset_id"], format="nnunet-v2", params={}, created_by="researcher")
        evaluation = Evaluation(dataset_id=sm_volume["dataset_id"], params={}, created_by="researcher")
        session.add_all([export, evaluation])
        session.flush()
        training = Training(dataset_id=sm_volume["dataset_id"], export_id=export.id, params={},
                            created_by="researcher")
        session.add(training)
        session.commit()
        ids = {"export_id": export.id, "evaluation_id": evaluation.id, "training_id": training.id}
    return {"dataset_id": str(sm_volume["dataset_id"]), "volume_id": str(vid), "segmentation_id": str(sid),
            "prompt_id": str(posted.json()["ids"][0]), **{k: str(v) for k, v in ids.items()},
            "k": "3", "name": "annotator"}


@pytest.mark.parametrize("role", ["researcher", "annotator"])
def test_non_members_find_nothing_of_a_dataset(client, tokens, real_ids, role):  # type: ignore[no-untyped-def]
    """Every route that names a dataset or anything in it answers 404 to a token that is not a member
    (the same answer as for an id that does not exist), and never changes anything."""
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope

    with session_scope() as session:
        _, secret = create_token(session, f"outsider-{role}", Role(role))
        session.commit()
    outsider = {"Authorization": f"Bearer {secret}"}
    scoped = [r for r in API_ROUTES if SCOPED.search(r[1])]
    assert len(scoped) >= 30
    problems = []
    for method, path in scoped:
        url = PLACEHOLDER.sub(lambda m: real_ids[m.group(1)], path)
        if path.endswith("/tasks/next"):
            url += f"?dataset={real_ids['dataset_id']}"
        response = client.request(method, url, headers=outsider, **({"json": {}} if method in ("POST", "PUT") else {}))
        if response.status_code != 404 or not response.json()["detail"].endswith("not found"):
            problems.append(f"{method} {path}: {response.status_code} {response.text[:120]}")
    assert not problems, problems
    # Nothing changed: the member still sees their dataset, prompt and volume as before.
    member = tokens.headers("annotator")
    assert client.get(f"/api/v1/volumes/{real_ids['volume_id']}", headers=member).status_code == 200
    prompts = client.get(f"/api/v1/volumes/{real_ids['volume_id']}/prompts", headers=member).json()
    assert prompts["total"] == 1
    listed = client.get("/api/v1/datasets", headers=outsider)
    assert listed.status_code == 200 and listed.json() == []


def test_members_are_managed_by_owners_and_take_effect(client, tokens, real_ids):  # type: ignore[no-untyped-def]
    from app.auth.models import Role
    from app.auth.service import create_token
    from app.core.db import session_scope

    with session_scope() as session:
        _, newcomer = create_token(session, "newcomer", Role.annotator)
        _, colleague = create_token(session, "colleague", Role.researcher)
        session.commit()
    dataset = f"/api/v1/datasets/{real_ids['dataset_id']}"
    owner = tokens.headers("researcher")
    listed = client.get(f"{dataset}/members", headers=owner).json()
    assert {(m["name"], m["role"]) for m in listed} == {
        ("researcher", "owner"), ("annotator", "annotator"), ("annotator2", "annotator")}
    headers = {"Authorization": f"Bearer {newcomer}"}
    assert client.get(dataset, headers=headers).status_code == 404
    added = client.put(f"{dataset}/members/newcomer", headers=owner)
    assert added.status_code == 200 and added.json()["role"] == "annotator"
    assert client.put(f"{dataset}/members/newcomer", headers=owner).status_code == 200  # idempotent
    assert client.get(dataset, headers=headers).status_code == 200
    assert client.delete(f"{dataset}/members/newcomer", headers=owner).status_code == 204
    assert client.get(dataset, headers=headers).status_code == 404  # at once in this process
    # A researcher who is not an owner cannot manage it; an owner cannot leave it without an owner.
    assert client.put(f"{dataset}/members/colleague", headers={"Authorization": f"Bearer {colleague}"}
                      ).status_code == 404
    last = client.delete(f"{dataset}/members/researcher", headers=owner)
    assert last.status_code == 409 and "last owner" in last.json()["detail"]
    assert client.put(f"{dataset}/members/no-such-token", headers=owner).status_code == 422
    assert client.put(f"{dataset}/members/admin", headers=owner).status_code == 422  # admins need no row
    assert client.put(f"{dataset}/members/annotator", headers=tokens.headers("annotator")).status_code == 403


# --- with real resources --------------------------------------------------------------------------
def test_annotator_cannot_read_reference_or_image_of_a_real_volume(client, tokens, sm_volume):
    vid = sm_volume["id"]
    for path in (f"/api/v1/volumes/{vid}/reference", f"/api/v1/volumes/{vid}/image"):
        assert client.get(path, headers=tokens.headers("annotator")).status_code == 403, path
        assert client.get(path, headers=tokens.headers("researcher")).status_code == 200, path
    assert client.get(f"/api/v1/volumes/{vid}", headers=tokens.headers("annotator")).status_code == 200
    assert client.get(f"/api/v1/volumes/{vid}/slices/0.png", headers=tokens.headers("annotator")).status_code == 200
    assert client.delete(f"/api/v1/volumes/{vid}", headers=tokens.headers("annotator")).status_code == 403


def test_token_lifecycle(client, tokens):
    created = client.post("/api/v1/tokens", json={"name": "new-annotator", "role": "annotator"},
                          headers=tokens.headers("admin"))
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body["token"]
    assert secret.startswith("csam_") and body["prefix"] == secret[:10]
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.json() == {"id": body["id"], "name": "new-annotator", "role": "annotator"}

    listed = client.get("/api/v1/tokens", headers=tokens.headers("admin")).json()
    assert "new-annotator" in {t["name"] for t in listed}
    assert all("token" not in t and "token_hash" not in t for t in listed)

    duplicate = client.post("/api/v1/tokens", json={"name": "new-annotator", "role": "admin"},
                            headers=tokens.headers("admin"))
    assert duplicate.status_code == 409
    bad_role = client.post("/api/v1/tokens", json={"name": "x", "role": "root"}, headers=tokens.headers("admin"))
    assert bad_role.status_code == 422

    revoked = client.delete(f"/api/v1/tokens/{body['id']}", headers=tokens.headers("admin"))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert client.delete("/api/v1/tokens/999999", headers=tokens.headers("admin")).status_code == 404


def test_tokens_are_stored_hashed(tokens):
    from sqlalchemy import select

    from app.auth.models import ApiToken
    from app.auth.security import hash_token
    from app.core.db import session_scope

    with session_scope() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "annotator"))
        assert row is not None
        assert row.token_hash == hash_token(tokens.annotator)
        assert tokens.annotator not in (row.token_hash, row.prefix)
