"""Label maps from the artefact store: masks, references and uploaded predictions, decoded whole.

The NIfTI side (decoding, and the one writer with its qform/sform rule) is
:mod:`app.imaging.labelmaps`; this module only fetches the object, as ``app.imaging`` is kept free
of storage.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.core.storage import Storage
from app.imaging.labelmaps import LabelMap, read_label_map


def open_label_map(storage: Storage, key: str) -> LabelMap:
    """The label map stored as ``key``: its image (header, affine) and its stored values."""
    with storage.local_copy(key) as path:
        return read_label_map(path)


def load_label_map(storage: Storage, key: str) -> npt.NDArray[np.int32]:
    """The label map stored as ``key`` as int32 values, on its original grid."""
    return open_label_map(storage, key).as_int32()
