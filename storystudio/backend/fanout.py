"""One story over N workers of the endpoint: images in one job, then a ``video`` job per scene.

A ``batch`` job renders a whole story on one worker, one scene after the other. With
``storystudio submit story.json --workers N`` the client spreads it instead:

1. ``workersMin`` is raised to N for the duration (:class:`~storystudio.backend.warm.
   WarmWorkers`: restored after success, failure, Ctrl-C and SIGTERM);
2. every scene's image is rendered by **one** ``batch`` job with ``images_only: true``
   (one Z-Image load on one worker; no audio fetched, no video);
3. each scene's video is a ``video`` job (its image URL from step 2, or its given image),
   N submitted at a time from a thread pool; RunPod's queue hands them to the N workers;
4. a scene whose worker died (job ``FAILED`` without a worker error code, ``rank_failed``,
   ``TIMED_OUT``, or the job vanished: 404 on ``/status``) is submitted again, at most
   ``max_attempts`` times in all; an error the worker reports for the input itself
   (``invalid_audio``, ``out_of_memory``, ...) is final for that scene;
5. the result has the shape of a ``batch`` job's (``scenes``, ``scenes_ok``,
   ``scenes_failed``, ``images_time``, ``swap_time``, ``video_load_time``,
   ``videos_time``, ``total_time``), so the caller cannot tell the difference except for
   the extra ``fanout`` block (workers, job ids, attempts per scene). The times are wall
   times measured here, so they include queueing.

Seeds and prompts follow the batch rules (:meth:`storystudio.tasks.BatchTask.scene_seed`,
:attr:`storystudio.tasks.Scene.video_text`), so a scene renders the same video either way.
If the client is interrupted, every job still running is cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from storystudio.batch_result import assemble
from storystudio.first_spec import add_first_spec_names
from storystudio.tasks import BatchTask, parse_job_input

from .client import PollSettings, RunPodClient
from .errors import BackendError, JobFailed, RunPodAPIError
from .results import StoryResult
from .story import Story
from .submit import ProgressUpdate, interpret_final, refuse_local_files
from .warm import WarmWorkers

log = logging.getLogger(__name__)

#: Codes meaning "the worker went away", not "the input is bad": the scene is retried.
#: ``job_failed`` is what a FAILED job without a worker error code gets (the worker
#: always prefixes its own errors with a code), ``job_lost`` a job RunPod no longer knows.
RETRYABLE_CODES = frozenset({"job_failed", "job_timed_out", "job_lost", "rank_failed"})

# Keys a video job's result carries for the job itself, not for the scene.
_JOB_KEYS = frozenset({"job_id", "task", "total_time", "manager", "parallel", "seed"})


class _Aborted(Exception):
    """Internal: a scene thread noticed the story is being abandoned."""


@dataclass
class _SceneRun:
    scene_id: str
    job_ids: list[str] = field(default_factory=list)
    attempts: int = 0


def images_input(task: BatchTask) -> dict[str, Any] | None:
    """The ``images_only`` batch job for the scenes that need a generated image (None: none do).

    All scenes are sent, in order, so each keeps the seed it has in a full batch
    (batch seed + index); scenes with a given image are skipped by the worker.
    """
    if all(s.image for s in task.scenes):
        return None
    data = task.model_dump(mode="json", exclude_unset=True)
    data["images_only"] = True
    data["scenes"] = [s.model_dump(mode="json", exclude_unset=True) | {"scene_id": s.scene_id} for s in task.scenes]
    return data


def video_input(task: BatchTask, index: int, image: str) -> dict[str, Any]:
    """The ``video`` job of scene ``index``, equivalent to that scene inside a batch."""
    scene = task.scenes[index]
    data: dict[str, Any] = {"task": "video", "image": image, "audio": scene.audio, "prompt": scene.video_text}
    data.update(task.video.model_dump(mode="json", exclude_unset=True))
    for key in ("pose_video", "audio_start", "audio_duration"):
        if getattr(scene, key) is not None:
            data[key] = getattr(scene, key)
    seed = task.scene_seed(index)
    if seed is not None:
        data["seed"] = seed
    parse_job_input(data)  # the worker's own schema: a bug here must not cost a GPU job
    return data


class FanOut:
    """Runs one story as an images job plus parallel video jobs (see the module doc)."""

    def __init__(
        self,
        client: RunPodClient,
        endpoint_id: str,
        workers: int,
        *,
        timeout: float = 3600.0,
        poll: PollSettings | None = None,
        execution_timeout: float | None = -1,
        max_attempts: int = 3,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError("workers must be an int >= 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.client = client
        self.endpoint_id = endpoint_id
        self.workers = workers
        self.timeout = timeout
        self.poll = poll or PollSettings()
        self.execution_timeout = max(timeout, 10.0) if execution_timeout == -1 else execution_timeout
        self.max_attempts = max_attempts
        self.on_progress = on_progress
        self._stop = threading.Event()
        self._live: dict[str, str] = {}  # job id -> scene id, jobs not known to be final
        self._live_lock = threading.Lock()
        self._deadline = 0.0

    # ------------------------------------------------------------------ jobs
    def _progress(self, job_id: str, stage: str, done: int | None = None, total: int | None = None,
                  message: str | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(ProgressUpdate(job_id, "IN_PROGRESS", stage, message,
                                            None if done is None else float(done),
                                            None if total is None else float(total)))

    def _submit(self, job_input: Mapping[str, Any], label: str) -> str:
        job = self.client.run(self.endpoint_id, job_input, execution_timeout_s=self.execution_timeout)
        with self._live_lock:
            self._live[job.id] = label
        if self._stop.is_set():  # the story was abandoned while this job was being submitted
            self.cancel_live()
            raise _Aborted
        log.info("%s: job %s submitted", label, job.id)
        return job.id

    def _wait(self, job_id: str):
        """Poll ``/status`` until final, abort or deadline (then: JobFailed ``job_timed_out``)."""
        interval = self.poll.initial
        try:
            while True:
                if self._stop.is_set():
                    raise _Aborted
                try:
                    status = self.client.status(self.endpoint_id, job_id)
                except RunPodAPIError as exc:
                    if exc.status == 404:
                        raise JobFailed(f"job {job_id} is gone (HTTP 404 on /status): its worker was lost",
                                        job_id=job_id, status="LOST", code="job_lost") from None
                    raise
                if status.done:
                    return status
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._cancel(job_id)
                    raise JobFailed(f"job {job_id} still {status.status} when the story's {self.timeout:g} s "
                                    "ran out", job_id=job_id, status=status.status, code="client_timeout")
                self._stop.wait(min(interval, left))
                interval = min(self.poll.maximum, interval * self.poll.factor)
        finally:
            if not self._stop.is_set():
                with self._live_lock:
                    self._live.pop(job_id, None)

    def _cancel(self, job_id: str) -> None:
        try:
            self.client.cancel(self.endpoint_id, job_id)
        except BackendError as exc:
            log.error("could not cancel job %s (%s); cancel it by hand: storystudio cancel %s --endpoint %s",
                      job_id, exc, job_id, self.endpoint_id)

    def cancel_live(self) -> None:
        """Cancel every job not known to be final (on abort)."""
        with self._live_lock:
            live = dict(self._live)
            self._live.clear()
        for job_id, label in live.items():
            log.warning("%s: cancelling job %s", label, job_id)
            self._cancel(job_id)

    # ------------------------------------------------------------------ phases
    def _images(self, task: BatchTask, story: Story) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Scene id → image fields from the images job (or the given image)."""
        out: dict[str, dict[str, Any]] = {s.scene_id: {"scene_id": s.scene_id} for s in task.scenes}  # type: ignore[misc]
        for s in task.scenes:
            if s.image:
                out[s.scene_id]["image_source"] = "input"  # type: ignore[index]
        data = images_input(task)
        if data is None:
            return out, None
        job_id = self._submit(data, "images")
        self._progress(job_id, "images", 0, len(task.scenes))
        try:
            result: StoryResult = interpret_final(self._wait(job_id), story, redact=self.client.scrub)
        except JobFailed as exc:
            # The whole images job failed: every scene that needed an image fails at that stage.
            for s in task.scenes:
                if not s.image:
                    out[s.scene_id]["error"] = {"error": str(exc), "code": exc.code, "stage": "image"}  # type: ignore[index]
            return out, job_id
        for sr in result.scenes:
            if sr.scene_id not in out or out[sr.scene_id].get("image_source") == "input":
                continue
            entry = out[sr.scene_id]
            entry.update({k: v for k, v in sr.extra.items()})
            if sr.image_url is not None:
                entry["image_url"] = sr.image_url
            if sr.image_seed is not None:
                entry["image_seed"] = sr.image_seed
            if sr.error is not None:
                entry["error"] = sr.error.to_dict()
        return out, job_id

    def _video(self, task: BatchTask, index: int, image: str, run: _SceneRun) -> dict[str, Any]:
        """Render one scene's video, resubmitting while its worker dies (bounded)."""
        data = video_input(task, index, image)
        last: JobFailed | None = None
        while run.attempts < self.max_attempts:
            if self._stop.is_set():
                raise _Aborted
            run.attempts += 1
            job_id = self._submit(data, f"scene {run.scene_id}")
            run.job_ids.append(job_id)
            try:
                final = self._wait(job_id)
                out = final.output
                if final.status == "COMPLETED" and isinstance(out, Mapping) and "error" not in out:
                    return dict(out)
                interpret_final(final, redact=self.client.scrub)  # raises JobFailed with the code
                raise JobFailed(f"job {job_id}: unexpected output", job_id=job_id, code="bad_output")
            except JobFailed as exc:
                last = exc
                if exc.code not in RETRYABLE_CODES:
                    break
                log.warning("scene %s: attempt %d/%d failed (%s: %s)%s", run.scene_id, run.attempts,
                            self.max_attempts, exc.code, exc, "; retrying" if run.attempts < self.max_attempts else "")
        assert last is not None
        raise last

    # ------------------------------------------------------------------ the story
    def run(self, story: Story | Mapping[str, Any]) -> StoryResult:
        """Render ``story`` and return a batch-shaped :class:`StoryResult` (no warm handling).

        The story is validated with the worker's models and must not name local files
        (:class:`~storystudio.backend.studio.StoryStudio` uploads them first).
        """
        story = story if isinstance(story, Story) else Story.load(story)
        refuse_local_files(story)
        task = story.task
        assert isinstance(task, BatchTask)
        t0 = time.monotonic()
        self._deadline = t0 + self.timeout
        self._stop.clear()
        try:
            scenes, images_job = self._images(task, story)
            t1 = time.monotonic()
            runs = {s.scene_id: _SceneRun(s.scene_id) for s in task.scenes}  # type: ignore[misc]
            todo = [(i, s) for i, s in enumerate(task.scenes) if "error" not in scenes[s.scene_id]]  # type: ignore[index]
            done = 0
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="scene") as pool:
                futures: dict[Future, str] = {}
                for i, s in todo:
                    image = s.image or scenes[s.scene_id].get("image_url")  # type: ignore[index]
                    if not s.image and not str(image).startswith(("http://", "https://")):
                        scenes[s.scene_id]["error"] = {  # type: ignore[index]
                            "error": f"not_shared: the image was stored at {image!r}, which other workers cannot "
                                     "read; --workers needs the endpoint to store results in a bucket "
                                     "(STORYSTUDIO_S3_BUCKET or RunPod's BUCKET_ENDPOINT_URL)", "code": "not_shared", "stage": "video"}
                        continue
                    futures[pool.submit(self._video, task, i, image, runs[s.scene_id])] = s.scene_id  # type: ignore[index]
                self._progress(images_job or "-", "videos", 0, len(futures))
                pending = set(futures)
                try:
                    while pending:
                        # short waits: the main thread must stay responsive to SIGINT/SIGTERM
                        finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            sid = futures[fut]
                            self._record(scenes[sid], fut, runs[sid])
                            done += 1
                            self._progress(runs[sid].job_ids[-1] if runs[sid].job_ids else "-", "videos", done,
                                           len(futures), sid)
                except BaseException:
                    self._stop.set()
                    self.cancel_live()
                    raise
            t2 = time.monotonic()
        except BaseException:
            self._stop.set()
            self.cancel_live()
            raise
        output = assemble(task, scenes, {
            "images_time": t1 - t0, "swap_time": 0.0, "video_load_time": 0.0,
            "videos_time": t2 - t1, "total_time": t2 - t0,
        })
        output["fanout"] = {
            "workers": self.workers,
            "images_job_id": images_job,
            "video_jobs": {sid: r.job_ids for sid, r in runs.items() if r.job_ids},
            "attempts": {sid: r.attempts for sid, r in runs.items() if r.attempts},
        }
        add_first_spec_names(task, output)  # scene ``id`` as a batch job's result carries it
        return StoryResult.from_output(output, scene_ids=story.scene_ids, project_id=story.project_id,
                                       job_id=images_job)

    @staticmethod
    def _record(entry: dict[str, Any], fut: Future, run: _SceneRun) -> None:
        exc = fut.exception()
        if exc is None:
            out = fut.result()
            entry.update({k: v for k, v in out.items() if k not in _JOB_KEYS})
            entry["video_seed"] = out.get("seed")
            entry["video_job_id"] = run.job_ids[-1]
            return
        if isinstance(exc, JobFailed):
            entry["error"] = {"error": str(exc), "code": exc.code, "stage": "video"}
        elif isinstance(exc, BackendError):
            entry["error"] = {"error": str(exc), "code": exc.code, "stage": "video"}
        elif isinstance(exc, _Aborted):
            entry["error"] = {"error": "story abandoned", "code": "cancelled", "stage": "video"}
        else:
            raise exc


def fan_out_story(
    client: RunPodClient,
    endpoint_id: str,
    story: Story | Mapping[str, Any],
    *,
    workers: int,
    timeout: float = 3600.0,
    poll: PollSettings | None = None,
    execution_timeout: float | None = -1,
    max_attempts: int = 3,
    wait_ready: bool = False,
    ready_timeout: float = 600.0,
    ready_poll_interval: float = 5.0,
    on_progress: Callable[[ProgressUpdate], None] | None = None,
    handle_signals: bool = True,
) -> StoryResult:
    """``workersMin = workers`` for the duration, then :meth:`FanOut.run`; always restored."""
    fan = FanOut(client, endpoint_id, workers, timeout=timeout, poll=poll, execution_timeout=execution_timeout,
                 max_attempts=max_attempts, on_progress=on_progress)
    with WarmWorkers(client, endpoint_id, workers, wait_ready=wait_ready, ready_timeout=ready_timeout,
                     ready_poll_interval=ready_poll_interval, ready_workers=1, handle_signals=handle_signals):
        return fan.run(story)
