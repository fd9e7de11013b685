"""SegmentationEngine: crowd prompts on display slices → one fused label map on the canonical grid.

The engine reads as its stages (the MONAI Label shape: pre-transforms → inferer → post-transforms
→ writer), each a small unit with its own tests, timed by one :class:`StageTimer`:

1. **plan** (:mod:`workers.sam.plan`): check the request; per prompted slice the decoder prompts,
   the voters (everyone who saw it) and the two cache keys;
2. **embed** (:class:`Embedder`): the slice's image embedding from the cache or ONE encoder pass of
   the backend (torch or ONNX Runtime, :mod:`workers.sam.backends`);
3. **decode**: each prompt's decoder output from the prompt cache, the missing ones through the
   backend's ``decode``, batched by token layout (``predecode`` fills the cache while the crowd draws);
4. **fuse** (:func:`workers.sam.fusion.fuse_slice`): per label, voters fused with negative evidence,
   overlaps resolved by model probability;
5. **place**: the display label map back on the canonical grid (``display_to_canonical_slice``).

A slice whose (pixels, prompts, voters, model, preprocessing, fusion, labels) were decoded before
comes from the decode cache without touching the model, so a rerun with one added box encodes 0
slices and decodes 1. Multi-slice GPU batching plugs in at ``embed``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from app.core.config import get_settings
from app.imaging.coords import display_slice, display_to_canonical_slice
from workers.sam import fusion
from workers.sam.backends import Backend, OnnxBackend, TorchBackend, resolve_backend
from workers.sam.cache import ArrayCache, make_key
from workers.sam.decode import DecodePrompt
from workers.sam.fusion import Reliability
from workers.sam.models import LoadedModel, load_model
from workers.sam.onnx_export import EXPORTER_VERSION, web_decoder
from workers.sam.plan import (
    ENGINE_VERSION,
    ModelIdentity,
    PromptIn,
    SlicePlan,
    decode_items,
    embedding_key,
    plan,
    slice_digest,
)
from workers.sam.timing import StageTimer

__all__ = ["PRECISIONS", "Embedder", "PromptIn", "SegmentationEngine", "SegmentationOutput", "get_engine"]

PRECISIONS = ("fp32", "bf16", "fp16")
MAX_ENCODE_BATCH = 32  # slices per encoder call on CUDA (Embedder.batch_size)
STAGES = ("plan", "cache", "encoder", "decoder", "fusion", "place")


@dataclass
class SegmentationOutput:
    labels: npt.NDArray[np.integer]
    prompted_slices: list[int]  # slices with crowd prompts
    per_slice: dict[int, dict[str, dict[str, object]]]
    encoded: int
    decoded: int
    timings: dict[str, float] = field(default_factory=dict)
    derived_slices: list[int] = field(default_factory=list)  # gap-filled slices (``fill_gaps``)


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


class Embedder:
    """Stage 2: image embeddings of display slices, cached by :func:`workers.sam.plan.embedding_key`."""

    def __init__(self, backend: Backend, device: torch.device, cache: ArrayCache) -> None:
        self.backend, self.device, self.cache = backend, device, cache
        self.encoded = 0
        self._batch: int | None = None

    def embed(self, key: str, display: npt.NDArray[np.generic], window: tuple[float, float],
              timer: StageTimer) -> torch.Tensor:
        with timer.stage("cache"):
            cached = self.cache.get(key)
        if cached is not None:
            return torch.from_numpy(cached["embedding"]).to(self.device)
        with timer.stage("encoder"):
            embedding = self.backend.encode(display, window)
        self._store({key: embedding}, timer)
        return embedding

    def embed_many(self, slices: Mapping[str, npt.NDArray[np.generic]], window: tuple[float, float],
                   timer: StageTimer) -> dict[str, torch.Tensor]:
        """Embeddings of the uncached slices (key → display), encoded :meth:`batch_size` at a time."""
        with timer.stage("cache"):
            missing = [key for key in slices if key not in self.cache]
        size = self.batch_size(window) if missing else 1
        out: dict[str, torch.Tensor] = {}
        for start in range(0, len(missing), size):
            keys = missing[start:start + size]
            with timer.stage("encoder"):
                embeddings = self.backend.encode_batch([slices[key] for key in keys], window)
            fresh = {key: embeddings[i:i + 1] for i, key in enumerate(keys)}
            self._store(fresh, timer)
            out.update(fresh)
        return out

    def batch_size(self, window: tuple[float, float]) -> int:
        """Slices per encoder call: 1 on CPU; on CUDA as many as 60 % of the free memory holds, by one
        slice's peak activation memory measured once (at most :data:`MAX_ENCODE_BATCH`)."""
        if self.device.type != "cuda":
            return 1
        if self._batch is None:
            side = self.backend.model.family.img_size
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.backend.encode_batch([np.zeros((side, side), dtype=np.float32)], window)
            torch.cuda.synchronize(self.device)
            per_slice = max(torch.cuda.max_memory_allocated(self.device) - before, 1)
            free, _total = torch.cuda.mem_get_info(self.device)
            self._batch = int(max(1, min(MAX_ENCODE_BATCH, free * 0.6 // per_slice)))
        return self._batch

    def _store(self, embeddings: Mapping[str, torch.Tensor], timer: StageTimer) -> None:
        self.encoded += len(embeddings)
        with timer.stage("cache"):
            for key, embedding in embeddings.items():
                self.cache.put(key, {"embedding": embedding.cpu().numpy()})


class SegmentationEngine:
    """One loaded model plus its caches. Thread-safe for sequential use per instance (a lock)."""

    def __init__(self, model: str = "litemedsam", *, device: str | None = None, cache_dir: Path | None = None,
                 threads: int | None = None, loaded: LoadedModel | None = None, weights_id: str | None = None,
                 precision: str = "fp32", checkpoint_dir: Path | None = None, backend: str | None = None,
                 onnx_dir: Path | None = None) -> None:
        """``loaded``/``weights_id``: use an already built model (tests build the ViT architectures with
        random weights); otherwise the registry's verified weights are loaded (ModelUnavailable if not).
        ``backend``: auto/torch/onnx (default ``CROWDSAM_BACKEND``, :func:`resolve_backend`); ONNX models
        are exported on first use into ``onnx_dir`` (default ``CROWDSAM_ONNX_DIR`` or ``<cache>/onnx``)."""
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
        self.prompt_masks = ArrayCache(root / "prompts", max_entries=4096,
                                       max_bytes=max(settings.embedding_cache_bytes // 4, 1))
        kind = resolve_backend(backend or settings.backend, self.device)
        self.onnx_dir = Path(onnx_dir or settings.onnx_dir or root / "onnx")
        self.backend: Backend = TorchBackend(self.model, self.device, self.precision) if kind == "torch" else (
            OnnxBackend.export(self.model, self.onnx_dir, self.weights_id, torch.get_num_threads()))
        self.embedder = Embedder(self.backend, self.device, self.embeddings)
        self._lock = threading.Lock()

    @property
    def decoder_id(self) -> str:
        """Names the browser's decoder file: the weights and the exporter version fix its graph."""
        return f"{self.weights_id}-e{EXPORTER_VERSION}"

    def web_decoder(self) -> Path:
        """The prompt decoder as one ONNX file for onnxruntime-web (exported once per weights)."""
        with self._lock:
            return web_decoder(self.model.sam, self.onnx_dir, self.name, self.weights_id)

    def identity(self, window: tuple[float, float]) -> ModelIdentity:
        prep = f"{self.model.family.signature(window)}:{self.precision}:{self.backend.tag}"
        return ModelIdentity(self.name, self.weights_id, prep)

    def embedding_key(self, image_id: str, k: int, slice_digest: str, window: tuple[float, float]) -> str:
        return embedding_key(self.identity(window), image_id, k, slice_digest)

    def encode(self, display: npt.NDArray[np.generic], window: tuple[float, float]) -> torch.Tensor:
        return self.backend.encode(display, window)

    def preencode(self, canonical: npt.NDArray[np.generic], *, window: tuple[float, float], image_id: str,
                  slices: Iterable[int]) -> int:
        """Fill the embedding cache for ``slices`` (the pre-encoding job, before anyone asks for masks);
        returns how many slices were encoded now (the others were cached)."""
        with self._lock:
            window = (float(window[0]), float(window[1]))
            identity, before = self.identity(window), self.embedder.encoded
            displays = {}
            for k in sorted(set(slices)):
                if not 0 <= k < canonical.shape[2]:
                    raise ValueError(f"slice {k} is outside the volume's {canonical.shape[2]} axial slices")
                display = display_slice(canonical, k)
                displays[embedding_key(identity, image_id, k, slice_digest(display))] = display
            self.embedder.embed_many(displays, window, StageTimer(*STAGES))
            return self.embedder.encoded - before

    def segment(self, canonical: npt.NDArray[np.generic], *, window: tuple[float, float], image_id: str,
                prompts: Mapping[int, list[PromptIn]], label_values: Mapping[str, int], fusion: str = "majority",
                views: Mapping[int, Iterable[str]] | None = None,
                reliability: Mapping[str, Reliability] | None = None, fill_gaps: int = 0,
                progress: Callable[[int, int], None] | None = None) -> SegmentationOutput:
        """``views``: slice → annotators who saw it without necessarily prompting (their silence votes
        "absent"); ``reliability``: annotator → (sensitivity, specificity) for ``fusion="weighted"``;
        ``fill_gaps``: derived boxes on unknown slices in gaps of at most that many slices between two
        prompted slices of an organ (:func:`workers.sam.plan.gap_prompts`), flagged ``derived``."""
        with self._lock:
            timer = StageTimer(*STAGES)
            window = (float(window[0]), float(window[1]))
            with timer.stage("plan"):
                plans = plan(canonical, image_id=image_id, model=self.identity(window), prompts=prompts,
                             label_values=label_values, method=fusion, views=views,
                             weights=reliability if fusion == "weighted" else None, fill_gaps=fill_gaps)
            dtype = np.uint8 if max(label_values.values(), default=0) <= 255 else np.uint16
            labels = np.zeros(canonical.shape, dtype=dtype)
            per_slice: dict[int, dict[str, dict[str, object]]] = {}
            encoded_before, decoded = self.embedder.encoded, 0
            ready: dict[str, torch.Tensor] = {}
            if self.device.type == "cuda":  # the slices the decoder will need, encoded in batches first
                with timer.stage("cache"):
                    todo = {p.embedding_key: p.display for p in plans
                            if p.items and p.decoded_key not in self.decoded}
                ready = self.embedder.embed_many(todo, window, timer)
            for done, slice_plan in enumerate(plans, start=1):
                label_map, stats, fresh = self._slice(slice_plan, window, label_values, fusion, reliability, timer,
                                                      ready)
                decoded += fresh
                with timer.stage("place"):
                    labels[:, :, slice_plan.k] = display_to_canonical_slice(np.asarray(label_map, dtype=dtype))
                if slice_plan.derived:
                    stats = {label: {**values, "derived": True} for label, values in stats.items()}
                per_slice[slice_plan.k] = stats
                if progress is not None:
                    progress(done, len(plans))
            return SegmentationOutput(labels, [p.k for p in plans if not p.derived], per_slice,
                                      self.embedder.encoded - encoded_before, decoded, timer.report(),
                                      [p.k for p in plans if p.derived])

    def _slice(self, slice_plan: SlicePlan, window: tuple[float, float], label_values: Mapping[str, int],
               method: str, reliability: Mapping[str, Reliability] | None, timer: StageTimer,
               ready: Mapping[str, torch.Tensor],
               ) -> tuple[npt.NDArray[np.integer], dict[str, dict[str, object]], int]:
        """One slice's label map and stats, and 1 when the decoder ran for it now (0: every prompt's output,
        or the fused slice, came from a cache)."""
        shape = slice_plan.display.shape[:2]
        if not slice_plan.items:  # only negative points outside any box: nothing to decode
            return np.zeros(shape, dtype=np.int64), {}, 0
        with timer.stage("cache"):
            record = self.decoded.get(slice_plan.decoded_key)
        if record is not None:
            return record["labels"], json.loads(bytes(record["stats"]).decode()), 0
        probs, masks, fresh = self._prompt_masks(slice_plan.embedding_key, slice_plan.display,
                                                 [i.prompt for i in slice_plan.items], window, timer, ready)
        with timer.stage("fusion"):
            label_map, stats = fusion.fuse_slice(
                [(i.label, i.annotator) for i in slice_plan.items], probs, masks, voters=slice_plan.voters,
                label_values=label_values, method=method, reliability=reliability if method == "weighted" else None)
        with timer.stage("cache"):
            payload = np.frombuffer(json.dumps(stats, sort_keys=True).encode(), dtype=np.uint8)
            self.decoded.put(slice_plan.decoded_key, {"labels": label_map.astype(np.uint16), "stats": payload})
        return label_map, stats, fresh


    def _prompt_masks(self, embedding_key: str, display: npt.NDArray[np.generic], prompts: list[DecodePrompt],
                      window: tuple[float, float], timer: StageTimer, ready: Mapping[str, torch.Tensor],
                      ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], int]:
        """Each prompt's decoder output from the prompt cache, decoding (and caching) only the missing ones;
        a slice whose prompts are all cached needs neither its embedding nor the decoder. The last value is
        1 when the decoder ran."""
        keys = [prompt_key(embedding_key, prompt) for prompt in prompts]
        with timer.stage("cache"):
            records = [self.prompt_masks.get(key) for key in keys]
        missing = [i for i, record in enumerate(records) if record is None]
        if missing:
            embedding = ready.get(embedding_key)
            if embedding is None:
                embedding = self.embedder.embed(embedding_key, display, window, timer)
            with timer.stage("decoder"):
                probs, masks = self.backend.decode(embedding, [prompts[i] for i in missing], display.shape[:2])
            with timer.stage("cache"):
                for j, i in enumerate(missing):
                    record = {"probs": probs[j], "mask": masks[j]}
                    self.prompt_masks.put(keys[i], record)
                    records[i] = record
        return (np.stack([r["probs"] for r in records if r is not None]),
                np.stack([r["mask"] for r in records if r is not None]), int(bool(missing)))

    def predecode(self, canonical: npt.NDArray[np.generic], *, window: tuple[float, float], image_id: str,
                  prompts: Mapping[int, list[PromptIn]]) -> int:
        """Decode and cache every prompt not decoded yet (the background job while the crowd draws), so
        a later request only fuses; returns how many slices needed the decoder now."""
        with self._lock:
            window = (float(window[0]), float(window[1]))
            identity, timer, decoded = self.identity(window), StageTimer(*STAGES), 0
            for k, slice_prompts in sorted(prompts.items()):
                if not 0 <= k < canonical.shape[2]:
                    raise ValueError(f"slice {k} is outside the volume's {canonical.shape[2]} axial slices")
                items = decode_items(slice_prompts)
                if not items:
                    continue
                display = display_slice(canonical, k)
                key = embedding_key(identity, image_id, k, slice_digest(display))
                decoded += self._prompt_masks(key, display, [i.prompt for i in items], window, timer, {})[2]
            return decoded


def prompt_key(embedding_key: str, prompt: DecodePrompt) -> str:
    """One prompt's decoder output: its slice's embedding (pixels, model, preprocessing, backend) + the prompt."""
    return make_key(kind="prompt", embedding=embedding_key, box=prompt.box, points=prompt.points,
                    labels=prompt.point_labels, version=ENGINE_VERSION)


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
