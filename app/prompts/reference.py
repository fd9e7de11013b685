"""A volume's reference label map on the canonical grid.

Task assignment never reads it (app.tasks offers every slice): a reference is for simulation and scoring.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.core.errors import Invalid
from app.core.labelmaps import load_label_map
from app.core.storage import Storage
from app.imaging.coords import Orientation
from app.volumes.models import Volume


def canonical_reference(storage: Storage, volume: Volume) -> npt.NDArray[np.int32]:
    """The reference (dataset label values) as a canonical RAS+ array; 422 when there is none."""
    if volume.reference_key is None:
        raise Invalid(f"volume {volume.id} has no reference label map")
    data = load_label_map(storage, volume.reference_key)
    orientation = Orientation.from_affine(volume.affine, volume.shape)
    return np.ascontiguousarray(orientation.canonical(data), dtype=np.int32)
