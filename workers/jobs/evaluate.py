"""RQ entry point of evaluation jobs (queue ``cpu``), enqueued as ``workers.jobs.evaluate.run_evaluation``."""

from __future__ import annotations

from typing import Any


def run_evaluation(evaluation_id: int) -> dict[str, Any]:
    """Score predictions against references; see :mod:`workers.evaluator`."""
    from app.jobs.runner import run_job
    from workers.evaluator import evaluate

    return run_job("evaluation", evaluation_id, evaluate)
