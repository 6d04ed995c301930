"""A whole story in one job: every scene's image first, one swap, then every video.

Why this order: the two model sets may not both fit in VRAM with a video's
activations, and each swap costs about a second (seconds more if they are cold).
Rendering all images, then all videos, means at most one swap per batch
whatever the number of scenes. Audio downloads and decoding run in a thread pool
while the images render, so the video phase never waits on the network.

A scene that fails (bad audio URL, undecodable image, out of memory) gets an
``error`` entry with a stable code; the other scenes still complete.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from storystudio.errors import StoryStudioError
from storystudio.media import AudioClip
from storystudio.models import speed
from storystudio.models.footprint import video_working_bytes
from storystudio.progress import ProgressReporter
from storystudio.render import (
    VIDEO_FPS,
    VIDEO_SET,
    RenderContext,
    fetch_audio,
    fetch_image,
    fetch_pose_frames,
    render_image,
    render_video,
)
from storystudio.tasks import BatchTask, Scene

logger = logging.getLogger(__name__)

_FETCH_THREADS = 4


def _scene_error(exc: BaseException, stage: str) -> dict[str, str]:
    if isinstance(exc, StoryStudioError):
        return {**exc.to_result(), "stage": stage}
    if isinstance(exc, torch.OutOfMemoryError):  # the manager reports its own; this is one from outside it
        return {"error": f"out_of_memory: {exc}", "code": "out_of_memory", "stage": stage}
    logger.exception("unexpected failure in %s stage", stage, exc_info=exc)
    return {"error": f"internal error during {stage}: {type(exc).__name__}: {exc}", "code": "internal_error", "stage": stage}


@dataclass
class _Fetches:
    """Downloads started before the image phase: every scene's audio, the given images
    and the pose videos."""

    audio: dict[str, Future[AudioClip]]
    images: dict[str, Future[Image.Image]]
    poses: dict[str, Future[np.ndarray]] = field(default_factory=dict)


@dataclass
class _Swap:
    """What the one swap did: the scenes that go on to the video phase, and its cost."""

    video_scenes: list[Scene]
    swap_time: float = 0.0
    video_load_time: float = 0.0


def fetch(ctx: RenderContext, scenes: list[Scene], pool: ThreadPoolExecutor) -> _Fetches:
    """Start every audio, given-image and pose-video download on ``pool``; don't wait."""
    return _Fetches(
        audio={
            s.scene_id: pool.submit(fetch_audio, ctx, s.audio, s, field_name=f"scenes[{i}].audio")  # type: ignore[misc]
            for i, s in enumerate(scenes)
        },
        images={
            s.scene_id: pool.submit(fetch_image, ctx, s.image, field_name=f"scenes[{i}].image")  # type: ignore[misc]
            for i, s in enumerate(scenes)
            if s.image
        },
        poses={
            s.scene_id: pool.submit(  # type: ignore[misc]
                fetch_pose_frames, ctx, s.pose_video, fps=VIDEO_FPS, field_name=f"scenes[{i}].pose_video"
            )
            for i, s in enumerate(scenes)
            if s.pose_video
        },
    )


def images(ctx: RenderContext, task: BatchTask, fetches: _Fetches, results: dict[str, dict[str, Any]],
           progress: ProgressReporter) -> dict[str, Image.Image]:
    """Phase 1 (Z-Image resident): each scene's picture, given or generated, in scene order.

    A scene whose image fails gets an ``error`` (stage ``image``) and has no picture.
    """
    scenes = task.scenes
    n = len(scenes)
    pictures: dict[str, Image.Image] = {}
    progress.update("images", done=0, total=n)
    for i, scene in enumerate(scenes):
        sid = scene.scene_id
        assert sid is not None
        try:
            if sid in fetches.images:
                pictures[sid] = fetches.images[sid].result()
                results[sid]["image_source"] = "input"
            elif scene.image:  # images_only: a given image is not needed here
                results[sid]["image_source"] = "input"
            else:
                rendered = render_image(ctx, scene.prompt or "", task.image, task.scene_seed(i), scene_id=sid)
                pictures[sid] = rendered.image
                results[sid].update(
                    image_source="generated",
                    image_url=rendered.result["image_url"],
                    image_key=rendered.result["image_key"],
                    image_bytes=rendered.result["bytes"],
                    image_sha256=rendered.result["sha256"],
                    image_seed=rendered.result["seed"],
                    image_timings=rendered.result["timings"],
                )
        except Exception as exc:  # noqa: BLE001 - reported per scene, batch goes on
            results[sid]["error"] = _scene_error(exc, "image")
        progress.update("images", done=i + 1, total=n, scene_id=sid, ok="error" not in results[sid])
    return pictures


