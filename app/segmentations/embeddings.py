"""Slice embeddings for the browser: ``GET /volumes/{id}/slices/{k}/embedding`` (SAM's decoder in the page).

The API and the workers may run on different hosts and the embedding cache is per worker host, so a
worker *publishes* an embedding to the shared store: the ``sam``-queue job
:func:`workers.jobs.embedding.publish_embedding` takes it from its cache (or encodes the slice) and writes
one object ``volumes/{id}/embeddings/{model}/{locator}.bin`` (atomically; it goes with the volume). The
locator hashes what the API knows that fixes the embedding — model, the volume's content hash and
canonical array, the slice, the dataset window and :data:`FORMAT_VERSION` — so a re-uploaded volume, another
window or another model never serves stale bytes; the object's header carries the engine's own
``embedding_key`` (pixels digest, weights, preprocessing, backend), served as the ``ETag``.

Object layout: ``MAGIC`` + uint32 LE header length + UTF-8 JSON header + gzip(float16 LE, C order,
(1, 256, 64, 64)). The API sends the gzip bytes as they are with ``Content-Encoding: gzip`` (a browser's
``fetch`` and httpx inflate them) and the JSON header as ``X-Crowdsam-Embedding``.

Not ready yet: the API puts one job at the FRONT of the ``sam`` queue (a Redis ``SET NX`` mark per object
for ``CROWDSAM_EMBEDDING_REQUEST_TTL_S`` stops repeats; the job clears it) and answers 202 with
``Retry-After``. No job row: like pre-encoding this is best effort, a lost job is re-queued when the
mark expires.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth.security import Anyone, Principal
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.errors import Conflict, Forbidden, NotFound
from app.core.hashing import sha256_text
from app.core.http import etag_matches, stored_file
from app.core.redis import get_queue, get_redis
from app.core.responses import Id, errors
from app.core.storage import Storage, get_storage
from app.datasets.models import Dataset
from app.datasets.repository import DatasetRepository
from app.prompts.service import unassigned_slices
from app.segmentations import service as segmentation_service
from app.volumes import slices
from app.volumes.models import Volume
from app.volumes.repository import VolumeRepository

FORMAT_VERSION = "1"
MAGIC = b"CSEMB1\n"
QUEUE = "sam"
ENTRY = "workers.jobs.embedding.publish_embedding"
HEADER = "X-Crowdsam-Embedding"
RETRY_AFTER_S = 1
RESULT_TTL_S = 600
CACHE_CONTROL = "private, max-age=86400"
FAILED = "failed:"
API_PREFIX = "/api/v1"
DECODER_CACHE_CONTROL = "private, max-age=31536000, immutable"  # the id names the weights and exporter version

router = APIRouter(tags=["segmentations"])


def object_key(volume: Volume, dataset: Dataset, k: int, model: str) -> str:
    """Where the published embedding of slice ``k`` for ``model`` lives in the store (API and job agree)."""
    text = json.dumps({"v": FORMAT_VERSION, "model": model, "image": volume.sha256, "canonical": volume.canonical_key,
                       "slice": int(k), "window": [float(dataset.window_level), float(dataset.window_width)]},
                      sort_keys=True)
    return f"volumes/{volume.id}/embeddings/{model}/{sha256_text(text)[:32]}.bin"


def decoder_key(model: str, decoder_id: str) -> str:
    """Where a model's browser decoder (one ONNX file, published by the embedding job) lives in the store."""
    return f"models/{model}/decoders/{decoder_id}.onnx"


def decoder_url(model: str, decoder_id: str) -> str:
    return f"{API_PREFIX}/models/{model}/decoders/{decoder_id}.onnx"


def pack(header: dict[str, Any], gzipped: bytes) -> bytes:
    """One stored object: magic, header length, JSON header, gzip-compressed float16 embedding."""
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + gzipped


