"""What every endpoint works with: settings, the worker, the queue, the two folders.

One :class:`ServeContext` per app, reached from a request with :func:`get_context`.
:meth:`ServeContext.submit` is the only way a request becomes a job: the job input is
validated by the worker's own schema (:func:`storystudio.tasks.parse_job_input`)
before it is queued, so a bad request fails in milliseconds with the same message the
worker would give, and the per-key concurrency limit answers 429.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from storystudio.serve.auth import ANONYMOUS, SCOPE_KEY
from storystudio.serve.paths import MediaRoot, OutputFolder
from storystudio.serve.queue import GpuQueue
from storystudio.serve.settings import ServeSettings
from storystudio.serve.store import JobRecord, JobStore, TooManyJobs
from storystudio.tasks import parse_job_input
from storystudio.worker import Worker

RETRY_AFTER_S = 30


@dataclass
class ServeContext:
    settings: ServeSettings
    worker: Worker
    store: JobStore
    queue: GpuQueue
    output: OutputFolder
    media: MediaRoot

    def submit(self, request: Request, *, api: str, job_input: dict[str, Any], meta: dict[str, Any] | None = None,
               files: Mapping[str, bytes] | None = None) -> JobRecord:
        """Validate ``job_input`` with the worker's schema and queue it for the caller's key."""
        task = parse_job_input(job_input)  # InvalidInput -> 422 through storystudio.serve.errors
        try:
            return self.queue.submit(api=api, task=task.task, api_key=caller_key(request), job_input=job_input,
                                     meta=meta or {}, files=files, max_unfinished=self.settings.max_jobs_per_key)
        except TooManyJobs as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def job_or_404(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise HTTPException(404, f"job {job_id!r} not found")
        return record


def get_context(request: Request) -> ServeContext:
    return request.app.state.serve


def caller_key(request: Request) -> str:
    """The label of the key the request came with (set by the auth middleware)."""
    return request.scope.get(SCOPE_KEY, ANONYMOUS)


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")
