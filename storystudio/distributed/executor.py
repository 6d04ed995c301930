"""The driver side of a multi-GPU worker: a pool of long-lived rank processes.

Lives in the handler process (RunPod's entry point, which stays thin and single-GPU
agnostic): :meth:`DistributedExecutor.handle` has the same contract as
:meth:`storystudio.worker.Worker.handle`, so ``handler.py`` does not care which one it
got (:func:`storystudio.distributed.launch.build_job_handler` decides).

* The ranks are started once, with the ``spawn`` start method (CUDA cannot be used in a
  forked child), and keep their models loaded between jobs.
* A job goes to rank 0 over a pipe; rank 0's progress events come back on the same pipe
  and are passed to the RunPod progress sink here; rank 0's result is the job result.
* A rank that dies mid-job (its process sentinel fires), a follower that reports an
  error, or a job that outlives ``STORYSTUDIO_DIST_JOB_TIMEOUT_S`` fails the job with the
  stable code ``rank_failed`` (or the follower's own code, e.g. ``out_of_memory``); the
  pool is then torn down and started again before the next job. A rank found dead
  between jobs is replaced silently before the next job runs.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from storystudio.config import WorkerSettings
from storystudio.distributed.config import DistributedConfig, disable_multicast
from storystudio.distributed.parallel_dit import ParallelMode, resolve_mode
from storystudio.distributed.rank import rank_main, spec_for
from storystudio.progress import Sink

log = logging.getLogger(__name__)

RANK_FAILED = "rank_failed"


class RankFailure(Exception):
    """The pool cannot run this job; ``code`` goes into the job result."""

    def __init__(self, message: str, code: str = RANK_FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Pool:
    procs: list[multiprocessing.process.BaseProcess]
    conns: list[Any]  # executor ends of the per-rank pipes
    queues: list[Any] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def dead(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if not p.is_alive()]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedExecutor:
    """Runs jobs on ``config.world_size`` rank processes (rank 0 = the driver worker)."""

    def __init__(self, settings: WorkerSettings, config: DistributedConfig, sink: Sink | None = None) -> None:
        if config.world_size < 2:
            raise ValueError("a distributed executor needs at least 2 ranks")
        self.settings = settings
        self.config = config
        self.sink = sink
        self.mode: ParallelMode = resolve_mode(config.mode, config.world_size)
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: _Pool | None = None
        self._lock = threading.Lock()
        self.restarts = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def pids(self) -> list[int]:
        """Process ids of the running ranks (rank order); empty when no pool runs."""
        pool = self._pool
        return [] if pool is None else [p.pid for p in pool.procs if p.pid is not None]

    def prewarm(self) -> None:
        """Start the ranks now (rank 0 then pre-warms its model set, see STORYSTUDIO_PREWARM)."""
        with self._lock:
            try:
                self._ensure_pool()
            except RankFailure as exc:
                log.error("starting the rank pool failed (%s); the next job tries again", exc.message)

    def close(self) -> None:
        with self._lock:
            self._teardown(graceful=True)

    def _ensure_pool(self) -> _Pool:
        pool = self._pool
        if pool is not None:
            dead = pool.dead()
            if not dead:
                return pool
            log.warning("rank(s) %s died between jobs (%s); restarting the pool", dead,
                        ", ".join(describe_exit(pool.procs[r].exitcode) for r in dead))
            self._teardown(graceful=False)
            self.restarts += 1
        return self._start()

    def _start(self) -> _Pool:
        disable_multicast()  # inherited by every rank process
        n = self.config.world_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        queues = [self._ctx.Queue() for _ in range(n - 1)]
        procs, conns = [], []
        for rank in range(n):
            ours, theirs = self._ctx.Pipe(duplex=True)
            spec = spec_for(rank, n, init_method, self.settings, self.mode, self.config.collective_timeout_s)
            proc = self._ctx.Process(target=rank_main, args=(spec, theirs, queues), name=f"storystudio-rank{rank}",
                                     daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        pool = _Pool(procs, conns, queues)
        self._pool = pool
        log.info("started %d ranks (%s mode): pids %s", n, self.mode, [p.pid for p in procs])
        deadline = time.monotonic() + self.config.start_timeout_s
        waiting = set(range(n))
        try:
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RankFailure(f"rank(s) {sorted(waiting)} not ready after {self.config.start_timeout_s:g} s")
                watch = [conns[r] for r in waiting] + [procs[r].sentinel for r in waiting]
                for obj in multiprocessing.connection.wait(watch, timeout=left):
                    rank = self._rank_of(pool, obj)
                    if obj is procs[rank].sentinel:
                        procs[rank].join(1)
                        raise RankFailure(f"rank {rank} exited during start-up "
                                          f"({describe_exit(procs[rank].exitcode)})")
                    msg = self._recv(pool, rank)
                    if msg[0] == "ready":
                        waiting.discard(rank)
                    elif msg[0] == "error":
                        raise RankFailure(msg[2], msg[1])
        except BaseException:
            self._teardown(graceful=False)
            raise
        return pool

    @staticmethod
    def _rank_of(pool: _Pool, obj: Any) -> int:
        for r, (p, c) in enumerate(zip(pool.procs, pool.conns, strict=True)):
            if obj is c or obj == p.sentinel:
                return r
        raise LookupError(obj)

    @staticmethod
    def _recv(pool: _Pool, rank: int) -> tuple:
        try:
            return pool.conns[rank].recv()
        except (EOFError, OSError):
            proc = pool.procs[rank]
            proc.join(2)
            raise RankFailure(f"rank {rank} (pid {proc.pid}) exited ({describe_exit(proc.exitcode)})") from None

    def _teardown(self, *, graceful: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if graceful and pool.procs[0].is_alive():
            try:
                pool.conns[0].send(("stop",))
            except (OSError, ValueError):
                pass
            for p in pool.procs:
                p.join(10)
        for p in pool.procs:
            if p.is_alive():
                p.kill()  # SIGKILL: a rank stuck in a collective cannot be stopped politely
        for p in pool.procs:
            p.join(10)
        for c in pool.conns:
            c.close()
        for q in pool.queues:
            q.cancel_join_thread()
            q.close()

    # ------------------------------------------------------------------ jobs
    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job on the pool; same result contract as ``Worker.handle``."""
        job_id = str(job.get("id") or f"local-{uuid.uuid4().hex[:12]}")
        job = {**job, "id": job_id}
        with self._lock:
            try:
                result = self._run(job)
            except RankFailure as exc:
                log.error("job %s: %s (%s); the rank pool restarts before the next job", job_id, exc.message,
                          exc.code)
                self._teardown(graceful=False)
                self.restarts += 1
                return {"error": f"{exc.code}: {exc.message}", "code": exc.code, "job_id": job_id}
        return result

    def _run(self, job: dict[str, Any]) -> dict[str, Any]:
        pool = self._ensure_pool()
        try:
            pool.conns[0].send(("job", job))
        except (OSError, ValueError) as exc:
            raise RankFailure(f"rank 0 cannot take the job: {exc}") from None
        timeout = self.config.job_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = list(pool.conns) + [p.sentinel for p in pool.procs]
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(watch, timeout=left)
            if not ready:
                raise RankFailure(f"job did not finish within STORYSTUDIO_DIST_JOB_TIMEOUT_S={timeout:g} s")
            # Messages first: a follower's own error explains better than its exit.
            for obj in sorted(ready, key=lambda o: o not in pool.conns):
                rank = self._rank_of(pool, obj)
                if obj is pool.procs[rank].sentinel:
                    pool.procs[rank].join(1)
                    raise RankFailure(f"rank {rank} (pid {pool.procs[rank].pid}) exited during the job "
                                      f"({describe_exit(pool.procs[rank].exitcode)})")
                msg = self._recv(pool, rank)
                kind = msg[0]
                if kind == "progress" and self.sink is not None:
                    try:
                        self.sink(job, msg[1])
                    except Exception:  # a lost progress update must never fail the job
                        log.warning("progress update failed", exc_info=True)
                elif kind == "error":
                    raise RankFailure(msg[2], msg[1])
                elif kind == "result":
                    return self._finish(pool, msg[1], msg[2])

    def _finish(self, pool: _Pool, result: dict[str, Any], poisoned: str | None) -> dict[str, Any]:
        if poisoned is None:
            return result
        # The ranks are out of step: the job's own error stands (rank 0 reported it),
        # unless a rank died, which is the better explanation.
        time.sleep(0.2)
        dead = pool.dead()
        if dead:
            r = dead[0]
            raise RankFailure(f"rank {r} (pid {pool.procs[r].pid}) exited during the job "
                              f"({describe_exit(pool.procs[r].exitcode)})")
        log.warning("rank pool out of step (%s); restarting it", poisoned)
        self._teardown(graceful=False)
        self.restarts += 1
        return result
