"""The earlier self-hosted API, as its clients use it, translated into worker jobs.

No second schema: each endpoint maps its fields onto the worker's ``video`` job input
and :meth:`ServeContext.submit` validates that with the worker's own
:func:`~storystudio.tasks.parse_job_input`. Settings the earlier API does not carry
(steps, guidance, frames per clip...) come from ``STORYSTUDIO_SERVE_VIDEO_DEFAULTS``,
else from the worker's defaults.

``POST /generate-video`` (multipart: ``image``, ``audio``, ``prompt``, ``resolution``, ``num_clips``)
    Synchronous by default, as the existing client expects: 200 with ``video`` (the MP4,
    base64), ``format``, ``resolution``. ``async=true`` (form field or query) answers at
    once with ``{"job_id", "status": "processing", "estimated_time"}``.
    ``num_clips`` caps the length: the audio is trimmed to ``num_clips`` clips of
    ``infer_frames`` frames at 16 fps (5 s per clip at the defaults).
``GET /status/{job_id}``
    ``{"job_id", "status", "video_url", "duration", "resolution"}``; ``status`` is
    ``processing`` (queued or running; ``state`` tells which), ``completed`` or ``failed``.
``POST /generate/speech-to-video`` (JSON: ``prompt``, ``image_path``, ``audio_path``, ``size``,
``frame_num``, ``sample_steps``, ``sample_guide_scale``, ``sample_shift``, ``base_seed``, ``negative_prompt``)
    Official Wan ``generate.py`` spellings: ``size`` ``"1280*720"`` is the pixel area
    (``max_area``; the reference image's aspect ratio is kept, as in the official code),
    ``frame_num`` the frames per clip (a 4n+1 count is taken as 4n), ``sample_steps`` →
    ``steps``, ``sample_guide_scale`` → ``guidance``, ``sample_shift`` → ``shift``,
    ``base_seed`` → ``seed`` (negative: random). Paths are read from the media root only.
    Answers like ``/status`` once done (or at once with ``?async=true``).
``GET /videos``, ``GET /videos/{filename}``
    The MP4 results in the output folder, and one result file (confined to that folder).
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from storystudio.errors import InvalidInput
from storystudio.render import VIDEO_FPS
from storystudio.serve.context import ServeContext, base_url, get_context
from storystudio.serve.errors import error_response
from storystudio.serve.uploads import check_upload
from storystudio.serve.store import JobRecord
from storystudio.tasks import VideoParams

router = APIRouter()
Ctx = Annotated[ServeContext, Depends(get_context)]
_SIZE = re.compile(r"^\s*(\d{2,5})\s*[*xX×]\s*(\d{2,5})\s*$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------- translations
def generate_video_input(defaults: dict[str, Any], *, prompt: str | None, resolution: str,
                         num_clips: int | None) -> dict[str, Any]:
    """The ``video`` job input of a ``/generate-video`` form (media fields added by the caller)."""
    job: dict[str, Any] = {"task": "video", **defaults, "prompt": prompt or "", "resolution": resolution}
    if num_clips is not None:
        frames = int(job.get("infer_frames", VideoParams().infer_frames))
        job["audio_duration"] = num_clips * frames / VIDEO_FPS
    return job


class SpeechToVideoRequest(BaseModel):
    """``POST /generate/speech-to-video``: the official Wan ``generate.py`` argument names.

    Types only: ranges and defaults are the worker's (the translated input is validated
    by its schema). Unknown fields are refused, as everywhere in the worker.
    """

    model_config = ConfigDict(extra="forbid")

    image_path: str
    audio_path: str
    prompt: str = ""
    negative_prompt: str | None = None
    size: str | None = None
    frame_num: int | None = None
    sample_steps: int | None = None
    sample_guide_scale: float | None = None
    sample_shift: float | None = None
    base_seed: int | None = None


def speech_to_video_input(req: SpeechToVideoRequest, defaults: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``(video job input without media, resolution label)`` for a speech-to-video request."""
    job: dict[str, Any] = {"task": "video", **defaults, "prompt": req.prompt}
    label = str(job.get("resolution", VideoParams().resolution))
    if req.size is not None:
        m = _SIZE.match(req.size)
        if not m:
            raise InvalidInput(f"size: expected WIDTH*HEIGHT such as '1280*720' or '832*480', got {req.size!r}")
        job["max_area"] = int(m.group(1)) * int(m.group(2))
        label = f"{m.group(1)}*{m.group(2)}"
    if req.frame_num is not None:
        # Wan's frame_num counts 4n+1 frames (the first frame plus n latent steps of 4); S2V clips are 4n.
        job["infer_frames"] = req.frame_num - 1 if req.frame_num % 4 == 1 else req.frame_num
    renames = {"sample_steps": "steps", "sample_guide_scale": "guidance", "sample_shift": "shift",
               "negative_prompt": "negative_prompt"}
    for src, dst in renames.items():
        value = getattr(req, src)
        if value is not None:
            job[dst] = value
    if req.base_seed is not None and req.base_seed >= 0:
        job["seed"] = req.base_seed
    return job, label


