"""``GET /volumes/{id}/slices/{k}/embedding``: a slice's SAM image embedding for the browser's decoder.

Access (annotators: only slices handed to them or worked on), 202 + one high-priority ``sam`` job until a
worker published it, then the gzip-encoded float16 embedding equal to the worker engine's own, with the
preprocessing metadata, ETag/304.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

K = 12


def _url(volume_id: int, k: int = K, model: str = "litemedsam") -> str:
    return f"/api/v1/volumes/{volume_id}/slices/{k}/embedding?model={model}"


def _embedding_jobs() -> list[tuple[object, ...]]:
    from app.core.redis import get_queue

    return [tuple(job.args) for job in get_queue("sam").get_jobs() if job.func_name.endswith(".publish_embedding")]


def test_needs_a_token_and_validates(client, tokens, sm_volume):  # type: ignore[no-untyped-def]
    vid, staff = sm_volume["id"], tokens.headers("researcher")
    assert client.get(_url(vid)).status_code == 401
    unknown = client.get(_url(vid, model="sam_vit_z"), headers=staff)
    assert unknown.status_code == 422 and "unknown model 'sam_vit_z'" in unknown.json()["detail"]
    n = sm_volume["n_slices"]
    out = client.get(_url(vid, k=n), headers=staff)
    assert out.status_code == 404 and f"slice {n} out of range" in out.json()["detail"]
    assert client.get(_url(vid, k=-1), headers=staff).status_code == 404
    assert client.get(_url(999_999), headers=staff).status_code == 404
    assert _embedding_jobs() == []


def test_annotators_get_only_their_slices_and_requests_queue_once(client, tokens, sm_volume):  # type: ignore[no-untyped-def]
    vid = sm_volume["id"]
    annotator = tokens.headers("annotator")
    refused = client.get(_url(vid), headers=annotator)
    assert refused.status_code == 403
    assert "GET /tasks/next" in refused.json()["detail"] and f"slice {K} of volume {vid}" in refused.json()["detail"]
    assert _embedding_jobs() == []

    task = client.get(f"/api/v1/tasks/next?dataset={sm_volume['dataset_id']}", headers=annotator)
    assert task.status_code == 200, task.text
    k = task.json()["slice"]
    assert task.json()["volume_id"] == vid
    first = client.get(_url(vid, k), headers=annotator)
    assert first.status_code == 202, first.text
    assert first.headers["retry-after"] == "1" and first.json() == {"status": "pending"}
    assert _embedding_jobs() == [(vid, k, "litemedsam")]
    # Asking again (the page polls) queues nothing more; another annotator's lease is not theirs.
    assert client.get(_url(vid, k), headers=annotator).status_code == 202
    assert _embedding_jobs() == [(vid, k, "litemedsam")]
    assert client.get(_url(vid, k), headers=tokens.headers("annotator2")).status_code == 403
    assert client.get(_url(vid, (k + 1) % sm_volume["n_slices"]), headers=annotator).status_code == 403
    # A slice they have worked on (prompted) stays theirs after the lease is gone.
    other = (k + 2) % sm_volume["n_slices"]
    posted = client.post(f"/api/v1/volumes/{vid}/prompts", headers=tokens.headers("annotator2"),
                         json={"boxes": [{"slice": other, "label": "liver", "box": [10, 10, 50, 50]}]})
    assert posted.status_code == 201, posted.text
    assert client.get(_url(vid, other), headers=tokens.headers("annotator2")).status_code == 202
    # Staff fetch any slice of a dataset they can see; the new request goes to the FRONT of the queue.
    staff_k = next(j for j in range(sm_volume["n_slices"]) if j not in (k, other))
    for role in ("researcher", "admin"):
        assert client.get(_url(vid, staff_k), headers=tokens.headers(role)).status_code == 202
    jobs = _embedding_jobs()
    assert len(jobs) == 3 and jobs[0][1] not in (k, other)  # the latest request is first in line


def test_a_failed_job_is_reported_not_polled_forever(client, tokens, sm_volume):  # type: ignore[no-untyped-def]
    from app.segmentations import embeddings

    vid, staff = sm_volume["id"], tokens.headers("researcher")
    assert client.get(_url(vid), headers=staff).status_code == 202
    key = embeddings.object_key(*_rows(vid), K, "litemedsam")
    embeddings.request_failed(key, "ModelUnavailable: no weights on this worker")
    failed = client.get(_url(vid), headers=staff)
    assert failed.status_code == 409 and "no weights on this worker" in failed.json()["detail"]
    embeddings.request_done(key)
    assert client.get(_url(vid), headers=staff).status_code == 202
    assert len(_embedding_jobs()) == 2


def _rows(volume_id: int) -> tuple[object, object]:
    from app.core.db import session_scope
    from app.datasets.models import Dataset
    from app.volumes.models import Volume

    with session_scope() as session:
        volume = session.get(Volume, volume_id)
        assert volume is not None
        dataset = session.get(Dataset, volume.dataset_id)
        session.expunge_all()
    return volume, dataset


@pytest.mark.model
def test_the_published_embedding_is_the_engines(client, tokens, sm_volume, run_jobs):  # type: ignore[no-untyped-def]
    from app.core.storage import get_storage
    from app.imaging.coords import display_slice
    from app.volumes.slices import canonical_array
    from workers.sam.engine import get_engine

    vid, staff = sm_volume["id"], tokens.headers("researcher")
    assert client.get(_url(vid), headers=staff).status_code == 202
    assert run_jobs("sam")
    assert _embedding_jobs() == []
    got = client.get(_url(vid), headers=staff)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-encoding"] == "gzip"
    assert got.headers["cache-control"] == "private, max-age=86400"
    meta = json.loads(got.headers["x-crowdsam-embedding"])
    assert meta["shape"] == [1, 256, 64, 64] and meta["dtype"] == "float16"
    array = np.frombuffer(got.content, dtype="<f2").reshape(meta["shape"])
    compressed = int(got.headers["content-length"])
    assert compressed == meta["bytes"] < array.nbytes == meta["fp16_bytes"] == meta["fp32_bytes"] // 2
    print(f"\nlitemedsam slice {K}: {compressed} bytes gzip fp16 (fp16 raw {array.nbytes}, fp32 {meta['fp32_bytes']})")

    # The worker engine's own embedding of that slice (a fresh encoder pass), within fp16 rounding.
    volume, dataset = _rows(vid)
    window = (float(dataset.window_level), float(dataset.window_width))  # type: ignore[attr-defined]
    display = np.asarray(display_slice(canonical_array(get_storage(), volume.canonical_key), K))  # type: ignore[attr-defined]
    engine = get_engine("litemedsam")
    ref = engine.encode(display, window).cpu().numpy()
    assert ref.shape == array.shape
    np.testing.assert_allclose(array.astype(np.float32), ref, rtol=2**-10, atol=1e-6)
    assert not np.array_equal(array, np.zeros_like(array))

    # Metadata: the display slice, resized by its longest side into the 256 input, padded bottom/right.
    h, w = display.shape[:2]
    scale = 256 / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    assert meta["input_size"] == 256 and meta["original_size"] == [h, w] and meta["resized_size"] == [rh, rw]
    assert meta["scale"] == [rw / w, rh / h]
    assert meta["padding"] == {"top": 0, "left": 0, "bottom": 256 - rh, "right": 256 - rw}
    assert meta["frame"] == "display" and meta["mask_threshold"] == 0.0 and meta["resize"] == "longest-side"
    key = engine.embedding_key(volume.sha256, K, _digest(display), window)  # type: ignore[attr-defined]
    assert got.headers["etag"] == f'"{key}"'

    # Conditional GET, and a published embedding queues nothing.
    again = client.get(_url(vid), headers={**staff, "If-None-Match": got.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get(_url(vid), headers=staff).status_code == 200
    assert _embedding_jobs() == []

    # The decoder the header names is served (one ONNX file, any token) and, run by ONNX Runtime on the
    # fp16 embedding from the wire, gives the worker engine's mask for a box (the browser runs this graph).
    decoder = meta["decoder"]
    assert decoder["url"] == f"/api/v1/models/litemedsam/decoders/{decoder['id']}.onnx"
    annotator = tokens.headers("annotator")
    served = client.get(decoder["url"], headers=annotator)
    assert served.status_code == 200 and served.headers["cache-control"].endswith("immutable")
    assert len(served.content) == decoder["bytes"] and hashlib.sha256(served.content).hexdigest() == decoder["sha256"]
    assert client.get(decoder["url"], headers={**annotator, "If-None-Match": served.headers["etag"]}).status_code == 304
    assert client.get(decoder["url"]).status_code == 401
    missing = client.get("/api/v1/models/litemedsam/decoders/nope-e0.onnx", headers=annotator)
    assert missing.status_code == 404 and "fetch a slice embedding first" in missing.json()["detail"]
    assert client.get("/api/v1/models/litemedsam/decoders/..%2Fx.onnx", headers=annotator).status_code in (404, 422)
    _check_decoder(served.content, array, meta, engine, display, window)


def _check_decoder(onnx_bytes: bytes, array: np.ndarray, meta: dict, engine, display, window) -> None:  # type: ignore[no-untyped-def,type-arg]
    import onnxruntime as ort
    import torch

    from workers.sam.decode import DecodePrompt, prompt_tokens

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    h, w = meta["original_size"]
    prompts = [DecodePrompt(box=(w * 0.3, h * 0.3, w * 0.6, h * 0.7)),
               DecodePrompt(box=(w * 0.3, h * 0.3, w * 0.6, h * 0.7), points=((w * 0.45, h * 0.5),),
                            point_labels=(0,))]
    for prompt in prompts:
        coords, labels = prompt_tokens(engine.model, [prompt], (h, w))
        # The browser's recipe: display pixels × scale → model frame (what prompt_tokens does for this family).
        np.testing.assert_allclose(coords[0, -2:].reshape(-1, 2),
                                   np.array(prompt.box).reshape(2, 2) * np.array(meta["scale"]), rtol=1e-5)
        (low_res,) = session.run(None, {"image_embeddings": array.astype(np.float32), "point_coords": coords,
                                        "point_labels": labels})
        _, mask = engine.model.family.postprocess(torch.from_numpy(low_res), (h, w), engine.model.sam)
        _, expected = engine.backend.decode(engine.encode(display, window), [prompt], (h, w))
        got, want = mask.numpy().astype(bool).reshape(h, w), np.asarray(expected).astype(bool).reshape(h, w)
        agreement = float((got == want).mean())
        assert agreement >= 0.999 and want.any(), (agreement, int(want.sum()))


def _digest(display: np.ndarray) -> str:
    from workers.sam.plan import slice_digest

    return slice_digest(display)
