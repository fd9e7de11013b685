"""Task assignment: the slice an annotator should label next.

Candidates are **every slice of every volume** of the dataset — never chosen from a reference, so
organ-free slices are seen (a "nothing here" answer makes them known background) and the crowd's
design does not depend on what the reference holds. A slice needs ``min_views`` annotators; a
*disputed* slice — its crowd agreement (:mod:`app.tasks.agreement`: majority share of "drew the
organ" vs "saw the slice and did not", and pairwise box IoU; prompts only, no SAM) below
``min_agreement`` — needs up to ``max_views``.

Candidates this annotator has not seen are ranked by annotators who saw them plus others currently
holding a lease (fewest first), then by agreement (most disputed first), then by volume and slice.
Since undisputed slices stop at ``min_views``, every slice reaches ``min_views`` before any gets an
extra view, and disputed slices get theirs before undisputed ones at the same count. The first
candidate with a free lease slot is leased to the caller for ``task_lease_s``. A caller who holds a
live lease on a slice they have not answered gets that slice again (lease renewed), so retries and
reloads do not fan out; with several such leases, the earliest-expiring first.

Look-ahead (``ahead=1``): after the task, the same choice is made again as if the task were answered
(it is excluded, the gold coin is the next task number's) and that slice is leased too and returned as
``next``. The task is always renewed before ``next``, so it expires first: a reload hands the same pair
in the same order, and once the task is answered the former ``next`` (then the only held lease) is the task.

Gold: with ``gold_rate`` > 0, a share of tasks (decided per annotator and task number by a hash, so a
reload decides the same) is drawn uniformly from unseen slices of volumes with a reference, whatever
their view counts; the answer looks like any other task. With gold on, ordinary tasks go to volumes
with a reference only once every slice of the others is done. With ``gold_rate`` = 0 nothing here looks
at references.

Cost per call: a grouped count of the dataset's slice views, the annotator's views and one Redis read.
The first ``FAST_PATH_SLICES`` unseen, unleased slices are tried before anything else is ranked;
agreement is read (and the slices changed since the last read recomputed) only when those are taken.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.auth.security import Principal
from app.core.config import get_settings
from app.core.hashing import sha256_text
from app.datasets.repository import DatasetRepository
from app.imaging.palette import label_colors
from app.prompts.repository import PromptRepository
from app.prompts.service import display_size
from app.segmentations import preencode
from app.tasks import agreement, leases
from app.tasks.schemas import TaskOut
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository

FAST_PATH_SLICES = 16  # free slices tried before the whole dataset is ranked
GOLD_TRIES = 8  # random gold slices tried (a lease may be full) before falling back to ordinary tasks

# (tier, rank, agreement - 1, volume order, slice, volume id, lease capacity): sorted, best first
Candidate = tuple[int, int, float, int, int, int, int]


def gold_draw(dataset_id: int, annotator: str, done: int) -> float:
    """A uniform number in [0, 1) fixed by (dataset, annotator, task number): the gold coin of one task."""
    return int(sha256_text(f"gold:{dataset_id}:{annotator}:{done}")[:16], 16) / 16**16


def next_task(session: Session, dataset_id: int, who: Principal, ahead: int = 0) -> TaskOut | None:
    """The caller's task, leased to them; with ``ahead=1`` also the one after it, leased too, as ``next``."""
    settings = get_settings()
    dataset = DatasetRepository(session).get(dataset_id)
    policy = dataset.tasks
    min_views, max_views = int(policy["min_views"]), int(policy["max_views"])
    gold_rate, min_agreement = float(policy["gold_rate"]), float(policy["min_agreement"])
    volumes = list(VolumeRepository(session).list_for_dataset(dataset_id))
    # With gold on, volumes with a reference are the gold: ordinary tasks go there only once every other
    # slice is done (tier 1). With gold off every volume is ordinary work (tier 0) and no reference is read.
    tier = {v.id: int(gold_rate > 0 and v.reference_key is not None) for v in volumes}
    volumes.sort(key=lambda v: (tier[v.id], v.id))
    by_id = {v.id: v for v in volumes}
    prompts = PromptRepository(session)
    counts = prompts.dataset_view_counts(dataset_id)
    mine = prompts.dataset_seen_by(dataset_id, who.name)
    active = leases.active(dataset_id)
    others = leases.busy(active, exclude=who.name)

    # Slices leased to the caller and not answered yet come back (a reload, a retry), earliest expiry first:
    # the task is renewed before the look-ahead slice, so the task always expires first and keeps its place.
    held = sorted((lease.expires_at, lease.volume_id, lease.slice) for lease in active
                  if lease.annotator == who.name and (lease.volume_id, lease.slice) not in mine
                  and lease.volume_id in by_id)
    held_set = {(volume_id, k) for _, volume_id, k in held}
    full: list[Candidate] | None = None  # the ranking, computed at most once per call

    def fresh(limit: int) -> list[Candidate]:
        """The first ``limit`` slices of tier 0 that nobody has seen or holds, in volume and slice order."""
        out: list[Candidate] = []
        if len(counts) >= sum(v.n_slices for v in volumes):
            return out  # every slice has been seen
        for order, volume in enumerate(volumes):
            if tier[volume.id]:
                break
            vid = volume.id
            for k in range(volume.n_slices):
                key = (vid, k)
                if key not in counts and not others.get(key) and key not in held_set and key not in mine:
                    out.append((0, 0, 0.0, order, k, vid, min_views))
                    if len(out) >= limit:
                        return out
        return out

    def ranked() -> list[Candidate]:
        """Every slice this annotator may still be given, best first."""
        nonlocal full
        if full is not None:
            return full
        # Agreement changes nothing when no slice can get extra views and none below min_views has two answers.
        levels = agreement.disputed(session, dataset_id, min_agreement) if max_views > min_views or min_views > 2 \
            else {}
        out: list[Candidate] = []
        for order, volume in enumerate(volumes):
            vid, vtier = volume.id, tier[volume.id]
            for k in range(volume.n_slices):
                key = (vid, k)
                seen = counts.get(key, 0)
                level = levels.get(key, 1.0)
                target = max_views if level < min_agreement else min_views
                if seen >= target or key in mine or key in held_set:
                    continue
                out.append((vtier, seen + others.get(key, 0), level - 1.0, order, k, vid, target - seen))
        out.sort()
        full = out
        return out

    def pick(handed: set[tuple[int, int]]) -> leases.Lease | None:
        """Lease the caller's next slice, choosing as if the slices ``handed`` in this call were answered."""
        for _, volume_id, k in held:
            if (volume_id, k) not in handed:
                lease = leases.claim(dataset_id, volume_id, k, who.name, max_views, settings.task_lease_s)
                if lease is not None:
                    return lease

        def unhanded(candidates: list[Candidate]) -> list[Candidate]:
            return [c for c in candidates if (c[5], c[4]) not in handed]

        head = unhanded(fresh(FAST_PATH_SLICES + len(handed)))[:FAST_PATH_SLICES]
        if not head and not unhanded(ranked()):
            return None  # nothing left for this annotator: no gold either

        done = len(mine) + len(handed)
        if gold_rate > 0 and gold_draw(dataset_id, who.name, done) < gold_rate:
            gold = [(v.id, k) for v in volumes if v.reference_key is not None for k in range(v.n_slices)
                    if (v.id, k) not in mine and (v.id, k) not in held_set and (v.id, k) not in handed]
            rng = random.Random(sha256_text(f"gold-pick:{dataset_id}:{who.name}:{done}"))
            for volume_id, k in rng.sample(gold, min(GOLD_TRIES, len(gold))):
                lease = leases.claim(dataset_id, volume_id, k, who.name, max_views, settings.task_lease_s)
                if lease is not None:
                    return lease

        # First only slices no busier than when ranked (concurrent callers spread out), then any slice with a
        # free slot. Most calls succeed among the first free slices; the full ranking decides when they are taken.
        for strict, candidates in ((True, head), (True, None), (False, None)):
            for *_, k, volume_id, capacity in unhanded(candidates if candidates is not None else ranked()):
                max_busy = others.get((volume_id, k), 0) if strict else None
                lease = leases.claim(dataset_id, volume_id, k, who.name, capacity, settings.task_lease_s, max_busy)
                if lease is not None:
                    return lease
        return None

    def task(lease: leases.Lease, done: int) -> TaskOut:
        preencode.request(lease.volume_id, [lease.slice])  # its embedding is ready when the crowd's masks are asked
        return _task(by_id[lease.volume_id], dataset.labels, lease.slice, lease.expires_at, done)

    first = pick(set())
    if first is None:
        return None
    out = task(first, len(mine))
    if ahead:
        # The look-ahead slice: what the call after this task is answered would hand (a held one first).
        second = pick({(first.volume_id, first.slice)})
        out.next = task(second, len(mine) + 1) if second is not None else None
    return out


def _task(volume: Volume, labels: dict[str, int], k: int, expires_at: float, done: int) -> TaskOut:
    width, height = display_size(volume)
    return TaskOut(
        dataset_id=volume.dataset_id, volume_id=volume.id, case_id=volume.case_id, slice=k,
        labels=labels, colors=label_colors(labels),
        slice_url=f"/api/v1/volumes/{volume.id}/slices/{k}.png", display_size=[width, height],
        lease_expires_at=datetime.fromtimestamp(expires_at, tz=UTC), done=done,
    )
