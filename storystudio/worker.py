"""The worker process: pre-flight, one ModelManager, one storage backend, and the job entry point.

``handler.py`` builds a :class:`Worker` once at start-up and hands every RunPod job
to :meth:`Worker.handle`. Start-up finds the two model folders
(:mod:`storystudio.models.locate`: explicit folder, flat folder, RunPod's cached
models, Hugging Face cache) and runs the GPU pre-flight (:mod:`storystudio.preflight`),
which fails the process at once on an unusable GPU and picks the ModelManager's
policy from the card's size. Nothing is loaded unless ``STORYSTUDIO_PREWARM`` asks
for it: the first job loads only the model set it needs, so an image-only endpoint
never pays for Wan's 45 GB. A pre-warmed set is also warmed up (one tiny generation
at the common shapes), so that the first job runs at steady speed.

``handle`` never raises: every failure becomes ``{"error", "code"}`` in the job
result, and the worker stays ready for the next job.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from storystudio.batch import run_batch
from storystudio.config import WorkerSettings
from storystudio.deadline import Deadline
from storystudio.errors import CheckpointError, StoryStudioError
from storystudio.first_spec import add_first_spec_names
from storystudio.models.footprint import folder_weight_bytes, image_working_bytes, video_working_bytes
from storystudio.models.locate import WAN, ZIMAGE, Located, ModelRef, candidates, locate
from storystudio.models.model_manager import GiB, ModelManager
from storystudio.preflight import GpuFacts, PreflightReport, run_preflight
from storystudio.progress import ProgressReporter, Sink
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


class ModelFolders:
    """Where each model set's folder is, found once at start and again at load time if it was missing."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._refs: dict[str, tuple[ModelRef, Any]] = {
            IMAGE_SET: (ZIMAGE, settings.zimage_dir),
            VIDEO_SET: (WAN, settings.wan_dir),
        }
        self._found: dict[str, Located] = {}
        self.errors: dict[str, CheckpointError] = {}
        for name in self._refs:
            self._try(name)

    def _try(self, name: str) -> Located | None:
        ref, explicit = self._refs[name]
        try:
            self._found[name] = locate(ref, explicit, self.settings.model_search)
            self.errors.pop(name, None)
        except CheckpointError as exc:
            self.errors[name] = exc
            logger.error("model set %s: %s", name, exc.message)
        return self._found.get(name)

    def get(self, name: str) -> Located:
        """The set's folder; a set not found at start is looked for again (a volume mounted late)."""
        found = self._found.get(name) or self._try(name)
        if found is None:
            raise self.errors[name]
        return found

    def found(self, name: str) -> Located | None:
        """The set's folder if it was found (no new search)."""
        return self._found.get(name)

    def first_candidate(self, name: str) -> Path | None:
        """Where the set is looked for first (what to report while it is missing)."""
        ref, explicit = self._refs[name]
        return candidates(ref, explicit, self.settings.model_search)[0].path

    def dit_attention_shape(self) -> tuple[int, int]:
        """(heads, head dim) of the Wan DiT found, for the attention self-check; the release's if unknown."""
        found = self._found.get(VIDEO_SET)
        if found is not None:
            from storystudio.models.checkpoints.common import read_json
            from storystudio.models.checkpoints.wan_s2v import CONFIG_FILE

            config = read_json(found.path / CONFIG_FILE)
            heads = int(config.get("num_heads", 40))
            return heads, int(config.get("dim", 5120)) // heads
        return 40, 128

    def weight_bytes(self, name: str, *, itemsize: int) -> int | None:
        found = self._found.get(name)
        return None if found is None else folder_weight_bytes(found.path, itemsize=itemsize)


