"""The worker process: one ModelManager, one storage backend, and the job entry point.

``handler.py`` builds a :class:`Worker` once at start-up and hands every RunPod job
to :meth:`Worker.handle`. Nothing is loaded at start-up unless
``STORYSTUDIO_PREWARM`` asks for it: the first job loads only the model set it
needs, so an image-only endpoint never pays for Wan's 45 GB.

``handle`` never raises: every failure becomes ``{"error", "code"}`` in the job
result, and the worker stays ready for the next job.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from storystudio.config import WorkerSettings
from storystudio.errors import StoryStudioError
from storystudio.first_spec import add_first_spec_names
from storystudio.models.footprint import folder_weight_bytes
from storystudio.models.model_manager import GiB, ModelManager
from storystudio.progress import ProgressReporter, Sink
from storystudio.batch import run_batch
from storystudio.render import IMAGE_SET, VIDEO_SET, RenderContext, run_image_task, run_video_task
from storystudio.storage import Storage, make_storage
from storystudio.tasks import BatchTask, ImageTask, VideoTask, parse_job_input

logger = logging.getLogger(__name__)

EngineHook = Callable[[Any], Any]


Runner = Callable[[RenderContext, Any, ProgressReporter], dict[str, Any]]


def route(task: ImageTask | VideoTask | BatchTask) -> Runner:
    """The runner for a parsed task: ``runner(ctx, task, progress) -> result dict``."""
    if isinstance(task, ImageTask):
        return run_image_task
    if isinstance(task, VideoTask):
        return run_video_task
    return run_batch


def _image_loader(settings: WorkerSettings):
    def load(device: torch.device):
        from storystudio.models.image_generator import ZImageGenerator

        return ZImageGenerator.from_pretrained(settings.zimage_dir, device=str(device))

    return load


def _video_loader(settings: WorkerSettings, manager: ModelManager, on_loaded: EngineHook | None = None):
    def load(device: torch.device):
        from storystudio.models.video_generator import WanS2VGenerator

        engine = WanS2VGenerator.from_pretrained(
            settings.wan_dir,
            device=str(device),
            options=settings.video_path,
            compile_cache_dir=settings.compile_cache_dir,
            memory_limit=lambda: manager.budget_bytes,
            memory_headroom_bytes=int(settings.vram_reserve_gib * GiB),
        )
        if settings.fast_preset == "preload":
            # The fast preset's FP8 copy of the DiT linears, built with the set so that it
            # is a component from the start (lazy: at the first job that uses it).
            from storystudio.models.fp8 import fp8_support

            support = fp8_support(device)
            if support.available:
                engine.build_fp8(support.granularity)
        return engine if on_loaded is None else on_loaded(engine)

    return load


def build_manager(settings: WorkerSettings, *, on_video_loaded: EngineHook | None = None) -> ModelManager:
    """The process's one ModelManager with both model sets registered (nothing loaded).

    ``on_video_loaded(engine) -> engine`` runs once, right after the Wan engine is built
    (the multi-GPU rank 0 makes its DiT forward parallel there, see storystudio/distributed).
    """
    manager = ModelManager(settings.device, budget_gib=settings.vram_budget_gib, reserve_gib=settings.vram_reserve_gib)
    on_cpu = torch.device(settings.device).type == "cpu"
    manager.register(
        IMAGE_SET,
        _image_loader(settings),
        size_hint_bytes=folder_weight_bytes(settings.zimage_dir, itemsize=4 if on_cpu else 2),
    )
    manager.register(
        VIDEO_SET,
        _video_loader(settings, manager, on_video_loaded),
        size_hint_bytes=folder_weight_bytes(settings.wan_dir, itemsize=4 if on_cpu else 2),
    )
    return manager


class Worker:
    """Turns RunPod jobs into results."""

    def __init__(self, settings: WorkerSettings, manager: ModelManager, storage: Storage, sink: Sink | None = None):
        self.settings = settings
        self.manager = manager
        self.storage = storage
        self.sink = sink

    @classmethod
    def from_settings(cls, settings: WorkerSettings, sink: Sink | None = None, *,
                      on_video_loaded: EngineHook | None = None) -> Worker:
        return cls(settings, build_manager(settings, on_video_loaded=on_video_loaded),
                   make_storage(settings.storage), sink)

    def prewarm(self) -> None:
        """Load the model set named by ``STORYSTUDIO_PREWARM`` before the first job arrives."""
        name = self.settings.prewarm
        if name == "none":
            return
        t0 = time.perf_counter()
        try:
            self.manager.ensure(name)
        except Exception:  # a broken volume must not keep the worker from answering jobs with a clear error
            logger.exception("pre-warming model set %s failed; jobs will report the error", name)
            return
        logger.info("pre-warmed model set %s in %.1f s", name, time.perf_counter() - t0)

    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id = str(job.get("id") or f"local-{uuid.uuid4().hex[:12]}")
        t0 = time.perf_counter()
        progress = ProgressReporter(job, self.sink)
        try:
            task = parse_job_input(job.get("input"))
            ctx = RenderContext(
                settings=self.settings,
                manager=self.manager,
                storage=self.storage,
                job_id=job_id,
                project_id=task.project_id if isinstance(task, BatchTask) else None,
            )
            logger.info("job %s: task %s", job_id, task.task)
            result = add_first_spec_names(task, route(task)(ctx, task, progress))
        except StoryStudioError as exc:
            logger.warning("job %s failed: %s (%s)", job_id, exc.message, exc.code)
            return {**exc.to_result(), "job_id": job_id}
        except Exception as exc:  # noqa: BLE001 - the worker must survive anything a job does
            logger.exception("job %s crashed", job_id)
            return {"error": f"internal_error: {type(exc).__name__}: {exc}", "code": "internal_error", "job_id": job_id}
        result["job_id"] = job_id
        result["task"] = task.task
        result.setdefault("total_time", round(time.perf_counter() - t0, 3))
        result["manager"] = self.manager.stats().as_dict()
        return result
