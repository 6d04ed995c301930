"""The FastAPI application: service info, health, models, RunPod-style jobs, and the earlier API.

``create_app(settings, worker)`` wires one :class:`~storystudio.worker.Worker` (its
one ModelManager) to one :class:`~storystudio.serve.queue.GpuQueue` and one SQLite
job table. The app must run in a single process (``uvicorn`` with one worker): the
GPU, the queue and the database lock belong to that process.

``GET /``            service info: models, whether auth is on, version (public)
``GET /health``      liveness and queue length (public)
``GET /models``      the two model sets, where they are read from and whether they are loaded
``POST /jobs``       ``{"input": {...}}``: the RunPod job input (``image`` / ``video`` / ``batch``),
                     answered ``{"id", "status": "IN_QUEUE"}`` (``?wait=true``: when finished)
``GET /jobs/{id}``   ``{"id", "status", "output" | "error", "code", times, input hashes}`` in
                     RunPod's status spelling; result file URLs point at ``/videos``
plus the earlier API of :mod:`storystudio.serve.legacy`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from storystudio import __version__
from storystudio.render import IMAGE_SET, VIDEO_SET
from storystudio.serve import errors, legacy
from storystudio.serve.auth import AuthMiddleware
from storystudio.serve.context import ServeContext, base_url, get_context
from storystudio.serve.uploads import BodyLimitMiddleware, BodyLimits
from storystudio.serve.paths import MediaRoot, OutputFolder
from storystudio.serve.queue import GpuQueue
from storystudio.serve.settings import ServeSettings
from storystudio.serve.store import JobRecord, JobStore
from storystudio.worker import Worker

PUBLIC_PATHS = frozenset({"/", "/health"})
JOB_STATUS = {"queued": "IN_QUEUE", "running": "IN_PROGRESS", "completed": "COMPLETED", "failed": "FAILED"}
Ctx = Annotated[ServeContext, Depends(get_context)]


class JobRequest(BaseModel):
    """RunPod's request envelope; ``input`` is validated by the worker's schema, not here."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any]


def job_view(ctx: ServeContext, record: JobRecord, base: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": record.id,
        "status": JOB_STATUS[record.status],
        "api": record.api,
        "task": record.task,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "input_hashes": record.input_hashes,
    }
    if record.status == "completed":
        body["output"] = ctx.output.public(record.result, base)
    elif record.status == "failed":
        body["error"] = (record.result or {}).get("error")
        body["code"] = record.error_code
    else:
        body["estimated_time"] = ctx.queue.estimate_seconds(record)
    return body


def _models(ctx: ServeContext) -> list[dict[str, Any]]:
    state = ctx.queue.models_state
    folders = ctx.worker.folders
    out = []
    for set_name, model_id, name, task in (
        (VIDEO_SET, "wan2.2-s2v-14b", "Wan2.2-S2V-14B", "speech-to-video"),
        (IMAGE_SET, "z-image-turbo", "Z-Image-Turbo", "text-to-image"),
    ):
        found = folders.found(set_name)
        path = found.path if found is not None else folders.first_candidate(set_name)
        loaded = ("resident" if set_name in state.get("resident", ()) else
                  "parked" if set_name in state.get("parked", ()) else "not loaded")
        out.append({"id": model_id, "name": name, "task": task, "set": set_name, "path": str(path),
                    "available": found is not None, "state": loaded})
    return out


def create_app(settings: ServeSettings, worker: Worker) -> FastAPI:
    store = JobStore(settings.database)
    queue = GpuQueue(store, worker.handle, prewarm=worker.prewarm,
                     snapshot=lambda: worker.manager.stats().as_dict())
    ctx = ServeContext(settings=settings, worker=worker, store=store, queue=queue,
                       output=OutputFolder(settings.output_dir), media=MediaRoot(settings.media_root))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        yield
        queue.stop(timeout=1.0)

    app = FastAPI(title="Story Studio", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Z-Image-Turbo images and Wan2.2-S2V talking videos on one GPU.")
    app.state.serve = ctx
    errors.install(app)
    # Added last = outermost: the key is checked before the body limit, which runs before any body is read.
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.from_inputs(settings.worker.inputs))
    app.add_middleware(AuthMiddleware, keys=settings.keys, public_paths=PUBLIC_PATHS)
    app.include_router(legacy.router)

    @app.get("/")
    async def info() -> dict[str, Any]:
        return {
            "service": "storystudio",
            "version": __version__,
            "models": [m["name"] for m in _models(ctx)],
            "auth": settings.keys.enabled,
            "auth_header": "X-API-Key",
            "endpoints": ["/health", "/models", "/generate-video", "/status/{job_id}", "/generate/speech-to-video",
                          "/videos", "/videos/{filename}", "/jobs", "/jobs/{id}"],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the GPU thread runs (also while it pre-warms), 503 if it has died."""
        body = {"status": "ok" if queue.alive else "error", "warming": queue.warming,
                "device": settings.worker.device, "queue": store.counts()}
        return JSONResponse(body, status_code=200 if queue.alive else 503)

    @app.get("/models")
    async def models(c: Ctx) -> dict[str, Any]:
        return {"models": _models(c), "device": settings.worker.device}

    @app.post("/jobs")
    async def submit_job(body: JobRequest, request: Request, c: Ctx,
                         wait: Annotated[bool, Query(description="answer when the job has finished")] = False):
        record = c.submit(request, api="jobs", job_input=body.input)
        if wait:
            record = await c.queue.wait(record.id) or record
        return job_view(c, record, base_url(request))

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str, request: Request, c: Ctx):
        return job_view(c, c.job_or_404(job_id), base_url(request))

    return app
