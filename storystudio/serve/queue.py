"""The GPU queue: one thread runs the accepted jobs on the worker, one at a time, first in first out.

The worker holds one GPU and one ModelManager; two jobs at once would fight over
VRAM and the manager's model sets. So every endpoint only *submits*: the job is
recorded in the :class:`~storystudio.serve.store.JobStore` (``queued``) and put on an
in-memory FIFO, under one lock, so queue order is submission order. The thread takes
jobs off the FIFO, marks them ``running``, calls ``Worker.handle`` (which never
raises) and stores the result (``completed``/``failed``) with its times.

Synchronous endpoints await :meth:`GpuQueue.wait`, an asyncio future the thread
resolves, so a request waiting for its video holds no thread of the event loop's pool.
A client that disconnects does not cancel its job: the result is stored and can be
read with the job id.

At start the queue first fails what a previous process left unfinished
(:meth:`JobStore.recover`), then pre-warms the model set named by
``STORYSTUDIO_PREWARM`` on the GPU thread, so the service answers ``/health`` while
the weights load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from storystudio.serve.store import JobRecord, JobStore, describe_input

log = logging.getLogger(__name__)

RunJob = Callable[[dict[str, Any]], dict[str, Any]]
# What an estimate assumes before this service has finished a job of the task.
FIRST_ESTIMATE_S = {"image": 30.0, "video": 300.0, "batch": 1200.0}


def _resolve(fut: asyncio.Future, record: JobRecord) -> None:
    if not fut.done():
        fut.set_result(record)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class GpuQueue:
    """One FIFO, one worker thread."""

    def __init__(self, store: JobStore, run: RunJob, prewarm: Callable[[], None] | None = None,
                 snapshot: Callable[[], dict[str, Any]] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._run = run
        self._prewarm = prewarm
        self._snapshot = snapshot
        self._clock = clock
        self._fifo: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._thread: threading.Thread | None = None
        self.warming = False
        # What ``snapshot`` (the ModelManager's stats) said after the last job. Taken on the
        # GPU thread: the manager's lock is held for a whole generation, so a request
        # asking the manager directly would wait for the running job.
        self.models_state: dict[str, Any] = {}

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.store.recover(self._clock())
        self.warming = self._prewarm is not None
        self._thread = threading.Thread(target=self._loop, name="gpu-queue", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop after the job it runs; jobs still queued stay ``queued``
        in the table and are failed as ``server_restarted`` by the next start."""
        if self._thread is None:
            return
        self._fifo.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the GPU thread is still running a job; it ends with the process")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ submitting and waiting
    def submit(self, *, api: str, task: str, api_key: str, job_input: dict[str, Any], meta: dict[str, Any],
               max_unfinished: int, files: Mapping[str, bytes] | None = None) -> JobRecord:
        """Record and enqueue one job; raises :class:`~storystudio.serve.store.TooManyJobs`."""
        params, hashes = describe_input(job_input, files)
        job_id = uuid.uuid4().hex
        with self._lock:  # the row's seq and the FIFO position are taken together
            record = self.store.add(job_id=job_id, api=api, task=task, api_key=api_key, params=params,
                                    input_hashes=hashes, meta=meta, now=self._clock(),
                                    max_unfinished=max_unfinished)
            self._fifo.put((job_id, job_input))
        log.info("job %s queued (%s, %s, key %s)", job_id, api, task, api_key)
        return record

    async def wait(self, job_id: str) -> JobRecord | None:
        """The job's record once it has finished (None for an unknown id)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[JobRecord] = loop.create_future()
        with self._lock:
            record = self.store.get(job_id)
            if record is None or record.finished:
                return record
            self._waiters.setdefault(job_id, []).append((loop, fut))
        return await fut

    def estimate_seconds(self, record: JobRecord) -> int:
        """Rough seconds until ``record`` finishes: the mean run time of its task times the
        jobs ahead of it plus itself (a plain heuristic; the first job of a kind uses
        :data:`FIRST_ESTIMATE_S`)."""
        per_job = self.store.mean_run_seconds(record.task) or FIRST_ESTIMATE_S.get(record.task, 300.0)
        if record.finished:
            return 0
        # at least 1 s while unfinished: 0 would read as "done" (tiny jobs run in under 0.5 s)
        return max(1, math.ceil(per_job * (self.store.ahead_of(record) + 1)))

    # ------------------------------------------------------------------ the GPU thread
    def _loop(self) -> None:
        if self._prewarm is not None:
            try:
                self._prewarm()
            except Exception:  # noqa: BLE001 - jobs will report the broken model set themselves
                log.exception("pre-warming failed")
            finally:
                self.warming = False
        self._take_snapshot()
        while True:
            item = self._fifo.get()
            if item is None:
                return
            job_id, job_input = item
            del item
            self._run_one(job_id, job_input)
            del job_input  # the inline media of a finished job are not kept
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        if self._snapshot is None:
            return
        try:
            self.models_state = self._snapshot()
        except Exception:  # noqa: BLE001 - informational only
            log.warning("could not read the model manager's state", exc_info=True)

    def _run_one(self, job_id: str, job_input: dict[str, Any]) -> None:
        try:
            self.store.mark_running(job_id, self._clock())
        except Exception:  # noqa: BLE001 - the job still runs; its times are then incomplete
            log.exception("job %s: could not record its start", job_id)
        try:
            result = self._run({"id": job_id, "input": job_input})
        except BaseException as exc:  # noqa: BLE001 - Worker.handle never raises; this thread must not die
            log.exception("job %s: the worker raised", job_id)
            result = {"error": f"internal_error: {type(exc).__name__}: {exc}", "code": "internal_error"}
        try:
            with self._lock:
                record = self.store.finish(job_id, result, self._clock())
                waiters = self._waiters.pop(job_id, [])
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the waiting requests get a 500
            log.exception("job %s: could not store its result", job_id)
            with self._lock:
                waiters = self._waiters.pop(job_id, [])
            for loop, fut in waiters:
                try:
                    loop.call_soon_threadsafe(_fail, fut, RuntimeError(f"could not store the result: {exc}"))
                except RuntimeError:
                    pass
            return
        log.info("job %s %s in %.1f s", job_id, record.status,
                 (record.finished_at or 0) - (record.started_at or record.created_at))
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut, record)
            except RuntimeError:  # the event loop is closed: the service is shutting down
                pass
