"""Benchmark the SAM engine on the shared CT with a simulated 3-annotator crowd, torch vs ONNX Runtime.

One run, the same prompts for every backend (``--backends``, default torch and onnx): per backend the
pure encoder time of the prompted slices, a cold segmentation (empty caches) with its encoder and
decoder seconds, the ratio total / pure encoder (target <= 1.15 on CPU for the default backend) and
the decoder's ms per box; the per-slice Dice between the backends' masks. Then, on the default
backend (``CROWDSAM_BACKEND``, auto = ONNX Runtime on CPU): the rerun after one new box (encodes 0,
decodes 1), the naive pipeline that re-encodes the slice per box (same masks, asserted), request →
mask cold vs after the crowd round's pre-encoding (``SegmentationEngine.preencode``) and after
pre-encoding plus pre-decoding (``SegmentationEngine.predecode``; both what the ``preencode`` queue
runs while the crowd draws), decoder ms/box per chunk size (``--chunks``), the idle CPU of the loaded
engine over 30 s, per-organ Dice against the reference masks, and as its last line

    segment backend_speedup=S total_over_encoder=R request_to_mask_prewarmed_s=T idle_worker_cpu_pct=C

with S = torch total / ONNX Runtime total (cold runs), R and T (pre-encoded + pre-decoded) for the
default backend.

    .venv/bin/python bench/segment.py [--slices N] [--naive-slices M] [--threads T] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.runtime import configure_process  # noqa: E402

configure_process(runs_models=True)  # before torch loads OpenMP

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from app.core.config import get_settings  # noqa: E402
from app.imaging.coords import Orientation, display_slice, display_to_canonical_slice  # noqa: E402
from app.imaging.metrics import dice  # noqa: E402
from app.prompts.simulate import simulate_crowd  # noqa: E402
from app.segmentations import registry  # noqa: E402
from workers.sam.backends import OnnxBackend, resolve_backend  # noqa: E402
from workers.sam.decode import DecodePrompt, decode  # noqa: E402
from workers.sam.engine import PromptIn, SegmentationEngine, SegmentationOutput, choose_device  # noqa: E402
from workers.sam.fusion import fuse_slice  # noqa: E402
from workers.sam.models import load_model  # noqa: E402
from workers.sam.plan import decode_items  # noqa: E402

CT = ROOT / "data" / "samples" / "totalsegmentator"
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52}
WINDOW = (40.0, 400.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def example_ct_crowd(annotators: int = 3, jitter: float = 0.05, seed: int = 0, slices: int = 0,
                     ) -> tuple[np.ndarray, np.ndarray, dict[int, list[PromptIn]]]:
    """example_ct on the canonical grid, its reference (the five organs) and a simulated crowd's boxes by
    slice; ``slices`` > 0 keeps that many prompted slices, evenly spread over the organ range."""
    img = nib.load(CT / "example_ct.nii.gz")
    ref_img = nib.load(CT / "example_seg_fast_force_split.nii.gz")
    orientation = Orientation.from_affine(img.affine, img.shape)
    canonical = np.asarray(orientation.canonical(np.asanyarray(img.dataobj)))
    raw_ref = np.asarray(orientation.canonical(np.asanyarray(ref_img.dataobj).astype(np.int16)))
    ref = np.where(np.isin(raw_ref, list(LABELS.values())), raw_ref, 0).astype(np.uint8)
    crowd = simulate_crowd(ref, LABELS, annotators=annotators, jitter=jitter, coverage=1.0, seed=seed)
    prompts: dict[int, list[PromptIn]] = {}
    for b in crowd.boxes:
        prompts.setdefault(b.k, []).append(PromptIn(f"annotator{b.annotator}", b.label, "box", b.box))
    ordered = sorted(prompts)
    if slices and slices < len(ordered):
        picks = np.linspace(0, len(ordered) - 1, slices).round().astype(int)
        ordered = [ordered[i] for i in sorted(set(picks.tolist()))]
    return canonical, ref, {k: prompts[k] for k in ordered}


def naive(engine: SegmentationEngine, canonical: np.ndarray, prompts: dict[int, list[PromptIn]]) -> np.ndarray:
    """The anchors' habit: encode the slice again for every box, decode box by box; same fusion."""
    out = np.zeros(canonical.shape, dtype=np.uint8)
    for k, slice_prompts in prompts.items():
        display = display_slice(canonical, k)
        items = decode_items(slice_prompts)
        probs, masks = [], []
        for item in items:
            embedding = engine.encode(display, WINDOW)
            p, m = engine.backend.decode(embedding, [item.prompt], display.shape)
            probs.append(p[0])
            masks.append(m[0])
        label_map, _ = fuse_slice([(i.label, i.annotator) for i in items], np.stack(probs), np.stack(masks),
                                  voters=sorted({i.annotator for i in items}), label_values=LABELS, method="majority")
        out[:, :, k] = display_to_canonical_slice(label_map.astype(np.uint8))
    sync(engine.device)
    return out


