"""SegmentationEngine: crowd prompts on display slices → one fused label map on the canonical grid.

Per prompted slice: embedding from cache or ONE encoder pass; all prompts of the slice in ONE
decoder call; per label, each annotator's masks united, annotators fused (majority/STAPLE/union),
overlaps between labels resolved by model probability; the display label map is placed back with
``display_to_canonical_slice``. A slice whose (pixels, prompts, model, preprocessing, fusion,
labels) were decoded before comes from the decode cache without touching the model, so a rerun
with one added box encodes 0 slices and decodes 1.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from app.core.config import get_settings
from app.core.hashing import sha256_bytes
from app.imaging.coords import display_slice, display_to_canonical_slice
from workers.sam import fusion
from workers.sam.cache import ArrayCache, make_key
from workers.sam.decode import DecodePrompt, decode, encode
from workers.sam.models import LoadedModel, load_model

ENGINE_VERSION = "2"  # bump when decoded masks may change (2: CPU decoding in chunks)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PromptIn:
    annotator: str
    label: str
    kind: Literal["box", "point"]
    coords: tuple[float, ...]  # box (x0, y0, x1, y1) / point (x, y), display pixels of slice k
    positive: bool = True


@dataclass
class SegmentationOutput:
    labels: npt.NDArray[np.integer]
    prompted_slices: list[int]
    per_slice: dict[int, dict[str, dict[str, object]]]
    encoded: int
    decoded: int
    timings: dict[str, float] = field(default_factory=dict)


def _prompt_sort_key(p: PromptIn) -> tuple[object, ...]:
    return (p.label, p.annotator, p.kind, tuple(float(c) for c in p.coords), not p.positive)


def _validate(prompt: PromptIn, k: int) -> None:
    n = 4 if prompt.kind == "box" else 2 if prompt.kind == "point" else -1
    if n < 0:
        raise ValueError(f"slice {k}: prompt kind must be 'box' or 'point', got {prompt.kind!r}")
    if len(prompt.coords) != n or not all(np.isfinite(float(c)) for c in prompt.coords):
        raise ValueError(f"slice {k}: a {prompt.kind} needs {n} finite coordinates, got {prompt.coords!r}")
    if prompt.kind == "box":
        x0, y0, x1, y1 = (float(c) for c in prompt.coords)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"slice {k}: box {prompt.coords!r} is empty (need x0 < x1 and y0 < y1)")


def decode_items(prompts: list[PromptIn]) -> list[tuple[str, str, DecodePrompt]]:
    """(label, annotator, decoder prompt) per box; an annotator's points for a label join each of
    their boxes for it, or form one prompt when they drew no box."""
    grouped: dict[tuple[str, str], list[PromptIn]] = defaultdict(list)
    for p in sorted(prompts, key=_prompt_sort_key):
        grouped[(p.label, p.annotator)].append(p)
    items = []
    for (label, annotator), group in sorted(grouped.items()):
        points = tuple((float(p.coords[0]), float(p.coords[1])) for p in group if p.kind == "point")
        point_labels = tuple(1 if p.positive else 0 for p in group if p.kind == "point")
        boxes = [p for p in group if p.kind == "box"]
        if boxes:
            for b in boxes:
                box = (float(b.coords[0]), float(b.coords[1]), float(b.coords[2]), float(b.coords[3]))
                items.append((label, annotator, DecodePrompt(box, points, point_labels)))
        else:
            items.append((label, annotator, DecodePrompt(None, points, point_labels)))
    return items


def fuse_slice(items: list[tuple[str, str]], probs: npt.NDArray[np.float32], masks: npt.NDArray[np.bool_],
               label_values: dict[str, int], method: str) -> tuple[npt.NDArray[np.int64], dict[str, dict[str, object]]]:
    """Per label: unite each annotator's masks, fuse annotators, then resolve overlaps by probability."""
    by_label: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, (label, annotator) in enumerate(items):
        by_label[label][annotator].append(index)
    labels = sorted(by_label, key=lambda name: (label_values[name], name))
    fused_masks, confidences = [], []
    stats: dict[str, dict[str, object]] = {}
    for label in labels:
        annotators = sorted(by_label[label])
        own_masks = [fusion.unite([masks[i] for i in by_label[label][a]]) for a in annotators]
        own_probs = [np.max(probs[by_label[label][a]], axis=0) for a in annotators]
        fused = fusion.fuse(own_masks, method)
        fused_masks.append(fused.mask)
        confidences.append(np.mean(own_probs, axis=0))
        stats[label] = {"annotators": annotators,
                        "agreement": {a: float(d) for a, d in zip(annotators, fused.agreement, strict=True)}}
    label_map = fusion.resolve_overlaps(fused_masks, confidences, [label_values[name] for name in labels])
    for label, confidence in zip(labels, confidences, strict=True):
        final = label_map == label_values[label]
        stats[label]["score"] = float(confidence[final].mean()) if final.any() else 0.0
        stats[label]["pixels"] = int(final.sum())
    return label_map, stats


