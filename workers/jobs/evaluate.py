"""RQ entry point of evaluation jobs (queue ``cpu``), enqueued as ``workers.jobs.evaluate.run_evaluation``."""

from __future__ import annotations

from typing import Any


def run_evaluation(evaluation_id: int) -> dict[str, Any]:
    """Score predictions against references; see :mod:`workers.evaluator`."""
    from workers.evaluator import EvaluationRunner

    return EvaluationRunner(evaluation_id).run()
