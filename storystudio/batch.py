"""A whole story in one job: every scene's image first, one swap, then every video.

Why this order: the two model sets may not both fit in VRAM with a video's
activations, and each swap costs about a second (seconds more if they are cold).
Rendering all images, then all videos, means at most one swap per batch
whatever the number of scenes. Audio downloads and decoding run in a thread pool
while the images render, so the video phase never waits on the network.

A scene that fails (bad audio URL, undecodable image, out of memory) gets an
``error`` entry with a stable code; the other scenes still complete.

Crashes and deadlines: every image and video is stored the moment it is done and
recorded in the story's manifest (:mod:`storystudio.manifest`), and a progress
update carries the scene's URLs, so a worker killed mid-batch loses at most the
piece in flight. With ``"resume": true`` the scenes whose inputs are unchanged are
taken from storage (``reused: true``) and the video set is not even loaded if no
video is left to render. Before each piece the job's time budget is checked
(:mod:`storystudio.deadline`): what cannot finish in time is marked
``deadline_exceeded`` and the batch returns what is done.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from storystudio.deadline import Deadline, image_units, video_units
from storystudio.batch_result import assemble
from storystudio.errors import StoryStudioError
from storystudio.manifest import Manifest, Part, image_hash, story_segment, video_hash
from storystudio.media import AudioClip, load_image
from storystudio.models import speed
from storystudio.models.clip_plan import longest_clip_frames
from storystudio.models.footprint import video_working_bytes
from storystudio.progress import ProgressReporter
from storystudio.render import (
    VIDEO_FPS,
    VIDEO_SET,
    RenderContext,
    fetch_audio_hashed,
    fetch_image_hashed,
    fetch_pose_frames_hashed,
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
    """Downloads started before the image phase: every scene's audio, the given images and the pose
    videos, each with the sha256 of its bytes (the scene hashes of storystudio/manifest.py)."""

    audio: dict[str, Future[tuple[AudioClip, str]]]
    images: dict[str, Future[tuple[Image.Image, str]]]
    poses: dict[str, Future[tuple[np.ndarray, str]]] = field(default_factory=dict)


@dataclass
class _Story:
    """What the phases share: the results so far, the pictures, the manifest and the deadline."""

    task: BatchTask
    results: dict[str, dict[str, Any]]
    manifest: Manifest
    deadline: Deadline
    pictures: dict[str, Image.Image | None] = field(default_factory=dict)  # None: reused, not needed
    image_hashes: dict[str, str] = field(default_factory=dict)


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
            s.scene_id: pool.submit(fetch_audio_hashed, ctx, s.audio, s, field_name=f"scenes[{i}].audio")  # type: ignore[misc]
            for i, s in enumerate(scenes)
        },
        images={
            s.scene_id: pool.submit(fetch_image_hashed, ctx, s.image, field_name=f"scenes[{i}].image")  # type: ignore[misc]
            for i, s in enumerate(scenes)
            if s.image
        },
        poses={
            s.scene_id: pool.submit(  # type: ignore[misc]
                fetch_pose_frames_hashed, ctx, s.pose_video, fps=VIDEO_FPS, field_name=f"scenes[{i}].pose_video"
            )
            for i, s in enumerate(scenes)
            if s.pose_video
        },
    )


def _urls(ctx: RenderContext, result: dict[str, Any]) -> dict[str, str]:
    return {k: result[k] for k in ("image_url", "video_url") if k in result}


def _reuse_image(ctx: RenderContext, story: _Story, sid: str, ihash: str) -> bool:
    """Take the scene's picture from storage if the manifest has it from the same inputs."""
    part = story.manifest.part(sid, "image", ihash)
    if part is None:
        return False
    try:
        png = ctx.storage.get_bytes(part.key)
        picture = load_image(png) if png is not None else None
    except StoryStudioError as exc:
        logger.warning("stored image of scene %s cannot be reused (%s); rendering it again", sid, exc.message)
        return False
    if picture is None:
        return False
    story.pictures[sid] = picture
    story.results[sid].update(part.result, image_url=ctx.storage.url(part.key), image_reused=True)
    return True


