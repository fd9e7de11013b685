"""Job kinds: what each kind's row, queue, entry point, retry policy and typed parameters are.

Each domain registers its kind once (``app.segmentations.jobs``, ``app.exports.jobs``,
``app.evaluations.jobs``); everything else in :mod:`app.jobs` is written once for all kinds.
The API never imports the entry points (they are dotted paths), so it never loads torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from app.core.config import get_settings
from app.jobs.states import JobMixin

KIND_MODULES = ("app.segmentations.jobs", "app.exports.jobs", "app.evaluations.jobs", "app.trainings.jobs")


@dataclass(frozen=True)
class JobKind:
    name: str  # job ids are "<name>-<row id>"
    model: type[Any]  # the ORM row class (a JobMixin)
    params: type[BaseModel]  # typed parameters: validated when the job is submitted and when it runs
    queue: str  # "sam" (model work), "cpu" or "train" (nnU-Net training)
    entry: str  # dotted path of the RQ function, called with the row id
    retry_intervals: tuple[int, ...]  # backoff (s) between attempts after a transient error
    describe: Callable[[Any], str]  # row → the RQ job's description
    timeout_s: Callable[[], int] | None = None  # the job's time limit (read at enqueue); None: job_timeout_s

    def job_timeout(self) -> int:
        """Seconds one attempt may run: the kind's own limit, else ``CROWDSAM_JOB_TIMEOUT_S``."""
        return self.timeout_s() if self.timeout_s is not None else get_settings().job_timeout_s

    def job_id(self, row_id: int) -> str:
        return f"{self.name}-{row_id}"

    def cancel_key(self, row_id: int) -> str:
        return f"crowdsam:{self.name}:{row_id}:cancel"

    def validated_params(self, row: JobMixin) -> BaseModel:
        return self.params.model_validate(row.job_params())


_KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    _KINDS[kind.name] = kind
    return kind


def all_kinds() -> list[JobKind]:
    """Every kind (importing the modules that register them)."""
    for module in KIND_MODULES:
        importlib.import_module(module)
    return list(_KINDS.values())


def get_kind(name: str) -> JobKind:
    if name not in _KINDS:
        all_kinds()
    return _KINDS[name]


def parse_job_id(job_id: str) -> tuple[JobKind, int] | None:
    """``"export-12"`` → (export kind, 12); None for a job id that is not one of ours."""
    name, _, number = job_id.rpartition("-")
    if not number.isdigit():
        return None
    try:
        return get_kind(name), int(number)
    except KeyError:
        return None