def swap(ctx: RenderContext, task: BatchTask, pictures: dict[str, Image.Image], results: dict[str, dict[str, Any]],
         progress: ProgressReporter) -> _Swap:
    """The one swap to the video set, timed on its own so the story app can see what it cost.

    If the video set cannot be made resident (e.g. its checkpoint is missing), every
    scene that has a picture gets that error (stage ``video``); the images stand.
    """
    out = _Swap([s for s in task.scenes if s.scene_id in pictures])
    if not out.video_scenes:
        return out
    progress.update("swap", to=VIDEO_SET)
    before = ctx.manager.stats()
    was_loaded = ctx.manager.is_loaded(VIDEO_SET)
    # Fast preset: the copy of the DiT linears the videos will not read is not restored.
    idle = speed.idle_components(speed.resolve_plan(task.video.speed_knobs, ctx.manager.device))
    try:
        ctx.manager.ensure(VIDEO_SET, working_bytes=video_working_bytes(task.video.area, task.video.infer_frames),
                           idle=idle)
    except Exception as exc:  # noqa: BLE001 - e.g. checkpoint missing: every video fails, images stand
        err = _scene_error(exc, "video")
        for s in out.video_scenes:
            results[s.scene_id]["error"] = err  # type: ignore[index]
        out.video_scenes = []
    after = ctx.manager.stats()
    out.swap_time = after.swap_seconds - before.swap_seconds
    if not was_loaded and VIDEO_SET in after.loads:
        out.video_load_time = after.loads[VIDEO_SET]
    return out


def videos(ctx: RenderContext, task: BatchTask, video_scenes: list[Scene], pictures: dict[str, Image.Image],
           fetches: _Fetches, results: dict[str, dict[str, Any]], progress: ProgressReporter) -> None:
    """Phase 2 (Wan resident): each remaining scene's talking video, in scene order.

    A scene whose audio failed to download or decode gets that error (stage ``audio``),
    likewise for its pose video (stage ``pose_video``); one whose video fails gets stage
    ``video``.
    """
    done = 0
    progress.update("videos", done=0, total=len(video_scenes))
    video_ids = {s.scene_id for s in video_scenes}
    for i, scene in enumerate(task.scenes):
        sid = scene.scene_id
        if sid not in video_ids:
            continue
        assert sid is not None
        stage = "audio"
        try:
            audio = fetches.audio[sid].result()
            stage = "pose_video"
            pose = fetches.poses[sid].result() if sid in fetches.poses else None
        except Exception as exc:  # noqa: BLE001
            results[sid]["error"] = _scene_error(exc, stage)
        else:
            try:
                out = render_video(
                    ctx,
                    pictures[sid],
                    audio,
                    scene.video_text,
                    task.video,
                    task.scene_seed(i),
                    pose_frames=pose,
                    scene_id=sid,
                    progress=progress.steps("video_clips", scene_id=sid),
                )
                results[sid].update({k: v for k, v in out.items() if k != "seed"}, video_seed=out["seed"])
            except Exception as exc:  # noqa: BLE001
                results[sid]["error"] = _scene_error(exc, "video")
        done += 1
        progress.update("videos", done=done, total=len(video_scenes), scene_id=sid, ok="error" not in results[sid])


def assemble(task: BatchTask, results: dict[str, dict[str, Any]], timings: dict[str, float]) -> dict[str, Any]:
    """The job result: scenes in request order, counts, and the phase timings (seconds)."""
    ordered = [results[s.scene_id] for s in task.scenes]  # type: ignore[index]
    failed = sum(1 for r in ordered if "error" in r)
    return {
        "project_id": task.project_id,
        "scenes": ordered,
        "scenes_ok": len(ordered) - failed,
        "scenes_failed": failed,
        **{k: round(v, 3) for k, v in timings.items()},
    }


def run_batch(ctx: RenderContext, task: BatchTask, progress: ProgressReporter) -> dict[str, Any]:
    """Render every scene of ``task``; returns per-scene results and phase timings."""
    t_start = time.perf_counter()
    # A speed knob this device cannot run (fp8_unsupported) fails the story before any image is made.
    speed.resolve_plan(task.video.speed_knobs, ctx.manager.device)
    results: dict[str, dict[str, Any]] = {s.scene_id: {"scene_id": s.scene_id} for s in task.scenes}  # type: ignore[misc]
    with ThreadPoolExecutor(max_workers=_FETCH_THREADS, thread_name_prefix="fetch") as pool:
        # images_only (the client's `submit --workers N` fan-out): phase 1 alone, nothing fetched.
        fetches = _Fetches({}, {}) if task.images_only else fetch(ctx, task.scenes, pool)
        t = time.perf_counter()
        pictures = images(ctx, task, fetches, results, progress)
        images_time = time.perf_counter() - t
        swapped = _Swap([]) if task.images_only else swap(ctx, task, pictures, results, progress)
        t = time.perf_counter()
        if not task.images_only:
            videos(ctx, task, swapped.video_scenes, pictures, fetches, results, progress)
        videos_time = time.perf_counter() - t
    return assemble(task, results, {
        "images_time": images_time,
        "swap_time": swapped.swap_time,
        "video_load_time": swapped.video_load_time,
        "videos_time": videos_time,
        "total_time": time.perf_counter() - t_start,
    })
