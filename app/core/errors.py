"""One error hierarchy, mapped to HTTP by one handler.

    CrowdsamError (500 — a bug if it escapes)
     ├── BadRequest      400
     ├── Unauthorized    401
     ├── Forbidden       403
     ├── NotFound        404
     ├── Conflict        409
     ├── PayloadTooLarge 413
     ├── Invalid         422   (input understood but not acceptable)
     ├── TooManyRequests 429   (a per-user limit, e.g. active jobs; retry after ``Retry-After``)
     └── ServiceUnavailable 503 (a backing service — Redis, the queue — is unreachable)
"""

from __future__ import annotations

from typing import Any


class CrowdsamError(Exception):
    status_code = 500

    def __init__(self, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail
        self.headers = headers


class BadRequest(CrowdsamError):
    status_code = 400


class Unauthorized(CrowdsamError):
    status_code = 401

    def __init__(self, detail: Any = "missing or invalid bearer token") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(CrowdsamError):
    status_code = 403


class NotFound(CrowdsamError):
    status_code = 404


class Conflict(CrowdsamError):
    status_code = 409


class PayloadTooLarge(CrowdsamError):
    status_code = 413


class Invalid(CrowdsamError):
    status_code = 422


class TooManyRequests(CrowdsamError):
    status_code = 429


class ServiceUnavailable(CrowdsamError):
    status_code = 503


class PermanentJobError(Exception):
    """A job error that retrying cannot fix (missing weights, bad configuration): the job fails at once."""