def images(ctx: RenderContext, story: _Story, fetches: _Fetches, progress: ProgressReporter) -> None:
    """Phase 1 (Z-Image resident): each scene's picture, given, reused or generated, in scene order.

    A scene whose image fails gets an ``error`` (stage ``image``) and has no picture;
    one that cannot finish before the deadline gets ``deadline_exceeded``.
    """
    task, results = story.task, story.results
    scenes = task.scenes
    n = len(scenes)
    progress.update("images", done=0, total=n)
    for i, scene in enumerate(scenes):
        sid = scene.scene_id
        assert sid is not None
        try:
            if sid in fetches.images:
                picture, sha = fetches.images[sid].result()
                story.pictures[sid] = picture
                story.image_hashes[sid] = image_hash(task, i, sha)
                results[sid]["image_source"] = "input"
            elif scene.image:  # images_only: a given image is not needed here
                results[sid]["image_source"] = "input"
            else:
                ihash = story.image_hashes[sid] = image_hash(task, i, None)
                if not (task.resume and _reuse_image(ctx, story, sid, ihash)):
                    _render_image(ctx, story, i, scene, ihash)
        except Exception as exc:  # noqa: BLE001 - reported per scene, batch goes on
            results[sid]["error"] = _scene_error(exc, "image")
            story.pictures.pop(sid, None)
        ok = "error" not in results[sid]
        progress.update("images", done=i + 1, total=n, scene_id=sid, ok=ok, **_urls(ctx, results[sid]))


def _render_image(ctx: RenderContext, story: _Story, i: int, scene: Scene, ihash: str) -> None:
    task, sid = story.task, scene.scene_id
    assert sid is not None
    fits, est = story.deadline.fits("image", image_units(task.image.width, task.image.height, task.image.steps))
    if not fits:
        story.results[sid]["error"] = story.deadline.exceeded("image", est)
        return
    with story.deadline.timed("image", image_units(task.image.width, task.image.height, task.image.steps)):
        rendered = render_image(ctx, scene.prompt or "", task.image, task.scene_seed(i), scene_id=sid)
    fields = {
        "image_source": "generated",
        "image_key": rendered.result["image_key"],
        "image_bytes": rendered.result["bytes"],
        "image_sha256": rendered.result["sha256"],
        "image_seed": rendered.result["seed"],
        "image_timings": rendered.result["timings"],
    }
    story.manifest.record(sid, "image", Part(ihash, ctx.result_key("image", "png", sid), fields))
    story.pictures[sid] = rendered.image
    story.results[sid].update(fields, image_url=rendered.result["image_url"])


def reuse_videos(ctx: RenderContext, story: _Story, fetches: _Fetches, progress: ProgressReporter) -> None:
    """Resume: every scene whose stored video was made from the same inputs is done already.

    Runs before the swap, so a story with nothing left to render never loads Wan.
    Waits for the scenes' audio (fetched during the images) to hash its bytes.
    """
    for i, scene in enumerate(story.task.scenes):
        sid = scene.scene_id
        assert sid is not None
        if sid not in story.pictures or sid not in story.image_hashes:
            continue
        try:
            _clip, audio_sha = fetches.audio[sid].result()
            pose_sha = fetches.poses[sid].result()[1] if sid in fetches.poses else None
        except Exception:  # noqa: BLE001 - the video phase reports it (stage audio / pose_video)
            continue
        vhash = video_hash(story.task, i, story.image_hashes[sid], audio_sha, pose_sha)
        part = story.manifest.part(sid, "video", vhash)
        if part is None:
            continue
        r = story.results[sid]
        r.update(part.result, video_url=ctx.storage.url(part.key))
        r["reused"] = bool(r.get("image_reused") or r.get("image_source") == "input")
        story.pictures.pop(sid)
        progress.update("scene_done", scene_id=sid, reused=r["reused"], **_urls(ctx, r))


def swap(ctx: RenderContext, story: _Story, progress: ProgressReporter) -> _Swap:
    """The one swap to the video set, timed on its own so the story app can see what it cost.

    If the video set cannot be made resident (e.g. its checkpoint is missing), every
    scene that has a picture gets that error (stage ``video``); the images stand.
    """
    task, results = story.task, story.results
    out = _Swap([s for s in task.scenes if s.scene_id in story.pictures])
    if not out.video_scenes:
        return out
    progress.update("swap", to=VIDEO_SET)
    before = ctx.manager.stats()
    was_loaded = ctx.manager.is_loaded(VIDEO_SET)
    # Fast preset: the copy of the DiT linears the videos will not read is not restored.
    idle = speed.idle_components(speed.resolve_plan(task.video.speed_knobs, ctx.manager.device))
    try:
        working = video_working_bytes(task.video.area, longest_clip_frames(task.video.infer_frames))
        ctx.manager.ensure(VIDEO_SET, working_bytes=working, idle=idle)
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


