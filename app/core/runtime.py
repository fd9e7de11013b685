"""Process start-up policy, applied once by every entry point (CLI, test session, benchmarks).

Two rules keep processes from hanging or burning idle cores:

- **Children never fork from a threaded parent.** ``fork`` copies only the calling thread, with
  every lock other threads held at that moment still held: a pool worker forked while a pytest,
  uvicorn or RQ thread held a lock waits forever. :func:`use_spawn` makes ``spawn`` the default
  start method, so libraries that call ``multiprocessing.Pool()`` (nnU-Net does) start fresh
  interpreters. Code that forks on purpose (RQ's scheduler) is not used; see ``workers.scheduler``.
- **OpenMP threads stop spinning when idle.** ``OMP_WAIT_POLICY=ACTIVE`` keeps torch's decoder fast
  on small CPUs, but GNU OpenMP then spins up to 5 minutes after every parallel region, so an idle
  worker burns a core. :func:`bound_openmp_spinning` keeps the active policy and bounds the spin
  (``GOMP_SPINCOUNT``). It only acts before torch loads libgomp, so it is called by the processes
  that run models (worker start-up, test session, benchmarks) and never at import time; the API
  process does not load torch and sets nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys

log = logging.getLogger("crowdsam.runtime")

START_METHOD = "spawn"
# ~1 ms of spinning (libgomp: ~100k spins per ms) before an idle thread sleeps; measured on the
# 2-core build machine: decoder ms/box as with the unbounded policy, idle CPU 0.00 s over 8 s.
WAIT_POLICY = "ACTIVE"
SPIN_COUNT = "100000"


def use_spawn() -> None:
    """Make ``spawn`` this process's default start method for ``multiprocessing``."""
    if multiprocessing.get_start_method(allow_none=True) != START_METHOD:
        multiprocessing.set_start_method(START_METHOD, force=True)


def bound_openmp_spinning() -> None:
    """Set the OpenMP wait policy (operator-set values win) before torch is imported.

    Child processes inherit it through the environment.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    if os.environ["OMP_WAIT_POLICY"].strip().upper() == "ACTIVE":
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    if "torch" in sys.modules:
        log.warning("torch was imported before the OpenMP policy was set; it applies to child processes only")


def configure_process(*, runs_models: bool = False) -> None:
    """The start-up policy of one process: spawn children; bounded OpenMP spinning where models run."""
    use_spawn()
    if runs_models:
        bound_openmp_spinning()


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after ``timeout`` seconds; waits for the exit either way."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
