"""Worker start-up: recover jobs of dead workers, load the model once, then run an RQ worker.

Why ``SimpleWorker`` (jobs run inside the worker process, no fork per job):
- CUDA cannot be used in a child forked from a process that already initialised it ("Cannot
  re-initialize CUDA in forked subprocess"), and RQ's default ``Worker`` forks a work horse per
  job. A SimpleWorker never forks, so the CUDA context and the model weights created once in
  this process stay valid for every job — the model is loaded once per process (``get_engine``
  caches it), and the in-memory embedding/decode caches survive between jobs, which is what
  makes a rerun after one new box cost one decoder call.
- RQ's job timeout still works: SimpleWorker runs the job in the main thread, where the
  SIGALRM death penalty is delivered.
- The price: a job that crashes the interpreter (SIGKILL, OOM killer, segfault in a native
  library) takes the worker with it. Run workers under a supervisor that restarts them; on
  start, :func:`requeue_abandoned` hands the dead worker's job back to RQ's retry logic, and
  jobs are idempotent (see ``workers.jobs.segmentation``).
- Scale by running more worker processes (one per GPU), not by forking.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import as_text

from app.core.config import get_settings
from app.core.logs import configure_logging, job_context
from app.core.redis import get_queue, get_redis
from app.core.runtime import configure_process, stop_process
from app.jobs.kinds import parse_job_id
from workers.scheduler import start_scheduler_process

log = logging.getLogger("crowdsam.worker")



def _process_dead(fields: dict[str, str]) -> bool:
    """True when ``fields`` (an RQ worker/scheduler hash) name a process on this host that is gone.

    A killed process whose parent died too may linger as a zombie until init reaps it (some
    container inits never do): a zombie counts as dead.
    """
    if fields.get("hostname") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return False
    pid = int(fields["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def _hash(connection: Redis, key: str) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in connection.hgetall(key).items()}


def _worker_alive(connection: Redis, worker_name: str) -> bool:
    """Is the worker that holds an execution still alive?

    A worker's Redis key outlives a SIGKILL by up to ``job_timeout + 60`` s (SimpleWorker sets
    its heartbeat TTL from the job timeout), so on this host we also ask the kernel about the pid.
    Workers on other hosts count as alive until their key expires.
    """
    fields = _hash(connection, f"rq:worker:{worker_name}")
    return bool(fields) and not fields.get("death") and not _process_dead(fields)


def release_dead_scheduler_locks(queues: Iterable[Queue], connection: Redis | None = None) -> list[str]:
    """Free the scheduler lock of each queue whose holder (a scheduler process on this host) is dead.

    Otherwise a crashed worker's lock blocks this worker's scheduler, and scheduled retries wait
    for RQ's next maintenance round (10 min) instead of their backoff interval.
    """
    from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
    from rq.scripts import release_lock

    connection = connection or get_redis()
    released = []
    for queue in queues:
        key = RQScheduler.get_locking_key(queue.name)
        owner = as_text(connection.get(key) or b"")
        if owner and _process_dead(_hash(connection, SCHEDULER_KEY_TEMPLATE % owner)):
            release_lock(connection, key, owner)
            released.append(queue.name)
    return released


def requeue_abandoned(queues: Iterable[Queue], connection: Redis | None = None) -> list[str]:
    """Hand jobs whose worker died mid-job back to RQ: retried while retries are left, else failed.

    RQ treats a started job as abandoned once its execution's heartbeat expires
    (``StartedJobRegistry.cleanup``, run by the reconciler: up to ``CROWDSAM_JOB_HEARTBEAT_S`` plus
    one round after the crash). At start a worker need not wait: executions whose worker is provably
    dead (a pid on this host) are marked expired now and the same RQ cleanup runs (the failure
    callback updates the row, ``Retry`` with its backoff, or the FailedJobRegistry).
    Returns the ids of the jobs handed back.
    """
    connection = connection or get_redis()
    recovered: list[str] = []
    for queue in queues:
        registry = StartedJobRegistry(queue.name, connection=connection)
        dead: list[str] = []
        for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
            execution = Execution(id=execution_id, job_id=job_id, connection=connection)
            worker_name = as_text(connection.hget(execution.key, "worker_name") or b"")
            if worker_name and _worker_alive(connection, worker_name):
                continue
            connection.zadd(registry.key, {f"{job_id}:{execution_id}": 0}, xx=True)
            dead.append(job_id)
        if dead:
            registry.cleanup()
            recovered.extend(dead)
    for job_id in recovered:
        log.warning("job %s was abandoned by a dead worker: handed back to RQ (retry or fail)", job_id)
    return recovered


def preload(models: Iterable[str]) -> None:
    """Load models before the first job (only those available here; failures are logged)."""
    from app.segmentations.registry import model_info

    for name in models:
        try:
            if not model_info(name).available:
                continue
            from workers.sam.engine import get_engine

            get_engine(name)
            log.info("model %s loaded", name)
        except Exception:
            log.exception("could not preload model %s", name)


class CrowdsamWorker(SimpleWorker):
    """SimpleWorker whose scheduler is a fresh process (``workers.scheduler``), never a fork of itself.

    RQ would fork its scheduler from this process at start and again from its maintenance loop,
    after the pub/sub thread and torch's thread pool exist. Here RQ's scheduler start only
    enqueues due scheduled jobs once (its burst-mode path, no fork) and ``self.scheduler`` stays
    unset so maintenance never forks; a long-running worker keeps a scheduler child process
    alive instead (restarted from maintenance if it exits).
    """

    preload_models: tuple[str, ...] = ()
    scheduler_process: subprocess.Popen[bytes] | None = None

    def _start_scheduler(self, burst: bool = False, *args: Any, **kwargs: Any) -> None:
        super()._start_scheduler(True, *args, **kwargs)
        self.scheduler = None
        if not burst:
            self._ensure_scheduler_process()
        preload(self.preload_models)

    def _ensure_scheduler_process(self) -> None:
        if self.scheduler_process is None or self.scheduler_process.poll() is not None:
            if self.scheduler_process is not None:
                log.warning("scheduler process exited with %s: starting a new one", self.scheduler_process.returncode)
            self.scheduler_process = start_scheduler_process([queue.name for queue in self.queues])

    def run_maintenance_tasks(self) -> None:
        if self.scheduler_process is not None:
            self._ensure_scheduler_process()
        super().run_maintenance_tasks()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Short (``CROWDSAM_JOB_HEARTBEAT_S``): a thread refreshes it while a job runs (RQ: job timeout + 60 s)."""
        return get_settings().job_heartbeat_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        parsed = parse_job_id(job.id)
        with self._heartbeats(job), job_context(job.id, parsed[0].name if parsed else job.func_name or "?"):
            super().execute_job(job, queue)  # RQ's own lines about the job carry its id and kind too

    @contextmanager
    def _heartbeats(self, job: Job) -> Iterator[None]:
        """Refresh the worker's and the running execution's heartbeats from a thread while the job runs.

        The job runs in this (main) thread; torch and numpy release the GIL, so the beat goes on
        during long computations, and it stops when the process dies — which is the point.
        """
        stop = threading.Event()
        every = get_settings().job_heartbeat_s / 6

        def beat() -> None:
            while not stop.wait(every):
                for execution in list(self.executions.values()):
                    if execution.job_id == job.id:
                        try:
                            self.maintain_heartbeats(job, execution)
                        except Exception:
                            log.warning("heartbeat of job %s failed", job.id, exc_info=True)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=every)

    def teardown(self) -> None:
        stop_process(self.scheduler_process)
        super().teardown()


def run_worker(queue_names: list[str], *, burst: bool = False, preload_models: Iterable[str] | None = None) -> None:
    """Start a worker on ``queue_names`` (see the module docstring for why SimpleWorker).

    A long-running worker on ``sam`` preloads LiteMedSAM; a burst worker loads models on demand.
    """
    configure_process(runs_models=True)
    if get_settings().worker_nice:
        os.nice(get_settings().worker_nice)  # batch work yields the CPU to the API on a shared host
    configure_logging()  # CROWDSAM_LOG_FORMAT: text or JSON lines with job_id/kind (app.core.logs)
    queues = [get_queue(name) for name in queue_names]
    requeue_abandoned(queues)
    release_dead_scheduler_locks(queues)
    if preload_models is None:
        models = {"sam", "preencode"} & set(queue_names)
        preload_models = ("litemedsam",) if models and not burst else ()
    worker = CrowdsamWorker(queues, connection=get_redis())
    worker.preload_models = tuple(preload_models)
    try:
        worker.work(burst=burst, with_scheduler=True)
    finally:
        stop_process(worker.scheduler_process)