def dice_table(pred: np.ndarray, ref: np.ndarray, prompted: list[int]) -> list[tuple[str, float, float, float]]:
    rows = []
    for label, value in LABELS.items():
        per_slice = []
        for k in prompted:
            r, p = ref[:, :, k] == value, pred[:, :, k] == value
            if r.any():
                per_slice.append(dice(r, p))
        r_vol, p_vol = ref == value, pred == value
        vol = dice(r_vol, p_vol)  # NaN (nnU-Net) when the organ is absent from both
        vol_prompted = dice(r_vol[:, :, prompted], p_vol[:, :, prompted])
        rows.append((label, float(np.mean(per_slice)) if per_slice else float("nan"), vol_prompted, vol))
    return rows


def idle_cpu_seconds(seconds: float) -> float:
    """CPU time this process (all threads) uses while it sleeps for ``seconds``."""
    before = time.process_time()
    time.sleep(seconds)
    return time.process_time() - before


@dataclass
class BackendRun:
    name: str
    pure_encoder_s: float
    cold: SegmentationOutput
    boxes: int

    @property
    def total_s(self) -> float:
        return self.cold.timings["total_s"]

    @property
    def ratio(self) -> float:
        return self.total_s / self.pure_encoder_s

    @property
    def decoder_ms_per_box(self) -> float:
        return self.cold.timings["decoder_s"] / self.boxes * 1000


def run_backend(engine: SegmentationEngine, canonical: np.ndarray, prompts: dict[int, list[PromptIn]],
                boxes: int) -> BackendRun:
    """Warm up, time the encoder alone on the prompted slices, then one cold segmentation."""
    warm = display_slice(canonical, 0)
    for _ in range(2):  # warm-up (allocator, kernels, ORT's first-run graph work) on an unprompted slice
        embedding = engine.encode(warm, WINDOW)
    engine.backend.decode(embedding, [DecodePrompt(box=(10.0, 10.0, 60.0, 60.0))] * 2, warm.shape)
    sync(engine.device)
    t = time.perf_counter()
    for k in prompts:
        engine.encode(display_slice(canonical, k), WINDOW)
    sync(engine.device)
    pure_encoder_s = time.perf_counter() - t
    cold = engine.segment(canonical, window=WINDOW, image_id="bench", prompts=prompts, label_values=LABELS)
    sync(engine.device)
    return BackendRun(engine.backend.name, pure_encoder_s, cold, boxes)


def agreement(a: np.ndarray, b: np.ndarray, slices: list[int]) -> list[float]:
    """Per-slice, per-organ Dice between two label maps (organs present in either)."""
    scores = []
    for k in slices:
        for value in LABELS.values():
            x, y = a[:, :, k] == value, b[:, :, k] == value
            if x.any() or y.any():
                scores.append(dice(x, y))
    return scores


