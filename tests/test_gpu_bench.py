"""bench/gpu.sh, the prepared GPU check, runs end to end on CPU (``--device cpu``): the same script a GPU
machine runs, here on two slices of example_ct with the real LiteMedSAM weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.model


def test_gpu_bench_runs_on_cpu() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--models", "litemedsam", "--slices", "2",
         "--encoder-slices", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("card=") and "device=cpu" in lines[0]
    row = next(line.split() for line in lines if line.strip().startswith("litemedsam"))
    assert row[1:4] == ["real", "weights", "fp32"] and float(row[5]) > 0 and float(row[6]) > 0
    assert lines[-1].startswith("gpu bench done in")
