"""Submit one story (a ``batch`` job) and get typed per-scene results back.

:func:`submit_story` does the whole round trip: optional warm workers (restored
afterwards), ``/run``, ``/status`` polling with backoff (progress updates the worker
sends with ``runpod.serverless.progress_update`` arrive as ``output`` while the job is
``IN_PROGRESS`` and are passed to ``on_progress``, with the per-scene state folded in by
:class:`~storystudio.backend.scene_progress.SceneTracker`), and interpretation of the
final state. If waiting is interrupted (client timeout, Ctrl-C, SIGTERM, any error) the
job is cancelled so it does not keep a GPU busy for nobody.

The story is validated with the worker's own models before anything happens
(:class:`~storystudio.backend.story.Story`), and it must not name local files: this
layer sends the input as it is. :class:`~storystudio.backend.studio.StoryStudio`
uploads or inlines local media first, then calls this.

How a final job is interpreted:

* ``COMPLETED`` with a batch output → :class:`~storystudio.backend.results.StoryResult`
  (per-scene errors stay per scene: ``SceneResult.error``).
* ``COMPLETED`` with ``{"error", "code"}`` as output → :class:`JobFailed` with that code.
* ``FAILED`` → :class:`JobFailed`. The runpod SDK moves a handler's top-level ``"error"``
  key out of the output into the job's ``error`` field (``rp_job.run_job``), so a handler
  returning ``{"error": msg, "code": c}`` shows up as ``FAILED`` with ``error=msg`` and
  ``output={"code": c}``; an exception in the handler shows up as ``error`` = a JSON
  string with ``error_type``/``error_message``/``error_traceback``. Both are decoded.
* ``CANCELLED`` / ``TIMED_OUT`` → :class:`JobFailed` (``job_cancelled`` / ``job_timed_out``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .client import PENDING_STATUSES, JobStatus, PollSettings, RunPodClient, _fingerprint
from .errors import BackendError, JobFailed, LocalMediaError
from .media import local_references
from .results import StoryResult, split_code
from .scene_progress import SceneProgress, SceneTracker
from .story import Story
from .warm import SignalGuard, WarmWorkers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressUpdate:
    """What the CLI shows while a job runs. All fields but ``status`` are optional."""

    job_id: str
    status: str
    stage: str | None = None
    message: str | None = None
    done: float | None = None
    total: float | None = None
    raw: Any = None
    scenes: tuple[SceneProgress, ...] = ()

    @property
    def fraction(self) -> float | None:
        if self.done is None or not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def describe(self) -> str:
        parts = [self.status]
        if self.stage:
            parts.append(self.stage)
        if self.done is not None and self.total:
            if self.total in (1, 100) and not float(self.done).is_integer():
                parts.append(f"{100 * self.fraction:.0f}%")
            else:
                parts.append(f"{self.done:g}/{self.total:g}")
        if self.message:
            parts.append(self.message)
        return " · ".join(parts)


_PAIRS = (("done", "total"), ("completed", "total"), ("current", "total"),
          ("step", "steps"), ("scenes_done", "scenes_total"))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def parse_progress(job: JobStatus) -> ProgressUpdate:
    """Best-effort reading of a progress ``output`` (dict, number or string)."""
    out = job.output if job.status in PENDING_STATUSES else None
    stage = message = None
    done = total = None
    percent = None
    if isinstance(out, Mapping):
        s = out.get("stage") or out.get("phase")
        stage = s if isinstance(s, str) else None
        m = out.get("message") if isinstance(out.get("message"), str) else None
        scene = out.get("scene_id")
        if isinstance(scene, str):
            m = f"{scene}: {m}" if m else scene
        target = out.get("to")
        if isinstance(target, str):
            m = f"to {target}" + (f": {m}" if m else "")
        message = m
        for d_key, t_key in _PAIRS:
            d, t = _number(out.get(d_key)), _number(out.get(t_key))
            if d is not None and t:
                done, total = d, t
                break
        if done is None:
            percent = _number(out.get("progress"))
    elif isinstance(out, str):
        message = out
    else:
        percent = _number(out)
    if percent is not None and percent >= 0:
        done, total = (percent, 1.0) if percent <= 1 else (min(percent, 100.0), 100.0)
    return ProgressUpdate(job.id, job.status, stage, message, done, total, out)


# --------------------------------------------------------------------------- final state


def _decode_error(value: Any) -> tuple[str, dict[str, Any]]:
    """(message, details) from a job's ``error`` field."""
    if isinstance(value, Mapping):
        msg = value.get("error_message") or value.get("error") or value.get("message")
        return (str(msg) if msg else json.dumps(dict(value), default=str)), dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value, {}
        if isinstance(parsed, Mapping):
            return _decode_error(parsed)
        return value, {}
    return ("no error message" if value is None else str(value)), {}


