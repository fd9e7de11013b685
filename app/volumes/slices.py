"""Display slices from the canonical cache (memory-mapped .npy, so one slice reads one slice)."""

from __future__ import annotations

import threading
from typing import Any

import cachetools
import numpy as np
import numpy.typing as npt

from app.core.errors import NotFound
from app.core.storage import Storage
from app.imaging.coords import display_slice
from app.imaging.render import png_bytes, window_to_uint8
from app.volumes.models import Volume

_CACHE_SIZE = 16
_cache: cachetools.LRUCache[str, npt.NDArray[Any]] = cachetools.LRUCache(maxsize=_CACHE_SIZE)
_lock = threading.Condition()  # concurrent misses of one key wait for the first one's load


@cachetools.cached(_cache, key=lambda storage, key: key, condition=_lock)
def canonical_array(storage: Storage, key: str) -> npt.NDArray[Any]:
    """The canonical volume, memory-mapped (a remote store's object from this host's mirror copy), so a slice
    reads one slice; a small LRU keeps recent volumes open."""
    return np.load(storage.mirror(key), mmap_mode="r")


def forget(key: str) -> None:
    with _lock:
        _cache.pop(key, None)


def check_slice(volume: Volume, k: int) -> None:
    if not 0 <= k < volume.n_slices:
        raise NotFound(f"slice {k} out of range: volume {volume.id} has slices 0..{volume.n_slices - 1}")


def display_png(storage: Storage, volume: Volume, k: int, level: float, width: float) -> bytes:
    check_slice(volume, k)
    canonical = canonical_array(storage, volume.canonical_key)
    return png_bytes(window_to_uint8(display_slice(canonical, k), level, width))
