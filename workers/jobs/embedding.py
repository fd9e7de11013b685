"""The ``sam``-queue job behind ``GET /volumes/{id}/slices/{k}/embedding`` (see
:mod:`app.segmentations.embeddings`): publish one slice's image embedding to the shared store."""

from __future__ import annotations

import gzip
import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from app.core.db import session_scope
from app.core.storage import Storage, get_storage, sha256_file
from app.datasets.models import Dataset
from app.imaging.coords import display_slice
from app.segmentations import embeddings
from app.volumes import slices as volume_slices
from app.volumes.models import Volume

log = logging.getLogger("crowdsam.jobs")

GZIP_LEVEL = 6


def geometry(family: Any, original: tuple[int, int]) -> dict[str, Any]:
    """What the browser needs to put display-pixel prompts into the model frame and the decoder's low-res
    logits back onto the slice: the family's square input, the resized image inside it, its padding."""
    side = int(family.img_size)
    resized = tuple(int(v) for v in family.input_size(original))
    stretch = family.name == "medsam"
    return {
        "input_size": side,
        "original_size": [int(original[0]), int(original[1])],  # [h, w] of the display slice
        "resized_size": [resized[0], resized[1]],  # [h, w] inside the input square, before padding
        "scale": [resized[1] / original[1], resized[0] / original[0]],  # [x, y]: model = display * scale
        "resize": "stretch" if stretch else "longest-side",
        "padding": {"top": 0, "left": 0, "bottom": side - resized[0], "right": side - resized[1]},
        "frame": "display",
        "low_res_size": 256,
        "postprocess": ("upsample the low-res logits to original_size" if stretch else
                        "upsample the low-res logits to input_size, crop to resized_size, resize to original_size"),
    }


def to_wire(embedding: npt.NDArray[np.floating]) -> bytes:
    """float16 little-endian, C order, gzip-compressed (fixed mtime: same embedding, same bytes)."""
    data = np.ascontiguousarray(np.asarray(embedding, dtype="<f2"))
    return gzip.compress(data.tobytes(), compresslevel=GZIP_LEVEL, mtime=0)


_DECODERS: dict[str, dict[str, Any]] = {}  # decoder store key → what the header says about it


def publish_decoder(storage: Storage, engine: Any, model: str) -> dict[str, Any]:
    """Put the engine's browser decoder (one ONNX file) in the store unless it is there; what the embedding
    header says about it. The file's size and hash are computed once per process; its presence in the store
    is checked every time (one HEAD: the store may have been emptied or be another one since)."""
    decoder_id = engine.decoder_id
    key = embeddings.decoder_key(model, decoder_id)
    path = engine.web_decoder()
    if key not in _DECODERS:
        _DECODERS[key] = {"id": decoder_id, "url": embeddings.decoder_url(model, decoder_id),
                          "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if not storage.exists(key):
        storage.put_file(key, path)
    return _DECODERS[key]


def publish_embedding(volume_id: int, k: int, model: str) -> dict[str, Any]:
    """Write the embedding of slice ``k`` for ``model`` to the store (from this host's cache, or one encoder
    pass); a deleted volume or a slice out of range is nothing to do. Clears the API's request mark, or on
    failure leaves the reason in it (the API answers 409 with it until the mark expires, then retries)."""
    with session_scope() as session:
        volume = session.get(Volume, volume_id)
        dataset = session.get(Dataset, volume.dataset_id) if volume is not None else None
        if volume is None or dataset is None or volume.canonical_key is None or not 0 <= k < volume.n_slices:
            return {"published": False}
        key = embeddings.object_key(volume, dataset, k, model)
        canonical_key, image_id = volume.canonical_key, volume.sha256
        window = (float(dataset.window_level), float(dataset.window_width))
    try:
        storage = get_storage()
        if storage.exists(key):
            embeddings.request_done(key)
            return {"published": False, "key": key}
        from workers.sam.engine import get_engine
        from workers.sam.plan import slice_digest

        engine = get_engine(model)
        canonical = volume_slices.canonical_array(storage, canonical_key)
        display = np.asarray(display_slice(canonical, k))
        embedding_key = engine.embedding_key(image_id, k, slice_digest(display), window)
        encoded = engine.preencode(canonical, window=window, image_id=image_id, slices=[k])
        cached = engine.embeddings.get(embedding_key)
        array = cached["embedding"] if cached is not None else engine.encode(display, window).float().cpu().numpy()
        gzipped = to_wire(array)
        decoder = publish_decoder(storage, engine, model)
        header = {
            "model": model, "weights": engine.weights_id, "backend": engine.backend.tag, "etag": embedding_key,
            "volume_id": volume_id, "slice": k, "window": list(window),
            "shape": [int(n) for n in array.shape], "dtype": "float16", "byte_order": "little", "order": "C",
            "mask_threshold": float(engine.model.sam.mask_threshold),
            "bytes": len(gzipped), "fp16_bytes": int(array.size) * 2, "fp32_bytes": int(array.size) * 4,
            **geometry(engine.model.family, (int(display.shape[0]), int(display.shape[1]))),
            "decoder": decoder,
        }
        storage.write_bytes(key, embeddings.pack(header, gzipped))
        log.info("published the %s embedding of slice %d of volume %s (%d bytes, encoded %d)", model, k,
                 volume_id, len(gzipped), encoded)
    except Exception as exc:
        embeddings.request_failed(key, f"{type(exc).__name__}: {exc}")  # the API answers 409 until it expires
        raise
    embeddings.request_done(key)
    return {"published": True, "key": key, "bytes": len(gzipped), "encoded": encoded}
