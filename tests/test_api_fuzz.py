"""Generated-request fuzzing of the whole API with schemathesis, against the app's own OpenAPI, in-process.

Every operation of ``/openapi.json`` gets positive (schema-conforming) and negative (schema-violating)
requests, each sent with a valid token of a role drawn per request (admin, researcher, annotator).
Every response must pass:

- ``not_a_server_error``: never a 5xx;
- ``status_code_conformance``: the status code is documented on the route;
- ``content_type_conformance``: the media type is the documented one;
- ``response_schema_conformance``: the body matches the documented schema for that status.

Real data is there to hit: a dataset, the small example CT with its reference (``sm_volume``), a
prompt, a queued segmentation and a spare token. Path ids are generated freely, and half the time are pinned to the
ids that exist. Operations that delete run last (volumes very last) so the data stays until then;
tokens the fuzzer revokes are replaced before the next request.

Deterministic: ``derandomize=True`` (the seed comes from each test function), no example database.
All failures are collected and reported together, deduplicated per operation and check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_auth_matrix import EXPECTED, PUBLIC

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
ROLES = ("admin", "researcher", "annotator")
EXAMPLES_PER_OPERATION = 60  # x 40 operations: ~2,200 requests
MIN_REQUESTS = 1000
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Fuzz:
    """State shared by every generated request: who calls, what exists, what failed."""

    headers: dict[str, dict[str, str]]
    token_ids: dict[str, int]
    requests: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def new_token(self, role: str) -> None:
        from app.auth.models import Role
        from app.auth.service import create_token
        from app.core.db import session_scope

        with session_scope() as session:
            row, secret = create_token(session, f"fuzz-{role}", Role(role))
            session.commit()
            self.token_ids[role] = row.id
        self.headers[role] = {"Authorization": f"Bearer {secret}"}

    def send(self, case: Any, role: str) -> None:
        self.requests += 1
        try:
            response = case.call(headers=self.headers[role])
        except Exception as exc:  # an exception escaping the app is a server error too
            self.failures.setdefault((case.operation.label, type(exc).__name__), f"{exc!r}\n{case.as_curl_command()}")
            return
        self.statuses[(case.operation.label, response.status_code)] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=self.headers[role])
        except (Exception, FailureGroup) as exc:
            for failure in getattr(exc, "exceptions", [exc]):
                title = getattr(failure, "title", type(failure).__name__)
                key = (case.operation.label, f"{title} ({response.status_code})")
                self.failures.setdefault(
                    key,
                    f"{failure}\n-> {response.status_code} {response.text[:300]!r}\n"
                    f"{case.as_curl_command(headers=self.headers[role])}",
                )
        if case.method.upper() == "DELETE" and case.path == "/api/v1/tokens/{token_id}" and response.status_code == 200:
            revoked = response.json()["id"]
            for name, token_id in list(self.token_ids.items()):
                if token_id == revoked:
                    self.new_token(name)


def _order(label: str) -> tuple[int, str]:
    """Deleting operations last, the volume deletion very last: the data stays for everything else."""
    if label.startswith("DELETE /api/v1/volumes/"):
        return (2, label)
    return (1 if label.startswith("DELETE ") else 0, label)


@pytest.fixture
def existing(client, tokens, sm_volume) -> Iterator[dict[str, int]]:  # type: ignore[no-untyped-def]
    """Ids that exist: dataset, volume (with a reference), a prompt, a queued segmentation, a spare token."""
    researcher = tokens.headers("researcher")
    vid = sm_volume["id"]
    prompt = client.post(f"/api/v1/volumes/{vid}/prompts", headers=tokens.headers("annotator"),
                         json={"boxes": [{"slice": 10, "label": "liver", "box": [5, 6, 50, 60]}]})
    assert prompt.status_code == 201, prompt.text
    segmentation = client.post(f"/api/v1/volumes/{vid}/segmentations", json={}, headers=researcher)
    assert segmentation.status_code == 202, segmentation.text
    spare = client.post("/api/v1/tokens", json={"name": "spare", "role": "annotator"}, headers=tokens.headers("admin"))
    assert spare.status_code == 201, spare.text
    yield {
        "dataset_id": sm_volume["dataset_id"],
        "volume_id": vid,
        "prompt_id": prompt.json()["ids"][0],
        "segmentation_id": segmentation.json()["id"],
        "token_id": spare.json()["id"],
    }


@pytest.mark.timeout(600)
def test_api_fuzz(client, tokens, existing) -> None:  # type: ignore[no-untyped-def]
    from schemathesis.python import asgi

    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    fuzz = Fuzz(headers={}, token_ids={})
    for role in ROLES:
        fuzz.new_token(role)

    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda op: _order(op.label))
    # Every API route and method (the auth matrix lists them all), and the documented public ones.
    fuzzed = {(op.method.upper(), op.path) for op in operations}
    assert fuzzed == set(EXPECTED) | {("GET", "/healthz"), ("GET", "/readyz")}, fuzzed ^ set(EXPECTED)
    assert {("GET", "/healthz"), ("GET", "/readyz")} <= PUBLIC

    try:
        for operation in operations:
            pinned = {p.name: existing[p.name] for p in operation.path_parameters if p.name in existing}
            strategies = [operation.as_strategy(generation_mode=mode) for mode in GenerationMode]
            if pinned:
                strategies.append(operation.as_strategy(path_parameters=pinned))
            run = _runner(fuzz, st.one_of(strategies))
            run()
    finally:
        asgi.shutdown_lifespans()

    print(f"\nschemathesis: {fuzz.requests} requests over {len(operations)} operations")
    for operation in operations:
        seen = sorted((code, n) for (label, code), n in fuzz.statuses.items() if label == operation.label)
        print(f"  {operation.label}: " + ", ".join(f"{code} x{n}" for code, n in seen))
    report = "\n\n".join(f"[{label}] {check}\n{detail}" for (label, check), detail in sorted(fuzz.failures.items()))
    assert not fuzz.failures, f"{len(fuzz.failures)} distinct failures in {fuzz.requests} requests:\n\n{report}"
    assert fuzz.requests >= MIN_REQUESTS, fuzz.requests


def _runner(fuzz: Fuzz, cases: st.SearchStrategy[Any]) -> Callable[[], None]:
    @FUZZ_SETTINGS
    @given(case=cases, role=st.sampled_from(ROLES))
    def run(case: Any, role: str) -> None:
        fuzz.send(case, role)

    return run


def test_found_by_fuzzing(client, tokens) -> None:  # type: ignore[no-untyped-def]
    """What the fuzzer found, pinned: each was a 500 (an unhandled psycopg/SQLAlchemy DataError)."""
    admin = tokens.headers("admin")
    # An id past PostgreSQL's integer range in a path, a query or a body: 422 from validation.
    for path in ("/api/v1/volumes/4714731729", "/api/v1/datasets/6000281485", "/api/v1/tasks/next?dataset=2147483648"):
        response = client.get(path, headers=admin)
        assert response.status_code == 422, (path, response.text)
        assert isinstance(response.json()["detail"], list)
    compare = client.post("/api/v1/evaluations/compare", json={"a": 1, "b": 10**12}, headers=admin)
    assert compare.status_code == 422, compare.text
    # The largest valid id is looked up, not rejected.
    assert client.get("/api/v1/volumes/2147483647", headers=admin).status_code == 404
    # A value the database cannot store (NUL in text) is the input's fault: 422 with a message, not a 500.
    nul = client.post("/api/v1/datasets", json={"name": "a\u0000b", "labels": {"liver": 1}}, headers=admin)
    assert nul.status_code == 422, nul.text
    assert isinstance(nul.json()["detail"], str), nul.text