def _loader(folders: ModelFolders, name: str, settings: WorkerSettings, manager: ModelManager,
            report: PreflightReport | None, on_loaded: EngineHook | None = None):
    def load(device: torch.device):
        folder = folders.get(name)  # validated when it was found
        if name == IMAGE_SET:
            from storystudio.models.image_generator import ZImageGenerator

            return ZImageGenerator.plan(folder.path, device=device, validate=False)
        from storystudio.models.video_generator import WanS2VGenerator

        plan = WanS2VGenerator.plan(
            folder.path,
            device=device,
            validate=False,
            options=settings.video_path,
            attention=None if report is None else report.attention,  # the pre-flight's self-check, if it ran
            compile_cache_dir=settings.compile_cache_dir,
            memory_limit=lambda: manager.budget_bytes,
            make_room=lambda nbytes: manager.park_idle(VIDEO_SET, nbytes),
            memory_headroom_bytes=int(settings.vram_reserve_gib * GiB),
        )
        if settings.fast_preset == "preload":
            # The fast preset's FP8 copy of the DiT linears is quantized from the loaded
            # bf16 weights, so it is built once they are read (the manager adopts it).
            plan.after_load = _build_fp8
        if on_loaded is not None:
            plan.engine = on_loaded(plan.engine)
        return plan

    return load


def _build_fp8(engine: Any) -> None:
    from storystudio.models.fp8 import fp8_support

    support = fp8_support(engine.device)
    if support.available:
        engine.build_fp8(support.granularity)


def planned_working_bytes() -> dict[str, int]:
    """Activations of the largest common job per set (720p video, the largest image): the parking decision."""
    from storystudio.limits import IMAGE_SIZE_MAX, RESOLUTIONS

    return {IMAGE_SET: image_working_bytes(IMAGE_SIZE_MAX, IMAGE_SIZE_MAX),
            VIDEO_SET: video_working_bytes(RESOLUTIONS["720p"])}


def build_manager(settings: WorkerSettings, folders: ModelFolders | None = None,
                  report: PreflightReport | None = None, *,
                  on_video_loaded: EngineHook | None = None) -> ModelManager:
    """The process's one ModelManager with both model sets registered (nothing loaded).

    ``report`` (the pre-flight's) sets the budget and the policy; without one the
    manager reads the device itself and keeps both sets when they fit.
    ``on_video_loaded(engine) -> engine`` runs once, when the Wan engine is built
    (the multi-GPU rank 0 makes its DiT forward parallel there, see storystudio/distributed).
    """
    folders = folders or ModelFolders(settings)
    itemsize = 4 if torch.device(settings.device).type == "cpu" else 2
    budget_gib = settings.vram_budget_gib
    if budget_gib is None and report is not None and report.gpu is not None and report.budget_bytes is not None:
        budget_gib = report.budget_bytes / GiB
    manager = ModelManager(
        settings.device,
        budget_gib=budget_gib,
        reserve_gib=settings.vram_reserve_gib,
        exclusive=report is not None and report.policy == "always-swap",
        host_headroom_gib=settings.host_headroom_gib,
    )
    working = planned_working_bytes()
    for name in (IMAGE_SET, VIDEO_SET):
        manager.register(
            name,
            _loader(folders, name, settings, manager, report, on_video_loaded if name == VIDEO_SET else None),
            size_hint_bytes=folders.weight_bytes(name, itemsize=itemsize) or 0,
            max_working_bytes=working[name],
        )
    return manager


