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
from typing import Any

from PIL import Image

from storystudio.errors import StoryStudioError
from storystudio.media import AudioClip
from storystudio.models.footprint import video_working_bytes
from storystudio.progress import ProgressReporter
from storystudio.render import VIDEO_SET, RenderContext, fetch_audio, fetch_image, render_image, render_video
from storystudio.tasks import BatchTask, Scene

logger = logging.getLogger(__name__)

_FETCH_THREADS = 4


def _scene_error(exc: BaseException, stage: str) -> dict[str, str]:
    if isinstance(exc, StoryStudioError):
        return {**exc.to_result(), "stage": stage}
    logger.exception("unexpected failure in %s stage", stage, exc_info=exc)
    return {"error": f"internal error during {stage}: {type(exc).__name__}: {exc}", "code": "internal_error", "stage": stage}


def _seed(task: BatchTask, index: int, scene: Scene) -> int | None:
    if scene.seed is not None:
        return scene.seed
    return None if task.seed is None else (task.seed + index) % 2**63


def run_batch(ctx: RenderContext, task: BatchTask, progress: ProgressReporter) -> dict[str, Any]:
    """Render every scene of ``task``; returns per-scene results and phase timings."""
    t_start = time.perf_counter()
    scenes = task.scenes
    n = len(scenes)
    results: dict[str, dict[str, Any]] = {s.scene_id: {"scene_id": s.scene_id} for s in scenes}  # type: ignore[misc]
    images: dict[str, Image.Image] = {}

    with ThreadPoolExecutor(max_workers=_FETCH_THREADS, thread_name_prefix="fetch") as pool:
        audio_futs: dict[str, Future[AudioClip]] = {
            s.scene_id: pool.submit(fetch_audio, ctx, s.audio, s, field_name=f"scenes[{i}].audio")  # type: ignore[misc]
            for i, s in enumerate(scenes)
        }
        given_futs: dict[str, Future[Image.Image]] = {
            s.scene_id: pool.submit(fetch_image, ctx, s.image, field_name=f"scenes[{i}].image")  # type: ignore[misc]
            for i, s in enumerate(scenes)
            if s.image
        }

        # ---- phase 1: images (Z-Image resident)
        t_images = time.perf_counter()
        progress.update("images", done=0, total=n)
        for i, scene in enumerate(scenes):
            sid = scene.scene_id
            assert sid is not None
            try:
                if sid in given_futs:
                    images[sid] = given_futs[sid].result()
                    results[sid]["image_source"] = "input"
                else:
                    rendered = render_image(
                        ctx, scene.prompt or "", task.image, _seed(task, i, scene), scene_id=sid
                    )
                    images[sid] = rendered.image
                    results[sid].update(
                        image_source="generated",
                        image_url=rendered.result["image_url"],
                        image_key=rendered.result["image_key"],
                        image_seed=rendered.result["seed"],
                        image_timings=rendered.result["timings"],
                    )
            except Exception as exc:  # noqa: BLE001 - reported per scene, batch goes on
                results[sid]["error"] = _scene_error(exc, "image")
            progress.update("images", done=i + 1, total=n, scene_id=sid, ok="error" not in results[sid])
        images_time = time.perf_counter() - t_images

        # ---- the one swap (timed on its own so the story app can see what it cost)
        video_scenes = [s for s in scenes if s.scene_id in images]
        swap_time = 0.0
        video_load_time = 0.0
        if video_scenes:
            progress.update("swap", to=VIDEO_SET)
            before = ctx.manager.stats()
            was_loaded = ctx.manager.is_loaded(VIDEO_SET)
            try:
                ctx.manager.ensure(
                    VIDEO_SET, working_bytes=video_working_bytes(task.video.area, task.video.infer_frames)
                )
            except Exception as exc:  # noqa: BLE001 - e.g. checkpoint missing: every video fails, images stand
                err = _scene_error(exc, "video")
                for s in video_scenes:
                    results[s.scene_id]["error"] = err  # type: ignore[index]
                video_scenes = []
            after = ctx.manager.stats()
            swap_time = after.swap_seconds - before.swap_seconds
            if not was_loaded and VIDEO_SET in after.loads:
                video_load_time = after.loads[VIDEO_SET]

        # ---- phase 2: videos (Wan resident)
        t_videos = time.perf_counter()
        done = 0
        progress.update("videos", done=0, total=len(video_scenes))
        video_ids = {s.scene_id for s in video_scenes}
        for i, scene in enumerate(scenes):
            sid = scene.scene_id
            if sid not in video_ids:
                continue
            assert sid is not None
            try:
                audio = audio_futs[sid].result()
            except Exception as exc:  # noqa: BLE001
                results[sid]["error"] = _scene_error(exc, "audio")
            else:
                try:
                    out = render_video(
                        ctx,
                        images[sid],
                        audio,
                        scene.video_prompt or scene.prompt or "",
                        task.video,
                        _seed(task, i, scene),
                        scene_id=sid,
                        progress=progress.steps("video_clips", scene_id=sid),
                    )
                    results[sid].update({k: v for k, v in out.items() if k != "seed"}, video_seed=out["seed"])
                except Exception as exc:  # noqa: BLE001
                    results[sid]["error"] = _scene_error(exc, "video")
            done += 1
            progress.update("videos", done=done, total=len(video_scenes), scene_id=sid, ok="error" not in results[sid])
        videos_time = time.perf_counter() - t_videos

    ordered = [results[s.scene_id] for s in scenes]  # type: ignore[index]
    failed = sum(1 for r in ordered if "error" in r)
    return {
        "project_id": task.project_id,
        "scenes": ordered,
        "scenes_ok": n - failed,
        "scenes_failed": failed,
        "images_time": round(images_time, 3),
        "swap_time": round(swap_time, 3),
        "video_load_time": round(video_load_time, 3),
        "videos_time": round(videos_time, 3),
        "total_time": round(time.perf_counter() - t_start, 3),
    }
