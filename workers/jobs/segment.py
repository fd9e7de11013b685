"""RQ entry point of segmentation jobs (queue ``sam``), enqueued as ``workers.jobs.segment.run_segmentation``."""

from __future__ import annotations

from typing import Any


def run_segmentation(segmentation_id: int) -> dict[str, Any]:
    """Segment one volume's prompts into a NIfTI mask; see :mod:`workers.jobs.segmentation`."""
    from app.jobs.runner import run_job
    from workers.jobs.segmentation import segment

    return run_job("segmentation", segmentation_id, segment)
