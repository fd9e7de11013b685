"""RQ's scheduler (retry backoffs, scheduled jobs) in a fresh process of its own.

RQ starts its scheduler by forking the worker (``get_context('fork')``, hard-coded), and later
re-forks it from its maintenance loop — by then the worker has its pub/sub thread, torch's
OpenMP pool and the loaded model. A fork of a threaded process can inherit a lock held by
another thread and hang forever. The worker therefore never lets RQ start a scheduler; it runs
``python -m workers.scheduler`` (a new interpreter: fork + exec, no copied locks) and restarts it
if it exits. The child dies with its worker (Linux ``PR_SET_PDEATHSIG``, plus a parent check on
other systems), so a SIGKILLed worker leaves no orphan holding the scheduler lock.

The scheduler process also runs the job reconciler (:mod:`app.jobs.reconcile`) every 30 s, one
process at a time over all hosts: dead workers' jobs are handed back, lost queue entries re-enqueued.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from rq.scheduler import RQScheduler, run

from app.core.redis import get_queue, get_redis
from app.core.runtime import configure_process
from app.jobs.reconcile import INTERVAL_S, reconcile_if_due

log = logging.getLogger("crowdsam.scheduler")

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` exits (SIGTERM: the scheduler releases its locks)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    if sys.platform != "linux":
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class CrowdsamScheduler(RQScheduler):
    """RQ's scheduler loop (a beat every second) plus a reconciler round every ``INTERVAL_S``."""

    _next_reconcile = 0.0

    def heartbeat(self) -> None:
        super().heartbeat()
        if time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + INTERVAL_S / 3  # the Redis lock spaces rounds out
            try:
                reconcile_if_due(self.connection)
            except Exception:
                log.exception("job reconciler round failed; the next one retries")


def start_scheduler_process(queue_names: list[str]) -> subprocess.Popen[bytes]:
    """Start the scheduler for ``queue_names`` as a child of this process (fork + exec)."""
    command = [sys.executable, "-m", "workers.scheduler", "--parent", str(os.getpid()), *queue_names]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="RQ scheduler for crowdsam's queues (started by the worker)")
    parser.add_argument("--parent", type=int, required=True, help="pid of the worker that owns this scheduler")
    parser.add_argument("queues", nargs="+")
    args = parser.parse_args(argv)
    configure_process()
    die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    scheduler = CrowdsamScheduler([get_queue(name) for name in args.queues], connection=get_redis())
    scheduler.acquire_locks()  # locks held by another live scheduler stay there; RQ retries every 2 min
    run(scheduler)


if __name__ == "__main__":
    main()