# ---------------------------------------------------------------------------- views
def status_view(ctx: ServeContext, record: JobRecord, base: str) -> dict[str, Any]:
    """The earlier API's job status; extra fields (``state``, times, size) for newer clients."""
    state = record.status
    body: dict[str, Any] = {
        "job_id": record.id,
        "status": "processing" if state in ("queued", "running") else state,
        "state": state,
        "video_url": None,
        "duration": None,
        "resolution": record.meta.get("resolution"),
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
    }
    result = record.result or {}
    if not record.finished:
        body["estimated_time"] = ctx.queue.estimate_seconds(record)
        body["queue_position"] = ctx.store.ahead_of(record)
    elif state == "completed" and isinstance(result.get("video_key"), str):
        key = result["video_key"]
        body.update(video_url=base + ctx.output.url_path(key), filename=key, duration=result.get("duration_s"),
                    width=result.get("width"), height=result.get("height"), frames=result.get("frames"),
                    fps=result.get("fps"), seed=result.get("seed"), generation_time=result.get("total_time"))
    elif state == "failed":
        body.update(error=result.get("error"), code=record.error_code)
    return body


def _accepted(ctx: ServeContext, record: JobRecord) -> dict[str, Any]:
    return {"job_id": record.id, "status": "processing", "estimated_time": ctx.queue.estimate_seconds(record)}


# ---------------------------------------------------------------------------- endpoints
@router.post("/generate-video")
async def generate_video(
    request: Request,
    ctx: Ctx,
    image: Annotated[UploadFile, File(description="reference image, JPG or PNG")],
    audio: Annotated[UploadFile, File(description="speech or music: WAV, MP3, M4A/AAC, FLAC, OGG, Opus")],
    prompt: Annotated[str | None, Form()] = None,
    resolution: Annotated[str, Form()] = "480p",
    num_clips: Annotated[int | None, Form(ge=1)] = None,
    async_form: Annotated[bool | None, Form(alias="async")] = None,
    async_query: Annotated[bool | None, Query(alias="async")] = None,
):
    limits = ctx.settings.worker.inputs
    image_bytes = check_upload(await image.read(), "image", limits, "image")
    audio_bytes = check_upload(await audio.read(), "audio", limits, "audio")
    job = generate_video_input(ctx.settings.video_settings, prompt=prompt, resolution=resolution, num_clips=num_clips)
    job.update(image=_b64(image_bytes), audio=_b64(audio_bytes))
    record = ctx.submit(request, api="generate-video", job_input=job,
                        files={"image": image_bytes, "audio": audio_bytes},
                        meta={"resolution": resolution, "format": "mp4"})
    del job, image_bytes, audio_bytes
    if async_form or async_query:
        return _accepted(ctx, record)
    done = await ctx.queue.wait(record.id)
    assert done is not None
    if done.status != "completed":
        return error_response(done.result or {}, job_id=done.id)
    path = ctx.output.resolve(done.result["video_key"])  # type: ignore[index]
    video = await run_in_threadpool(lambda: _b64(path.read_bytes()))
    return {"video": video, "format": "mp4", **status_view(ctx, done, base_url(request))}


@router.get("/status/{job_id}")
async def job_status(job_id: str, request: Request, ctx: Ctx):
    return status_view(ctx, ctx.job_or_404(job_id), base_url(request))


@router.post("/generate/speech-to-video")
async def speech_to_video(
    body: SpeechToVideoRequest,
    request: Request,
    ctx: Ctx,
    async_query: Annotated[bool | None, Query(alias="async")] = None,
):
    job, label = speech_to_video_input(body, ctx.settings.video_settings)
    limits = ctx.settings.worker.inputs
    image_bytes = await run_in_threadpool(ctx.media.read, body.image_path, "image", limits, "image_path")
    audio_bytes = await run_in_threadpool(ctx.media.read, body.audio_path, "audio", limits, "audio_path")
    job.update(image=_b64(image_bytes), audio=_b64(audio_bytes))
    record = ctx.submit(request, api="speech-to-video", job_input=job,
                        files={"image": image_bytes, "audio": audio_bytes}, meta={"resolution": label})
    del job, image_bytes, audio_bytes
    if async_query:
        return _accepted(ctx, record)
    done = await ctx.queue.wait(record.id)
    assert done is not None
    if done.status != "completed":
        return error_response(done.result or {}, job_id=done.id)
    return status_view(ctx, done, base_url(request))


@router.get("/videos")
async def list_videos(request: Request, ctx: Ctx):
    base = base_url(request)
    videos = await run_in_threadpool(ctx.output.videos)
    for v in videos:
        v["url"] = base + v["url"]
    return {"videos": videos, "count": len(videos)}


@router.get("/videos/{filename:path}")
async def get_video(filename: str, ctx: Ctx):
    path = ctx.output.resolve(filename)
    return FileResponse(path, media_type=ctx.output.media_type(path))

