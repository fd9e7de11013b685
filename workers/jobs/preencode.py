"""Pre-encoding job (queue ``preencode``, see :mod:`app.segmentations.preencode`): fill the worker's
embedding cache for some slices of a volume, with the window and image id a segmentation will use."""

from __future__ import annotations

import logging

from app.core.db import session_scope
from app.core.storage import get_storage
from app.datasets.models import Dataset
from app.volumes import slices as volume_slices
from app.volumes.models import Volume

log = logging.getLogger("crowdsam.jobs")


def preencode(volume_id: int, slices: list[int], model: str) -> dict[str, int]:
    """Encode the slices not in the cache yet; a deleted volume is nothing to do."""
    with session_scope() as session:
        volume = session.get(Volume, volume_id)
        dataset = session.get(Dataset, volume.dataset_id) if volume is not None else None
        if volume is None or dataset is None or volume.canonical_key is None:
            return {"requested": len(slices), "encoded": 0}
        window = (float(dataset.window_level), float(dataset.window_width))
        key, image_id = volume.canonical_key, volume.sha256
    canonical = volume_slices.canonical_array(get_storage(), key)
    from workers.sam.engine import get_engine

    wanted = [k for k in slices if 0 <= k < canonical.shape[2]]
    encoded = get_engine(model).preencode(canonical, window=window, image_id=image_id, slices=wanted)
    log.info("pre-encoded %d of %d slice(s) of volume %s for %s", encoded, len(slices), volume_id, model)
    return {"requested": len(slices), "encoded": encoded}