class Worker:
    """Turns RunPod jobs into results."""

    def __init__(self, settings: WorkerSettings, manager: ModelManager, storage: Storage, sink: Sink | None = None,
                 *, folders: ModelFolders | None = None):
        self.settings = settings
        self.manager = manager
        self.storage = storage
        self.sink = sink
        self._folders = folders
        self.preflight: PreflightReport | None = None
        self.startup_seconds: dict[str, float] = {}

    @property
    def folders(self) -> ModelFolders:
        if self._folders is None:
            self._folders = ModelFolders(self.settings)
        return self._folders

    @classmethod
    def from_settings(cls, settings: WorkerSettings, sink: Sink | None = None, *,
                      gpu: GpuFacts | None = None, on_video_loaded: EngineHook | None = None,
                      storage: Storage | None = None) -> Worker:
        """Find the models, run the pre-flight (raises :class:`~storystudio.preflight.PreflightError`
        when this GPU cannot serve), build the manager. ``gpu`` fakes the device's facts (tests);
        ``storage`` replaces the one the settings describe (the HTTP service's output folder)."""
        t0 = time.perf_counter()
        folders = ModelFolders(settings)
        device = torch.device(settings.device)
        report = run_preflight(
            device,
            budget_override_bytes=None if settings.vram_budget_gib is None else int(settings.vram_budget_gib * GiB),
            reserve_bytes=int(settings.vram_reserve_gib * GiB),
            wan_bytes=folders.weight_bytes(VIDEO_SET, itemsize=2),
            image_bytes=folders.weight_bytes(IMAGE_SET, itemsize=2),
            facts=gpu,
            attention_shape=folders.dit_attention_shape(),
            attention_request=settings.video_path.attention,
        )
        manager = build_manager(settings, folders, report, on_video_loaded=on_video_loaded)
        worker = cls(settings, manager, storage or make_storage(settings.storage), sink, folders=folders)
        worker.preflight = report
        worker.startup_seconds["locate_and_preflight"] = time.perf_counter() - t0
        return worker

    def prewarm(self) -> None:
        """Load each set named by ``STORYSTUDIO_PREWARM`` and warm it up before the first job arrives.

        The warm-up is one tiny generation at the common shapes (a 1-step 1024² image; a
        1-step, guided 480p clip): whatever only a first call pays — cuBLAS/cuDNN
        handles and workspaces, lazily loaded kernels, the caching allocator's first
        blocks, compiling the DiT blocks for that clip size (or loading them from the
        compile cache) — is paid here, timed and logged, not by the first job.
        """
        for name in self.settings.prewarm:
            t0 = time.perf_counter()
            try:
                self.manager.ensure(name)
                t1 = time.perf_counter()
                self.manager.run(name, self._warmup)
            except Exception:  # a broken volume must not keep the worker from answering jobs with a clear error
                logger.exception("pre-warming model set %s failed; jobs will report the error", name)
                continue
            t2 = time.perf_counter()
            self.startup_seconds[f"load_{name}"] = t1 - t0
            self.startup_seconds[f"warmup_{name}"] = t2 - t1
            logger.info("pre-warmed model set %s: loaded in %.2f s, warmed up in %.2f s", name, t1 - t0, t2 - t1)

    def _warmup(self, engine: Any) -> float:
        if engine.name == "zimage":
            width, height = self.settings.warmup_image
            return engine.warmup(width=width, height=height)
        width, height, frames = self.settings.warmup_video
        return engine.warmup(width=width, height=height, infer_frames=frames)

    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id = str(job.get("id") or f"local-{uuid.uuid4().hex[:12]}")
        t0 = time.perf_counter()
        progress = ProgressReporter(job, self.sink)
        deadline = Deadline(self.settings.job_timeout_s)  # the budget counts from the job's arrival
        try:
            task = parse_job_input(job.get("input"))
            ctx = RenderContext(
                settings=self.settings,
                manager=self.manager,
                storage=self.storage,
                job_id=job_id,
                project_id=task.project_id if isinstance(task, BatchTask) else None,
                deadline=deadline,
            )
            logger.info("job %s: task %s", job_id, task.task)
            result = add_first_spec_names(task, route(task)(ctx, task, progress))
        except StoryStudioError as exc:
            logger.warning("job %s failed: %s (%s)", job_id, exc.message, exc.code)
            return {**exc.to_result(), "job_id": job_id}
        except torch.OutOfMemoryError as exc:  # the manager reports its own; this is one from outside it
            logger.warning("job %s ran out of GPU memory outside the model manager: %s", job_id, exc)
            return {"error": f"out_of_memory: {exc}", "code": "out_of_memory", "job_id": job_id}
        except Exception as exc:  # noqa: BLE001 - the worker must survive anything a job does
            logger.exception("job %s crashed", job_id)
            return {"error": f"internal_error: {type(exc).__name__}: {exc}", "code": "internal_error", "job_id": job_id}
        result["job_id"] = job_id
        result["task"] = task.task
        result.setdefault("total_time", round(time.perf_counter() - t0, 3))
        result["manager"] = self.manager.stats().as_dict()
        return result
