"""Rendering one image or one talking video: inputs → engine → encoded file → storage.

Single jobs and story batches share these steps, so a scene in a batch produces
exactly what the same single job would (same keys, same encoding, same checks).
Everything here runs on the worker's one ModelManager; model choice and parking
are the manager's business, these functions only say which set they need and how
much activation memory.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from storystudio.config import WorkerSettings
from storystudio.deadline import Deadline
from storystudio.inputs import fetch_bytes
from storystudio.limits import VIDEO_FPS
from storystudio.media import AudioClip, decode_audio, decode_video_frames, encode_mp4, encode_png, load_image, to_mono_16k
from storystudio.models.clip_plan import longest_clip_frames
from storystudio.models.footprint import image_working_bytes, video_working_bytes
from storystudio.models.model_manager import ModelManager
from storystudio.progress import ProgressReporter
from storystudio.storage import ObjectKey, Storage, make_key
from storystudio.tasks import AudioTrim, ImageParams, ImageTask, VideoParams, VideoTask

logger = logging.getLogger(__name__)

IMAGE_SET = "image"
VIDEO_SET = "video"
Progress = Callable[[int, int], None]


@dataclass
class RenderContext:
    """What one job renders with: the shared manager and storage plus this job's identity."""

    settings: WorkerSettings
    manager: ModelManager
    storage: Storage
    job_id: str
    project_id: str | None = None
    story_segment: str | None = None  # second key segment of a batch's files (storystudio.manifest); job_id if None
    deadline: Deadline | None = None  # the job's time budget, started with the job (a batch obeys it)

    def result_key(self, kind: str, ext: str, scene_id: str | None) -> ObjectKey:
        """Where one result file of this job goes (relative to the storage prefix)."""
        return make_key(kind=kind, job_id=self.story_segment or self.job_id, ext=ext, project_id=self.project_id,
                        scene_id=scene_id)


@dataclass
class RenderedImage:
    image: Image.Image
    result: dict[str, Any]


@dataclass
class Timer:
    """Named wall-clock sections, reported as ``timings`` in results."""

    sections: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.sections[name] = round(self.sections.get(name, 0.0) + now - t0, 3)
        return now


# ---------------------------------------------------------------------------- inputs
def fetch_image(ctx: RenderContext, source: str, *, field_name: str) -> Image.Image:
    return fetch_image_hashed(ctx, source, field_name=field_name)[0]


def fetch_image_hashed(ctx: RenderContext, source: str, *, field_name: str) -> tuple[Image.Image, str]:
    """The decoded image and the sha256 of its bytes (a story's scene hashes, storystudio/manifest.py)."""
    data = fetch_bytes(source, kind="image", limits=ctx.settings.inputs, field=field_name)
    return load_image(data), hashlib.sha256(data).hexdigest()


def fetch_audio(ctx: RenderContext, source: str, trim: AudioTrim, *, field_name: str) -> AudioClip:
    return fetch_audio_hashed(ctx, source, trim, field_name=field_name)[0]


def fetch_audio_hashed(ctx: RenderContext, source: str, trim: AudioTrim, *, field_name: str
                       ) -> tuple[AudioClip, str]:
    """The decoded, trimmed audio and the sha256 of the fetched bytes."""
    data = fetch_bytes(source, kind="audio", limits=ctx.settings.inputs, field=field_name)
    clip = decode_audio(
        data,
        start_s=trim.audio_start,
        duration_s=trim.audio_duration,
        max_duration_s=ctx.settings.max_audio_seconds,
    )
    return clip, hashlib.sha256(data).hexdigest()


def fetch_pose_frames(ctx: RenderContext, source: str, *, fps: int, field_name: str = "pose_video") -> np.ndarray:
    return fetch_pose_frames_hashed(ctx, source, fps=fps, field_name=field_name)[0]


def fetch_pose_frames_hashed(ctx: RenderContext, source: str, *, fps: int, field_name: str = "pose_video"
                             ) -> tuple[np.ndarray, str]:
    """The decoded pose frames and the sha256 of the fetched bytes."""
    data = fetch_bytes(source, kind="video", limits=ctx.settings.inputs, field=field_name)
    return decode_video_frames(data, fps=fps), hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- image