def interpret_final(
    job: JobStatus,
    story: Story | None = None,
    redact: Callable[[str], str] = str,
) -> StoryResult:
    """Turn a final job status into a :class:`StoryResult` or raise :class:`JobFailed`.

    ``story``'s scenes missing from the output are reported as ``missing_result``.
    ``redact`` is applied to error messages built from worker text (pass
    ``client.scrub``), before any exception object exists.
    """
    out = job.output

    def failed(message: str, code: str) -> JobFailed:
        return JobFailed(redact(message), job_id=job.id, status=job.status, code=code, output=out)

    if job.status == "COMPLETED":
        if isinstance(out, Mapping) and "scenes" not in out and "error" in out:
            message = str(out.get("error"))
            code = out.get("code") if isinstance(out.get("code"), str) else split_code(message)[0]
            raise failed(f"job {job.id} failed: {message}", code or "job_failed")
        if job.error:
            msg, _ = _decode_error(job.error)
            log.warning("job %s completed but also reported an error (%d chars)", job.id, len(msg))
        return StoryResult.from_output(
            out,
            scene_ids=story.scene_ids if story is not None else (),
            project_id=story.project_id if story is not None else None,
            job_id=job.id,
        )
    if job.status == "FAILED":
        msg, details = _decode_error(job.error)
        code = None
        if isinstance(out, Mapping) and isinstance(out.get("code"), str):
            code = out["code"]
        elif isinstance(details.get("code"), str):
            code = details["code"]
        else:
            code = split_code(msg)[0]
        if "error_type" in details:
            msg = f"{details['error_type']}: {msg}"
        raise failed(f"job {job.id} failed: {msg}", code or "job_failed")
    if job.status == "CANCELLED":
        raise failed(f"job {job.id} was cancelled", "job_cancelled")
    if job.status == "TIMED_OUT":
        raise failed(f"job {job.id} timed out on RunPod (execution timeout or TTL)", "job_timed_out")
    raise failed(f"job {job.id}: unexpected final status {job.status}", "job_failed")


def _cancel_quietly(client: RunPodClient, endpoint_id: str, job_id: str, guard: SignalGuard | None) -> None:
    if guard is not None:
        guard.hold()
    try:
        client.cancel(endpoint_id, job_id)
    except BackendError as exc:
        log.error("could not cancel job %s (%s); cancel it by hand: storystudio cancel %s "
                  "--endpoint %s", job_id, exc, job_id, endpoint_id)
    finally:
        if guard is not None:
            guard.release()  # already unwinding: a signal that came meanwhile adds nothing