def _digest(array: npt.NDArray[np.generic]) -> str:
    data = np.ascontiguousarray(array)
    return sha256_bytes(f"{data.dtype.str}{data.shape}".encode() + data.tobytes())[:32]


def choose_device(device: str | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_torch(device: torch.device, threads: int | None) -> None:
    """CPU: explicit thread count; CUDA: deterministic kernels (bit-identical reruns)."""
    if device.type == "cpu":
        count = threads or get_settings().torch_threads or os.cpu_count() or 1
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


class SegmentationEngine:
    """One loaded model plus its caches. Thread-safe for sequential use per instance (a lock)."""

    def __init__(self, model: str = "litemedsam", *, device: str | None = None, cache_dir: Path | None = None,
                 threads: int | None = None, loaded: LoadedModel | None = None, weights_id: str | None = None,
                 precision: str = "fp32", checkpoint_dir: Path | None = None) -> None:
        """``loaded``/``weights_id``: use an already built model (tests build the ViT architectures with
        random weights); otherwise the registry's verified weights are loaded (ModelUnavailable if not)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        settings = get_settings()
        self.device = choose_device(device)
        configure_torch(self.device, threads)
        self.precision = precision if self.device.type == "cuda" else "fp32"
        if loaded is None:
            from app.segmentations import registry

            loaded = load_model(model, device=self.device, checkpoint_dir=checkpoint_dir)
            info = registry.model_info(model, checkpoint_dir)
            weights_id = weights_id or (registry.file_sha256(Path(info.checkpoint))[:16] if info.checkpoint else None)
        else:
            loaded.sam.to(self.device).eval()
        self.model = loaded
        self.name = model
        self.weights_id = weights_id or f"unnamed-{id(loaded)}"
        root = Path(cache_dir) if cache_dir is not None else settings.cache_dir
        self.embeddings = ArrayCache(root / "embeddings", max_entries=settings.embedding_cache_entries,
                                     max_bytes=settings.embedding_cache_bytes)
        self.decoded = ArrayCache(root / "decoded", max_entries=4096,
                                  max_bytes=max(settings.embedding_cache_bytes // 8, 1))
        self._lock = threading.Lock()

    # --- keys -----------------------------------------------------------------------------------
    def signature(self, window: tuple[float, float]) -> str:
        return f"{self.model.family.signature(window)}:{self.precision}"

    def embedding_key(self, image_id: str, k: int, slice_digest: str, window: tuple[float, float]) -> str:
        return make_key(kind="embedding", image=image_id, slice=k, pixels=slice_digest, model=self.name,
                        weights=self.weights_id, prep=self.signature(window))

    # --- model steps ----------------------------------------------------------------------------
    def encode(self, display: npt.NDArray[np.generic], window: tuple[float, float]) -> torch.Tensor:
        if self.precision != "fp32":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                return encode(self.model, display, window).float()
        return encode(self.model, display, window)

    # --- the job --------------------------------------------------------------------------------
    def segment(self, canonical: npt.NDArray[np.generic], *, window: tuple[float, float], image_id: str,
                prompts: dict[int, list[PromptIn]], label_values: dict[str, int], fusion: str = "majority",
                progress: Callable[[int, int], None] | None = None) -> SegmentationOutput:
        with self._lock:
            return self._segment(canonical, window, image_id, prompts, label_values, fusion, progress)

    def _segment(self, canonical: npt.NDArray[np.generic], window: tuple[float, float], image_id: str,
                 prompts: dict[int, list[PromptIn]], label_values: dict[str, int], method: str,
                 progress: Callable[[int, int], None] | None) -> SegmentationOutput:
        started = time.perf_counter()
        if canonical.ndim != 3:
            raise ValueError(f"canonical volume must be 3D, got shape {canonical.shape}")
        if method not in fusion.FUSION_METHODS:
            raise ValueError(f"unknown fusion method {method!r}; expected one of {', '.join(fusion.FUSION_METHODS)}")
        window = (float(window[0]), float(window[1]))
        n_slices = canonical.shape[2]
        todo = {int(k): list(v) for k, v in prompts.items() if v}
        for k, given in todo.items():
            if not 0 <= k < n_slices:
                raise ValueError(f"slice {k} is outside the volume (0..{n_slices - 1})")
            for p in given:
                if p.label not in label_values:
                    raise ValueError(f"slice {k}: label {p.label!r} is not one of {sorted(label_values)}")
                _validate(p, k)
        max_value = max(label_values.values(), default=0)
        dtype = np.uint8 if max_value <= 255 else np.uint16
        labels = np.zeros(canonical.shape, dtype=dtype)
        per_slice: dict[int, dict[str, dict[str, object]]] = {}
        timings = {"encoder_s": 0.0, "decoder_s": 0.0, "fusion_s": 0.0, "cache_s": 0.0}
        encoded = decoded = 0
        order = sorted(todo)
        for done, k in enumerate(order, start=1):
            display = display_slice(canonical, k)
            slice_digest = _digest(display)
            items = decode_items(todo[k])
            used = {label: label_values[label] for label, _, _ in items}
            decode_key = make_key(kind="decoded", v=ENGINE_VERSION, image=image_id, slice=k, pixels=slice_digest,
                                  model=self.name, weights=self.weights_id, prep=self.signature(window),
                                  fusion=method, labels=used,
                                  prompts=[[label, annotator, p.box, p.points, p.point_labels]
                                           for label, annotator, p in items])
            t = time.perf_counter()
            record = self.decoded.get(decode_key)
            timings["cache_s"] += time.perf_counter() - t
            if record is not None:
                label_map = record["labels"]
                stats = json.loads(bytes(record["stats"]).decode())
            else:
                emb_key = self.embedding_key(image_id, k, slice_digest, window)
                t = time.perf_counter()
                cached = self.embeddings.get(emb_key)
                timings["cache_s"] += time.perf_counter() - t
                if cached is None:
                    t = time.perf_counter()
                    embedding = self.encode(display, window)
                    timings["encoder_s"] += time.perf_counter() - t
                    encoded += 1
                    t = time.perf_counter()
                    self.embeddings.put(emb_key, {"embedding": embedding.cpu().numpy()})
                    timings["cache_s"] += time.perf_counter() - t
                else:
                    embedding = torch.from_numpy(cached["embedding"]).to(self.device)
                t = time.perf_counter()
                probs, masks = decode(self.model, embedding, [p for _, _, p in items],
                                      (display.shape[0], display.shape[1]))
                timings["decoder_s"] += time.perf_counter() - t
                decoded += 1
                t = time.perf_counter()
                full_map, stats = fuse_slice([(label, a) for label, a, _ in items], probs, masks, label_values, method)
                label_map = full_map.astype(dtype)
                timings["fusion_s"] += time.perf_counter() - t
                t = time.perf_counter()
                payload = np.frombuffer(json.dumps(stats, sort_keys=True).encode(), dtype=np.uint8)
                self.decoded.put(decode_key, {"labels": label_map, "stats": payload})
                timings["cache_s"] += time.perf_counter() - t
            labels[:, :, k] = display_to_canonical_slice(np.asarray(label_map, dtype=dtype))
            per_slice[k] = stats
            if progress is not None:
                progress(done, len(order))
        timings["total_s"] = time.perf_counter() - started
        return SegmentationOutput(labels, order, per_slice, encoded, decoded, timings)


_engines: dict[str, SegmentationEngine] = {}
_engines_lock = threading.Lock()


def get_engine(model: str) -> SegmentationEngine:
    """One engine per process and model: weights load once (raises ModelUnavailable/KeyError)."""
    with _engines_lock:
        engine = _engines.get(model)
        if engine is None:
            engine = SegmentationEngine(model)
            _engines[model] = engine
        return engine