def render_image(
    ctx: RenderContext,
    prompt: str,
    params: ImageParams,
    seed: int | None,
    *,
    scene_id: str | None = None,
    return_base64: bool = False,
    progress: Progress | None = None,
) -> RenderedImage:
    """Generate, encode as PNG and store one Z-Image picture."""
    from storystudio.models.image_generator import ImageRequest, validate_image_request

    timer = Timer()
    req = ImageRequest(
        prompt=prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance=params.guidance,
        seed=seed,
    )
    validate_image_request(req)  # before any model moves: a refused request costs milliseconds, not a swap
    t = time.perf_counter()
    out = ctx.manager.run(
        IMAGE_SET,
        lambda engine: engine.generate(req, progress),
        working_bytes=image_working_bytes(params.width, params.height),
    )
    t = timer.add("generate", t)
    png = encode_png(out.image)
    t = timer.add("encode", t)
    key = ctx.result_key("image", "png", scene_id)
    stored = ctx.storage.put_bytes(key, png, "image/png")
    timer.add("upload", t)
    result: dict[str, Any] = {
        "image_url": stored.url,
        "image_key": stored.key,
        "seed": out.seed,
        "width": out.image.width,
        "height": out.image.height,
        "bytes": len(png),
        "sha256": hashlib.sha256(png).hexdigest(),  # lets a client verify (and skip) a download
        "timings": timer.sections,
    }
    if return_base64:
        if len(png) <= ctx.settings.return_base64_max_kb * 1024:
            result["image_base64"] = base64.b64encode(png).decode("ascii")
        else:
            result["image_base64_skipped"] = (
                f"PNG is {len(png) // 1024} KiB, above STORYSTUDIO_RETURN_BASE64_MAX_KB="
                f"{ctx.settings.return_base64_max_kb}; use image_url"
            )
    return RenderedImage(out.image, result)


# ---------------------------------------------------------------------------- video
def render_video(
    ctx: RenderContext,
    image: Image.Image,
    audio: AudioClip,
    prompt: str,
    params: VideoParams,
    seed: int | None,
    *,
    pose_frames: np.ndarray | None = None,
    scene_id: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Generate a talking video for ``audio`` and store it as MP4 with that audio as AAC."""
    from storystudio.models import speed
    from storystudio.models.video_generator import VideoRequest, validate_video_request

    timer = Timer()
    t = time.perf_counter()
    # Fast preset: checked against the device before any model moves (fp8_unsupported).
    plan = speed.resolve_plan(params.speed_knobs, ctx.manager.device)
    req = VideoRequest(
        image=image,
        audio=to_mono_16k(audio),
        prompt=prompt,
        negative_prompt=params.negative_prompt,
        pose_frames=pose_frames,
        resolution=params.resolution,
        max_area=params.max_area,
        infer_frames=params.infer_frames,
        steps=params.steps,
        guidance=params.guidance,
        shift=params.shift,
        seed=seed,
        speed=plan,
    )
    validate_video_request(req)  # before any model moves (e.g. audio decoded shorter than the engine's minimum)
    t = timer.add("audio_prepare", t)
    working = video_working_bytes(params.area, longest_clip_frames(params.infer_frames))
    out = speed.run_video(ctx.manager, VIDEO_SET, req, working_bytes=working, progress=progress)
    t = timer.add("generate", t)
    with tempfile.TemporaryDirectory(prefix="storystudio-") as tmp:
        path = encode_mp4(out.frames, out.fps, audio, Path(tmp) / "video.mp4")
        t = timer.add("encode", t)
        digest = _file_sha256(path)
        key = ctx.result_key("video", "mp4", scene_id)
        stored = ctx.storage.put_file(key, path, "video/mp4")
        timer.add("upload", t)
    frames = int(out.frames.shape[0])
    return {
        "video_url": stored.url,
        "video_key": stored.key,
        "seed": out.seed,
        "width": out.width,
        "height": out.height,
        "frames": frames,
        "fps": out.fps,
        "duration_s": round(frames / out.fps, 3),
        "audio_duration_s": round(audio.duration_s, 3),
        "num_clips": out.num_clips,
        "bytes": stored.size,
        "sha256": digest,
        "preset": params.preset,
        "speed": out.speed,
        "timings": timer.sections,
        "engine": out.engine,
    }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- single tasks
def run_image_task(ctx: RenderContext, task: ImageTask, progress: ProgressReporter) -> dict[str, Any]:
    """The ``image`` task: one Z-Image picture."""
    rendered = render_image(
        ctx,
        task.prompt,
        task,
        task.seed,
        return_base64=task.return_base64,
        progress=progress.steps("image_steps"),
    )
    return rendered.result


def run_video_task(ctx: RenderContext, task: VideoTask, progress: ProgressReporter) -> dict[str, Any]:
    """The ``video`` task: reference image + audio (+ pose video) → MP4 with the audio as AAC."""
    timer = Timer()
    t = time.perf_counter()
    progress.update("inputs")
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="fetch") as pool:
        image_f = pool.submit(fetch_image, ctx, task.image, field_name="image")
        audio_f = pool.submit(fetch_audio, ctx, task.audio, task, field_name="audio")
        pose_f = pool.submit(fetch_pose_frames, ctx, task.pose_video, fps=VIDEO_FPS) if task.pose_video else None
        image, audio = image_f.result(), audio_f.result()
        pose = pose_f.result() if pose_f else None
    timer.add("inputs", t)
    result = render_video(
        ctx, image, audio, task.prompt, task, task.seed, pose_frames=pose, progress=progress.steps("video_clips")
    )
    result["timings"] = {**timer.sections, **result["timings"]}
    return result