def _run_and_wait(
    client: RunPodClient,
    endpoint_id: str,
    story: Story,
    *,
    timeout: float,
    poll: PollSettings | None,
    execution_timeout: float | None,
    on_progress: Callable[[ProgressUpdate], None] | None,
    on_submitted: Callable[[str], None] | None,
    cancel_on_abort: bool,
    guard: SignalGuard | None,
) -> StoryResult:
    job = client.run(endpoint_id, story.job_input, execution_timeout_s=execution_timeout)
    if on_submitted is not None:
        on_submitted(job.id)
    last: list[tuple[str, str] | None] = [None]
    tracker = SceneTracker(story.scene_ids)

    def on_update(status: JobStatus) -> None:
        marker = (status.status, _fingerprint(status.output if not status.done else None))
        if marker == last[0]:
            return
        last[0] = marker
        update = parse_progress(status)
        if update.raw is not None:
            tracker.apply(update.raw)
        update = replace(update, scenes=tracker.snapshot())
        log.info("job %s: %s", status.id, client.scrub(update.describe()))
        if on_progress is not None:
            on_progress(update)

    try:
        final = client.wait_for_job(endpoint_id, job.id, timeout=timeout, poll=poll, on_update=on_update)
    except BaseException:
        if cancel_on_abort:
            _cancel_quietly(client, endpoint_id, job.id, guard)
        raise
    result = interpret_final(final, story, redact=client.scrub)
    if on_progress is not None:
        tracker.finish(result.scenes)
        on_progress(ProgressUpdate(final.id, final.status, scenes=tracker.snapshot()))
    return result


def refuse_local_files(story: Story) -> None:
    """Raise :class:`LocalMediaError` if ``story`` still names local files (this layer sends
    the input as it is; :class:`~storystudio.backend.studio.StoryStudio` resolves them)."""
    refs = local_references(story)
    if refs:
        names = ", ".join(f"{r.field} ({r.path})" for r in refs[:5])
        raise LocalMediaError(
            f"the story names local files, which the worker cannot read: {names}; run it with "
            "StoryStudio.run_story / `storystudio submit`, which upload them (or inline them as data URIs)"
        )


def submit_story(
    client: RunPodClient,
    endpoint_id: str,
    story: Story | Mapping[str, Any],
    *,
    timeout: float = 3600.0,
    poll: PollSettings | None = None,
    execution_timeout: float | None = -1,
    warm: int | None = None,
    wait_ready: bool = False,
    ready_timeout: float = 600.0,
    ready_poll_interval: float = 5.0,
    on_progress: Callable[[ProgressUpdate], None] | None = None,
    on_submitted: Callable[[str], None] | None = None,
    cancel_on_abort: bool = True,
    handle_signals: bool = True,
) -> StoryResult:
    """Run ``story`` as one batch job and return its per-scene results.

    ``story``: a :class:`Story` or the job input as a mapping (validated here with the
    worker's models; :class:`~storystudio.errors.InvalidInput` before any request).
    ``timeout``: how long to wait for the job (queue + execution) before cancelling it
    and raising :class:`~storystudio.backend.errors.JobTimeout`.
    ``execution_timeout``: RunPod ``policy.executionTimeout`` in seconds; the default
    (``-1``) uses ``timeout``, because RunPod's own default is only 10 minutes, too short
    for a multi-scene story. ``None`` sends no policy (endpoint setting applies).
    ``warm``: if set, ``workersMin`` is raised to this for the duration (see
    :class:`WarmWorkers`) and restored afterwards, also on errors and signals.
    """
    story = Story.load(story) if not isinstance(story, Story) else story
    if not story.is_batch:
        raise BackendError(f"submit_story runs batch jobs, not {story.task.task!r}", code="invalid_argument")
    refuse_local_files(story)
    if execution_timeout == -1:
        execution_timeout = max(timeout, 10.0)
    kwargs = dict(timeout=timeout, poll=poll, execution_timeout=execution_timeout,
                  on_progress=on_progress, on_submitted=on_submitted,
                  cancel_on_abort=cancel_on_abort)
    if warm:
        warmer = WarmWorkers(client, endpoint_id, warm, wait_ready=wait_ready,
                             ready_timeout=ready_timeout, ready_poll_interval=ready_poll_interval,
                             handle_signals=handle_signals)
        with warmer:
            return _run_and_wait(client, endpoint_id, story, guard=warmer.guard, **kwargs)
    guard = SignalGuard() if handle_signals else None
    if guard is not None:
        guard.install()
    try:
        return _run_and_wait(client, endpoint_id, story, guard=guard, **kwargs)
    finally:
        if guard is not None:
            guard.uninstall()
