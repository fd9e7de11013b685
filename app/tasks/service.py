"""Task assignment: the slice an annotator should label next.

Candidates are slices with anatomy of interest (from the reference when present, else every
slice) that this annotator has not seen and that fewer than ``annotators_per_slice`` distinct
annotators have seen. They are ranked by annotators who saw them plus others currently holding
a lease (fewest first), then by volume and slice; the first one with a free lease slot is
leased to the caller for ``task_lease_s``. A caller who already holds a live lease on a slice
still to be done gets that slice again (lease renewed), so retries and reloads do not fan out.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.config import get_settings
from app.core.storage import Storage
from app.datasets.repository import DatasetRepository
from app.imaging.palette import label_colors
from app.prompts.reference import interest_slices
from app.prompts.repository import PromptRepository
from app.prompts.service import display_size
from app.tasks import leases
from app.tasks.schemas import TaskOut
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository

FAST_PATH_SLICES = 16  # free slices tried before the whole dataset is ranked


def next_task(session: Session, storage: Storage, dataset_id: int, who: Principal) -> TaskOut | None:
    settings = get_settings()
    target = settings.annotators_per_slice
    dataset = DatasetRepository(session).get(dataset_id)
    volumes = {v.id: v for v in VolumeRepository(session).list_for_dataset(dataset_id)}
    prompts = PromptRepository(session)
    counts = prompts.dataset_view_counts(dataset_id)
    mine = prompts.dataset_seen_by(dataset_id, who.name)
    active = leases.active(dataset_id)
    others = leases.busy(active, exclude=who.name)
    held = {(lease.volume_id, lease.slice) for lease in active if lease.annotator == who.name}

    def ranked(first_only: int | None) -> list[tuple[int, int, int, int]]:
        """(rank, volume, slice, annotators seen), best first; with ``first_only``, stop after that many
        rank-0 slices (held slices rank -1 come first either way): they head the full ranking too."""
        candidates = [(-1, v, k, counts.get((v, k), 0)) for v, k in sorted(held)
                      if v in volumes and (v, k) not in mine and counts.get((v, k), 0) < target]
        fresh = 0
        for volume in volumes.values():
            for k in interest_slices(storage, volume):
                key = (volume.id, k)
                seen = counts.get(key, 0)
                if key in mine or key in held or seen >= target:
                    continue
                rank = seen + others[key]
                candidates.append((rank, volume.id, k, seen))
                fresh += rank == 0
                if first_only is not None and fresh >= first_only:
                    return sorted(c for c in candidates if c[0] <= 0)
        candidates.sort()
        return candidates if first_only is None else [c for c in candidates if c[0] <= 0]

    # First pass: only slices no busier than when ranked (concurrent callers spread out); second pass:
    # any slice with a free slot. Most calls succeed among the first free slices, so those are ranked
    # first without walking the whole dataset; the full ranking decides when they are all taken.
    head = ranked(first_only=FAST_PATH_SLICES)
    for strict, candidates in ((True, head), (True, None), (False, None)):
        for _rank, volume_id, k, seen in candidates if candidates is not None else ranked(None):
            max_busy = others[(volume_id, k)] if strict else None
            lease = leases.claim(dataset_id, volume_id, k, who.name, target - seen, settings.task_lease_s, max_busy)
            if lease is not None:
                return _task(volumes[volume_id], dataset.labels, k, lease.expires_at, len(mine))
    return None


def _task(volume: Volume, labels: dict[str, int], k: int, expires_at: float, done: int) -> TaskOut:
    width, height = display_size(volume)
    return TaskOut(
        dataset_id=volume.dataset_id, volume_id=volume.id, case_id=volume.case_id, slice=k,
        labels=labels, colors=label_colors(labels),
        slice_url=f"/api/v1/volumes/{volume.id}/slices/{k}.png", display_size=[width, height],
        lease_expires_at=datetime.fromtimestamp(expires_at, tz=UTC), done=done,
    )
