"""Every script in bench/ runs end to end in a tiny mode, so none rots between benchmark runs.

Each runs as a user would start it (a fresh ``python bench/…`` process); the test checks that it
exits 0 and prints the lines its docs promise. The numbers themselves are not asserted here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = {
    "ingest": (["bench/ingest.py", "--boxes", "200", "--batch", "100", "--single", "10", "--clients", "2"],
               ["ratio API bulk / raw executemany", "ratio API single (1 client) / raw one row per transaction"]),
    "crowd_load": (["bench/crowd_load.py", "--smoke"], ["crowd_load clients=20 "]),
    "task_assignment": (["bench/task_assignment.py", "--smoke"], ["late (later calls)", "task_assignment slices=60 "]),
    "cache": (["bench/cache.py", "--puts", "12", "--disk-entries", "6", "--memory-entries", "3", "--gets", "3",
               "--shape", "1,256,16,16"],
              ["put (evicting)", "get memory hit", "get disk hit", "get miss", "(bound kept: True)"]),
    "segment": (["bench/segment.py", "--slices", "2", "--naive-slices", "1", "--annotators", "1",
                 "--idle-seconds", "2", "--chunks", "1", "2", "--chunk-slices", "1"],
                ["total/enc", "torch / onnx: total x", "per-slice Dice torch vs onnx min",
                 "request -> mask cold", "decoder ms/box by batch size: 1:", "idle CPU of the loaded engines over 2 s",
                 "same masks: True", "per-organ Dice", "segment backend_speedup="]),
    "reproduce_study": (["bench/reproduce_study.py", "--cases", "example_ct_sm", "--coverage", "0.1", "--seeds", "2",
                         "--resamples", "200"],
                        ["| SAM ViT-H | slice |", "| organ | study slice SAM-H / MedSAM |",
                         "=== coverage 0.1 per annotator (example_ct_sm, 3 annotators, 2 seeds", "| **mean** |",
                         "max |vol@known", "HD95 penal.: ",
                         "reproduce_study cases=example_ct_sm coverages=[0.1] seeds=2 runs=2 fill_gaps=3"]),
}
MODEL_SCRIPTS = {"segment", "reproduce_study"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.model) if n in MODEL_SCRIPTS else n
                                  for n in SCRIPTS])
def test_bench_script_runs_in_smoke_mode(name: str) -> None:
    args, expected = SCRIPTS[name]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for line in expected:
        assert line in done.stdout, done.stdout
