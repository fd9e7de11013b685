"""Jobs of the ``preencode`` queue (see :mod:`app.segmentations.preencode`): fill the worker's embedding
cache for some slices of a volume, and decode the prompts posted so far, with the window and image id a
segmentation will use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from app.core.db import session_scope
from app.core.storage import get_storage
from app.datasets.models import Dataset
from app.segmentations import preencode as requests
from app.segmentations.repository import SegmentationRepository
from app.volumes import slices as volume_slices
from app.volumes.models import Volume
from workers.jobs.segmentation import prompts_by_slice

log = logging.getLogger("crowdsam.jobs")


@dataclass(frozen=True)
class _Volume:
    """What the engine needs of a volume: its canonical array's key, the dataset window, the image id."""

    key: str
    window: tuple[float, float]
    image_id: str

    def canonical(self) -> Any:
        return volume_slices.canonical_array(get_storage(), self.key)


def _volume(session: Any, volume_id: int) -> _Volume | None:
    """The volume's engine inputs (the keys a segmentation uses), None when it was deleted."""
    volume = session.get(Volume, volume_id)
    dataset = session.get(Dataset, volume.dataset_id) if volume is not None else None
    if volume is None or dataset is None or volume.canonical_key is None:
        return None
    return _Volume(volume.canonical_key, (float(dataset.window_level), float(dataset.window_width)), volume.sha256)


def preencode(volume_id: int, slices: list[int], model: str) -> dict[str, int]:
    """Encode the slices not in the cache yet; a deleted volume is nothing to do."""
    with session_scope() as session:
        found = _volume(session, volume_id)
    if found is None:
        return {"requested": len(slices), "encoded": 0}
    canonical = found.canonical()
    from workers.sam.engine import get_engine

    wanted = [k for k in slices if 0 <= k < canonical.shape[2]]
    encoded = get_engine(model).preencode(canonical, window=found.window, image_id=found.image_id, slices=wanted)
    log.info("pre-encoded %d of %d slice(s) of volume %s for %s", encoded, len(slices), volume_id, model)
    return {"requested": len(slices), "encoded": encoded}


def predecode(volume_id: int, model: str) -> dict[str, int]:
    """Decode every prompt of the volume not decoded yet; prompts posted after this job starts queue the
    next one (the pending mark is cleared first)."""
    requests.decode_started(volume_id, model)
    with session_scope() as session:
        found = _volume(session, volume_id)
        if found is None:
            return {"slices": 0, "decoded": 0}
        repo = SegmentationRepository(session)
        prompts = prompts_by_slice(repo, volume_id, repo.prompted_labels(volume_id))
    from workers.sam.engine import get_engine

    decoded = get_engine(model).predecode(found.canonical(), window=found.window, image_id=found.image_id,
                                          prompts=prompts)
    log.info("pre-decoded %d of %d prompted slice(s) of volume %s for %s", decoded, len(prompts), volume_id, model)
    return {"slices": len(prompts), "decoded": decoded}