def videos(ctx: RenderContext, story: _Story, video_scenes: list[Scene], fetches: _Fetches,
           progress: ProgressReporter) -> None:
    """Phase 2 (Wan resident): each remaining scene's talking video, in scene order.

    A scene whose audio failed to download or decode gets that error (stage ``audio``),
    likewise for its pose video (stage ``pose_video``); one whose video fails gets stage
    ``video``; one that cannot finish before the deadline ``deadline_exceeded``.
    """
    task, results = story.task, story.results
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
            audio, audio_sha = fetches.audio[sid].result()
            stage = "pose_video"
            pose, pose_sha = fetches.poses[sid].result() if sid in fetches.poses else (None, None)
        except Exception as exc:  # noqa: BLE001
            results[sid]["error"] = _scene_error(exc, stage)
        else:
            units = video_units(audio.duration_s, task.video.area, task.video.infer_frames, task.video.steps,
                                trim_last=ctx.settings.video_path.trim_last_clip)
            fits, est = story.deadline.fits("video", units)
            if not fits:
                results[sid]["error"] = story.deadline.exceeded("video", est)
            else:
                try:
                    with story.deadline.timed("video", units):
                        out = render_video(
                            ctx,
                            story.pictures[sid],  # type: ignore[arg-type]
                            audio,
                            scene.video_text,
                            task.video,
                            task.scene_seed(i),
                            pose_frames=pose,
                            scene_id=sid,
                            progress=progress.steps("video_clips", scene_id=sid),
                        )
                    fields = {k: v for k, v in out.items() if k not in ("seed", "video_url")}
                    fields["video_seed"] = out["seed"]
                    story.manifest.record(sid, "video", Part(video_hash(task, i, story.image_hashes[sid], audio_sha, pose_sha),
                                                             ctx.result_key("video", "mp4", sid), fields))
                    results[sid].update(fields, video_url=out["video_url"])
                    if task.resume:
                        results[sid]["reused"] = False
                except Exception as exc:  # noqa: BLE001
                    results[sid]["error"] = _scene_error(exc, "video")
        done += 1
        ok = "error" not in results[sid]
        progress.update("videos", done=done, total=len(video_scenes), scene_id=sid, ok=ok)
        if ok:
            progress.update("scene_done", scene_id=sid, reused=False, **_urls(ctx, results[sid]))


def run_batch(ctx: RenderContext, task: BatchTask, progress: ProgressReporter) -> dict[str, Any]:
    """Render every scene of ``task``; returns per-scene results and phase timings."""
    t_start = time.perf_counter()
    # A speed knob this device cannot run (fp8_unsupported) fails the story before any image is made.
    speed.resolve_plan(task.video.speed_knobs, ctx.manager.device)
    ctx = replace(ctx, story_segment=story_segment(task, ctx.job_id))
    results: dict[str, dict[str, Any]] = {s.scene_id: {"scene_id": s.scene_id} for s in task.scenes}  # type: ignore[misc]
    story = _Story(task, results, Manifest.open(ctx.storage, task, ctx.job_id), ctx.deadline or Deadline(None))
    with ThreadPoolExecutor(max_workers=_FETCH_THREADS, thread_name_prefix="fetch") as pool:
        # images_only (the client's `submit --workers N` fan-out): phase 1 alone, nothing fetched.
        fetches = _Fetches({}, {}) if task.images_only else fetch(ctx, task.scenes, pool)
        t = time.perf_counter()
        images(ctx, story, fetches, progress)
        images_time = time.perf_counter() - t
        if task.resume and not task.images_only:
            reuse_videos(ctx, story, fetches, progress)
        swapped = _Swap([]) if task.images_only else swap(ctx, story, progress)
        t = time.perf_counter()
        if not task.images_only:
            videos(ctx, story, swapped.video_scenes, fetches, progress)
        videos_time = time.perf_counter() - t
    return assemble(task, results, {
        "images_time": images_time,
        "swap_time": swapped.swap_time,
        "video_load_time": swapped.video_load_time,
        "videos_time": videos_time,
        "total_time": time.perf_counter() - t_start,
    })
