"""RQ entry point of export jobs (queue ``cpu``), enqueued as ``workers.jobs.export.run_export``."""

from __future__ import annotations

from typing import Any


def run_export(export_id: int) -> dict[str, Any]:
    """Write an nnU-Net v2 raw dataset and its archive; see :mod:`workers.exporter`."""
    from app.jobs.runner import run_job
    from workers.exporter import export

    return run_job("export", export_id, export)
