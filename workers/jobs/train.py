"""RQ entry point of nnU-Net training jobs (queue ``train``), enqueued as ``workers.jobs.train.run_training``."""

from __future__ import annotations

from typing import Any


def run_training(training_id: int) -> dict[str, Any]:
    """Plan, preprocess, train and predict with nnU-Net v2 on an export; see :mod:`workers.training`."""
    from app.jobs.runner import run_job
    from workers.training import train

    return run_job("training", training_id, train)
