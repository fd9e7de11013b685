"""A small typed wrapper of the crowdsam HTTP API: base URL + bearer token, clean errors, polite retries,
atomic streamed downloads. Uses only the public API (no app internals), so it runs against any server."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

API_PREFIX = "/api/v1"
RETRY_STATUSES = (429, 503)
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
TERMINAL = ("finished", "failed", "canceled")


class ApiError(Exception):
    """An answer the caller cannot go on with: one readable line (status and the server's ``detail``)."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


def describe(response: httpx.Response) -> str:
    """``HTTP 422: what the server said`` — the ``detail`` sentence, or its list of ``loc: msg`` entries."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        parts = []
        for item in detail[:20]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p not in ("body",))
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        more = f"; ... {len(detail) - 20} more" if len(detail) > 20 else ""
        text = "; ".join(parts) + more
    elif detail is not None:
        text = str(detail)
    else:
        text = response.reason_phrase or response.text[:200]
    return f"HTTP {response.status_code}: {text}"


def retry_after(response: httpx.Response, attempt: int, cap: float = 60.0) -> float:
    """Seconds to wait: the server's ``Retry-After`` (seconds) when given, else exponential backoff."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        seconds = min(2.0 ** attempt, cap)
    return max(0.0, min(seconds, cap))


class Api:
    """``Api(url, token)``; every method raises :class:`ApiError` on a 4xx/5xx or a transport failure."""

    def __init__(self, url: str, token: str, *, retries: int = 5, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base = url.rstrip("/")
        self.retries, self.sleep = retries, sleep
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                 follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def path(path: str) -> str:
        return path if path.startswith(API_PREFIX) or path.startswith("http") else f"{API_PREFIX}{path}"

    # --- requests ------------------------------------------------------------------------
    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (), build: Callable[[], dict[str, Any]] | None
                = None, **kwargs: Any) -> httpx.Response:
        """Send; on 429/503 wait ``Retry-After`` (or back off) and retry up to ``retries`` times.

        ``build`` makes fresh keyword arguments per attempt (open files again for an upload);
        statuses in ``ok`` are returned rather than raised (e.g. 409 for "already there").
        """
        url = self.path(path)
        for attempt in range(self.retries + 1):
            args = {**kwargs, **(build() if build else {})}
            try:
                response = self.http.request(method, url, **args)
            except httpx.TransportError as exc:
                raise ApiError(f"cannot reach {self.base}: {exc or type(exc).__name__}") from exc
            finally:
                _close_files(args.get("files"))
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                self.sleep(retry_after(response, attempt))
                continue
            if response.is_success or response.status_code in ok:
                return response
            raise ApiError(describe(response), response.status_code, _detail(response))
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every row of a keyset-paginated list, following ``Link: rel="next"``."""
        url: str | None = self.path(path)
        query: dict[str, Any] | None = {"limit": 1000, **params}
        while url is not None:
            response = self.request("GET", url, params=query)
            yield from response.json()
            nxt = response.links.get("next", {}).get("url")
            url, query = (urljoin(self.base + "/", nxt), None) if nxt else (None, None)

    # --- downloads -----------------------------------------------------------------------
    def download(self, path: str, target: Path, *, params: dict[str, Any] | None = None,
                 progress: Callable[[int, int | None], None] | None = None) -> Path:
        """Stream a body to a temporary file beside ``target``, then rename it into place (atomic)."""
        url = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(self.retries + 1):
            try:
                with self.http.stream("GET", url, params=params) as response:
                    if response.status_code in RETRY_STATUSES and attempt < self.retries:
                        self.sleep(retry_after(response, attempt))
                        continue
                    if not response.is_success:
                        response.read()
                        raise ApiError(describe(response), response.status_code, _detail(response))
                    total = int(response.headers["content-length"]) if "content-length" in response.headers else None
                    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
                    try:
                        with os.fdopen(fd, "wb") as out:
                            for chunk in response.iter_bytes(1 << 20):
                                out.write(chunk)
                                if progress:
                                    progress(len(chunk), total)
                            out.flush()
                            os.fsync(out.fileno())
                        os.replace(tmp, target)
                    except BaseException:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(tmp)
                        raise
                    return target
            except httpx.TransportError as exc:
                raise ApiError(f"cannot reach {self.base}: {exc or type(exc).__name__}") from exc
        raise ApiError(f"{url}: still busy after {self.retries} retries")

    # --- jobs ----------------------------------------------------------------------------
    def wait(self, paths: list[str], on_progress: Callable[[str, dict[str, Any]], None] | None = None,
             interval: float = 1.0, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Poll jobs (``/segmentations/{id}``, ``/exports/{id}``, ``/evaluations/{id}``) together until every
        one has ended (finished, failed or canceled); path → its last row."""
        started = time.monotonic()
        last: dict[str, dict[str, Any]] = {}
        pending = list(paths)
        while pending:
            for path in list(pending):
                last[path] = self.get(path)
                if on_progress:
                    on_progress(path, last[path])
                if last[path]["status"] in TERMINAL:
                    pending.remove(path)
            if not pending:
                break
            if timeout is not None and time.monotonic() - started > timeout:
                raise ApiError(f"{len(pending)} jobs still running after {timeout:g} s: {pending[:5]}")
            self.sleep(interval)
        return {path: last[path] for path in paths}


def _close_files(files: Any) -> None:
    """Close the file objects of an httpx ``files=`` argument (a dict or a list of (field, tuple))."""
    items = files.values() if isinstance(files, dict) else [v for _, v in files or []]
    for value in items:
        if isinstance(value, tuple) and hasattr(value[1], "close"):
            value[1].close()


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail")
    except (ValueError, AttributeError):
        return None