def chunk_sweep(engine: SegmentationEngine, canonical: np.ndarray, prompts: dict[int, list[PromptIn]],
                chunks: list[int], slices: int) -> list[tuple[int, float]]:
    """Decoder ms/box of the backend per batch size, on ``slices`` prompted slices (embeddings cached)."""
    chosen = list(prompts)[:: max(1, len(prompts) // max(slices, 1))][:slices]
    work = []
    for k in chosen:
        display = display_slice(canonical, k)
        work.append((engine.encode(display, WINDOW), [i.prompt for i in decode_items(prompts[k])], display.shape))
    backend, rows = engine.backend, []
    for chunk in chunks:
        saved = getattr(backend, "chunk", None)
        t, boxes = time.perf_counter(), 0
        for embedding, items, shape in work:
            if isinstance(backend, OnnxBackend):
                backend.chunk = chunk
                backend.decode(embedding, items, shape)
            else:
                decode(engine.model, embedding, items, shape, chunk=chunk)
            boxes += len(items)
        sync(engine.device)
        rows.append((chunk, (time.perf_counter() - t) / boxes * 1000))
        if saved is not None:
            backend.chunk = saved  # type: ignore[union-attr]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=0, help="limit to N prompted slices, evenly spread (0 = all)")
    parser.add_argument("--naive-slices", type=int, default=6, help="slices for the naive comparison")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                        help="decoder batch sizes to time on the default backend")
    parser.add_argument("--chunk-slices", type=int, default=6, help="slices for the batch-size sweep")
    parser.add_argument("--annotators", type=int, default=3)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle CPU measured over this long")
    args = parser.parse_args()

    canonical, ref, prompts = example_ct_crowd(args.annotators, args.jitter, args.seed, args.slices)
    slices = sorted(prompts)
    n_boxes = sum(len(v) for v in prompts.values())

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model = load_model("litemedsam", device=choose_device(args.device))
        weights_id = registry.file_sha256(Path(registry.model_info("litemedsam").checkpoint or ""))[:16]
        load_s = time.perf_counter() - t

        def engine_for(backend: str, cache: str) -> SegmentationEngine:
            return SegmentationEngine("litemedsam", device=args.device, cache_dir=Path(tmp) / cache,
                                      threads=args.threads, precision=args.precision, loaded=model,
                                      weights_id=weights_id, backend=backend, onnx_dir=Path(tmp) / "onnx")

        engines: dict[str, SegmentationEngine] = {}
        export_s: dict[str, float] = {}
        for backend in args.backends:
            t = time.perf_counter()
            engines[backend] = engine_for(backend, backend)
            export_s[backend] = time.perf_counter() - t
        device = next(iter(engines.values())).device
        default = resolve_backend(get_settings().backend, device)
        if default not in engines:
            engines[default] = engine_for(default, default)
        print(f"device={device} threads={torch.get_num_threads()} precision={args.precision} "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} "
              f"onnxruntime={onnxruntime.__version__} torch={torch.__version__} default backend={default} "
              f"gpu={torch.cuda.get_device_name(0) if device.type == 'cuda' else '-'} cpus={os.cpu_count()} "
              f"load avg before={os.getloadavg()[0]:.2f}")
        print(f"volume {canonical.shape}, {len(slices)} prompted slices, {n_boxes} boxes from "
              f"{args.annotators} simulated annotators (jitter {args.jitter}), model load {load_s:.2f} s, "
              f"engine start (ONNX export when not cached) "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in export_s.items()))

        runs = {backend: run_backend(engines[backend], canonical, prompts, n_boxes) for backend in args.backends}
        print(f"  {'backend':<8}{'encoder s':>10}{'ms/slice':>9}{'total s':>9}{'in-run enc':>11}{'decoder':>9}"
              f"{'ms/box':>8}{'total/enc':>10}")
        for run in runs.values():
            timings = run.cold.timings
            print(f"  {run.name:<8}{run.pure_encoder_s:>10.2f}{run.pure_encoder_s / len(slices) * 1000:>9.0f}"
                  f"{run.total_s:>9.2f}{timings['encoder_s']:>11.2f}{timings['decoder_s']:>9.2f}"
                  f"{run.decoder_ms_per_box:>8.1f}{run.ratio:>10.3f}")
        speedup = float("nan")
        if {"torch", "onnx"} <= set(runs):
            speedup = runs["torch"].total_s / runs["onnx"].total_s
            scores = agreement(runs["torch"].cold.labels, runs["onnx"].cold.labels, slices)
            encoder_x = runs["torch"].pure_encoder_s / runs["onnx"].pure_encoder_s
            print(f"torch / onnx: total x{speedup:.2f}, encoder x{encoder_x:.2f}, "
                  f"decoder x{runs['torch'].decoder_ms_per_box / runs['onnx'].decoder_ms_per_box:.2f}; "
                  f"per-slice Dice torch vs onnx min {min(scores):.4f} mean {np.mean(scores):.5f} "
                  f"over {len(scores)} (slice, organ) pairs")

        engine = engines[default]
        cold = runs[default].cold if default in runs else run_backend(engine, canonical, prompts, n_boxes).cold

        # rerun: identical, then one new box
        t = time.perf_counter()
        same = engine.segment(canonical, window=WINDOW, image_id="bench", prompts=prompts, label_values=LABELS)
        same_s = time.perf_counter() - t
        assert (same.encoded, same.decoded) == (0, 0) and np.array_equal(same.labels, cold.labels)
        k = slices[len(slices) // 2]
        first = prompts[k][0]
        x0, y0, x1, y1 = first.coords
        prompts[k] = [*prompts[k], PromptIn("late-annotator", first.label, "box", (x0 + 1, y0, x1 + 1, y1))]
        t = time.perf_counter()
        rerun = engine.segment(canonical, window=WINDOW, image_id="bench", prompts=prompts, label_values=LABELS)
        sync(device)
        rerun_s = time.perf_counter() - t
        assert (rerun.encoded, rerun.decoded) == (0, 1), (rerun.encoded, rerun.decoded)
        print(f"{default}: rerun, same prompts: {same_s * 1000:.0f} ms (encoded 0, decoded 0, bit-identical); "
              f"one new box on slice {k}: {rerun_s * 1000:.0f} ms (encoded 0, decoded 1)")
        prompts[k] = prompts[k][:-1]

        # naive pipeline on a subset, against a cold engine on the same subset
        step = max(1, len(slices) // max(args.naive_slices, 1))
        subset = {k: prompts[k] for k in slices[::step][: args.naive_slices]}
        sub_boxes = sum(len(v) for v in subset.values())
        t = time.perf_counter()
        fast = engine_for(default, "naive-cmp").segment(canonical, window=WINDOW, image_id="bench", prompts=subset,
                                                       label_values=LABELS)
        sync(device)
        fast_s = time.perf_counter() - t
        t = time.perf_counter()
        slow = naive(engine, canonical, subset)
        naive_s = time.perf_counter() - t
        differing = int((slow != fast.labels).sum())
        print(f"{default}: naive (re-encode per box) on {len(subset)} slices / {sub_boxes} boxes: {naive_s:.2f} s vs "
              f"engine {fast_s:.2f} s -> speed-up x{naive_s / fast_s:.1f}; same masks: {differing == 0}")
        assert differing == 0, f"naive and batched masks differ in {differing} voxels"

        # request -> mask after a crowd round: cold (nothing encoded) vs pre-encoded (slices handed out) vs
        # pre-encoded and pre-decoded (boxes decoded as they arrived) while the crowd worked
        cold_s = cold.timings["total_s"]
        for background in ("pre-encoded", "pre-encoded + pre-decoded"):
            warmed = engine_for(default, background.replace(" ", ""))
            t = time.perf_counter()
            encoded = warmed.preencode(canonical, window=WINDOW, image_id="bench", slices=slices)
            if "decoded" in background:
                warmed.predecode(canonical, window=WINDOW, image_id="bench", prompts=prompts)
            background_s = time.perf_counter() - t
            t = time.perf_counter()
            warm_out = warmed.segment(canonical, window=WINDOW, image_id="bench", prompts=prompts,
                                      label_values=LABELS)
            sync(device)
            prewarmed_s = time.perf_counter() - t
            assert warm_out.encoded == 0
            differ = int((warm_out.labels != cold.labels).sum())
            print(f"{default}: request -> mask cold {cold_s:.2f} s; {background} ({encoded} slices, "
                  f"{background_s:.2f} s while the crowd worked) {prewarmed_s:.2f} s = "
                  f"{prewarmed_s / cold_s * 100:.1f} % of cold (encoded 0, decoded {warm_out.decoded}, "
                  f"{differ} voxels differ from cold)")

        if args.chunks:
            sweep = chunk_sweep(engine, canonical, prompts, args.chunks, args.chunk_slices)
            print(f"{default}: decoder ms/box by batch size: " + ", ".join(f"{c}: {ms:.1f}" for c, ms in sweep))

        # a loaded engine waiting for work: its threads (OpenMP, ONNX Runtime) must sleep, not spin
        idle_cpu = idle_cpu_seconds(args.idle_seconds)
        idle_pct = idle_cpu / args.idle_seconds * 100
        print(f"idle CPU of the loaded engines over {args.idle_seconds:.0f} s: {idle_cpu:.2f} s "
              f"({idle_pct:.1f} % of a core)")

    print("per-organ Dice vs reference (majority of the crowd, default backend):")
    print(f"  {'organ':<14}{'per-slice':>10}{'vol(prompted)':>15}{'vol(all)':>10}")
    for label, per_slice, vol_prompted, vol in dice_table(cold.labels, ref, slices):
        print(f"  {label:<14}{per_slice:>10.3f}{vol_prompted:>15.3f}{vol:>10.3f}")
    ratio = runs[default].ratio if default in runs else float("nan")
    print(f"segment backend_speedup={speedup:.2f} total_over_encoder={ratio:.3f} "
          f"request_to_mask_prewarmed_s={prewarmed_s:.2f} idle_worker_cpu_pct={idle_pct:.1f}")


if __name__ == "__main__":
    main()