def unpack(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, gzip body) of a stored object; ValueError when it is not one."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise ValueError("not a crowdsam embedding object")
    (size,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(blob[start:start + size])
    if not isinstance(header, dict):
        raise ValueError("embedding header is not a JSON object")
    return header, blob[start + size:]


def _mark(key: str) -> str:
    return f"crowdsam:embedding:{key}"


def request(volume_id: int, k: int, model: str, key: str) -> bool:
    """Queue the publishing job at the front of the ``sam`` queue unless one was queued recently; True when
    queued now. A job that failed recently → 409 with its reason (until the mark expires)."""
    redis = get_redis()
    if not redis.set(_mark(key), "queued", nx=True, ex=get_settings().embedding_request_ttl_s):
        state = redis.get(_mark(key))
        text = state.decode(errors="replace") if isinstance(state, bytes) else str(state or "")
        if text.startswith(FAILED):
            raise Conflict(f"the {model} embedding of slice {k} could not be computed: {text[len(FAILED):]}")
        return False
    get_queue(QUEUE).enqueue(
        ENTRY, volume_id, k, model, at_front=True, job_timeout=get_settings().job_timeout_s,
        result_ttl=RESULT_TTL_S, failure_ttl=24 * 3600,
        description=f"publish the {model} embedding of slice {k} of volume {volume_id}")
    return True


def request_done(key: str) -> None:
    """The job published the object (or found it): the next request for it may queue again."""
    get_redis().delete(_mark(key))


def request_failed(key: str, reason: str) -> None:
    """The job failed: requests answer 409 with ``reason`` until the mark expires, then queue again."""
    get_redis().set(_mark(key), FAILED + reason[:300], ex=get_settings().embedding_request_ttl_s)


def check_slice_access(session: Any, principal: Principal, volume: Volume, k: int) -> None:
    """Staff: any slice of a dataset they can see (membership is checked by the router dependency);
    annotators: only a slice they hold a lease on (``GET /tasks/next``) or have already seen/prompted."""
    if not principal.is_annotator:
        return
    if not unassigned_slices(session, volume, principal.name, [k]):
        return
    raise Forbidden(f"annotators may fetch the embedding of a slice they were handed (GET /tasks/next) or have "
                    f"worked on; slice {k} of volume {volume.id} is not one of yours")


def read(storage: Storage, key: str) -> tuple[dict[str, Any], bytes] | None:
    """The published object (one GET), None while there is none."""
    try:
        blob = storage.read_bytes(key)
    except FileNotFoundError:
        return None
    return unpack(blob)


@router.get(
    "/volumes/{volume_id}/slices/{k}/embedding",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "float16 LE image embedding (1, 256, 64, 64), Content-Encoding: gzip; metadata "
                             f"in the {HEADER} JSON header"},
        202: {"description": "being computed: retry after Retry-After seconds",
              "content": {"application/json": {"schema": {
                  "type": "object", "properties": {"status": {"type": "string", "enum": ["pending"]}},
                  "required": ["status"]}}}},
        304: {"description": "Not Modified (If-None-Match matched the ETag)"},
        **errors(403, 404, 409, 422),
    },
)
def slice_embedding(
    volume_id: Id,
    k: int,
    request_: Request,
    session: SessionDep,
    principal: Anyone,
    model: Annotated[str, Query(max_length=64, description="model name (GET /models)")] = "litemedsam",
) -> Response:
    """The image embedding of display slice ``k`` for the browser's SAM prompt decoder.

    200: the float16 embedding, gzip-encoded, with ``X-Crowdsam-Embedding`` (model, shape, dtype,
    input_size, original_size, resized_size, scale, padding, frame, mask_threshold, ...), ``ETag`` (the
    engine's embedding key) and ``Cache-Control: private``; 202 ``{"status": "pending"}`` with
    ``Retry-After`` while a worker computes it (high priority). Annotators may fetch only slices they
    were handed by ``GET /tasks/next`` or have worked on (403 otherwise)."""
    segmentation_service.check_model(model)
    volume = VolumeRepository(session).get(volume_id)
    slices.check_slice(volume, k)
    check_slice_access(session, principal, volume, k)
    if volume.canonical_key is None:
        raise Conflict(f"volume {volume_id} is not ready yet")
    dataset = DatasetRepository(session).get(volume.dataset_id)
    key = object_key(volume, dataset, k, model)
    found = read(get_storage(), key)
    if found is None:
        request(volume_id, k, model, key)
        return JSONResponse({"status": "pending"}, status_code=status.HTTP_202_ACCEPTED,
                            headers={"Retry-After": str(RETRY_AFTER_S), "Cache-Control": "no-store"})
    header, body = found
    etag = f'"{header["etag"]}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, HEADER: json.dumps(header, separators=(",", ":"))}
    if etag_matches(request_.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(body, media_type="application/octet-stream", headers={**headers, "Content-Encoding": "gzip"})


@router.get(
    "/models/{model}/decoders/{decoder_id}.onnx",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "the ONNX prompt decoder (one file, weights inline) for onnxruntime-web"},
        304: {"description": "Not Modified (If-None-Match matched the ETag)"},
        **errors(403, 404, 422),
    },
)
def prompt_decoder(
    model: str,
    decoder_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                                    description="the id an embedding's X-Crowdsam-Embedding names (decoder.id)")],
    request_: Request,
    _: Anyone,
) -> Response:
    """The SAM prompt decoder the page runs on a slice embedding (inputs ``image_embeddings`` (1, 256, 64, 64),
    ``point_coords`` (B, N, 2) in the model frame, ``point_labels`` (B, N): 1/0 points, 2/3 box corners, -1
    padding; output (B, 1, 256, 256) low-res logits). Immutable: a new weights file or exporter gets a new id.
    404 until a worker has published it (it does with the model's first embedding)."""
    segmentation_service.check_model(model)
    storage = get_storage()
    key = decoder_key(model, decoder_id)
    if not storage.exists(key):
        raise NotFound(f"no {model} decoder {decoder_id!r} has been published: fetch a slice embedding first "
                       "(its X-Crowdsam-Embedding header names the current decoder)")
    return stored_file(key, media_type="application/octet-stream", headers={"Cache-Control": DECODER_CACHE_CONTROL},
                       etag=f'"{decoder_id}"', if_none_match=request_.headers.get("if-none-match"))
