"""The Worker in-process on tiny checkpoints: batch ordering and swaps, every audio format,
failures that must stay inside one job, and the offline demo (the README's main job)."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from storystudio import demo
from storystudio.config import WorkerSettings
from storystudio.media import encode_audio, encode_png, probe_media, synth_speech
from storystudio.models.image_generator import ZImageGenerator
from storystudio.storage import StorageSettings
from storystudio.worker import Worker

FPS = 16
VIDEO = {"max_area": 64 * 64, "steps": 2, "infer_frames": 16}
IMAGE = {"width": 256, "height": 256, "steps": 2}
MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "m4a": "audio/mp4", "flac": "audio/flac", "ogg": "audio/ogg",
        "opus": "audio/ogg"}


def make_worker(tiny_models, tmp_path: Path, *, wan_dir: Path | None = None, budget_gib: float | None = None,
                events: list | None = None) -> Worker:
    zdir, wdir = tiny_models
    settings = replace(
        WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}),
        zimage_dir=zdir,
        wan_dir=wan_dir or wdir,
        vram_budget_gib=budget_gib,
        storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(tmp_path / "out")}),
    )
    sink = None if events is None else (lambda job, event: events.append(event))
    return Worker.from_settings(settings, sink=sink)


def data_uri(fmt: str, seconds: float, seed: int = 0) -> str:
    return f"data:{MIME[fmt]};base64," + base64.b64encode(encode_audio(synth_speech(seconds, seed=seed), fmt)).decode()


def batch(scenes: list[dict], **extra) -> dict:
    return {"id": "job-1", "input": {"task": "batch", "project_id": "p", "scenes": scenes, "image": IMAGE,
                                     "video": VIDEO, "seed": 1, **extra}}


def test_batch_renders_all_images_then_one_swap_then_all_videos(tiny_models, tmp_path):
    events: list[dict] = []
    worker = make_worker(tiny_models, tmp_path, events=events)
    scenes = [{"scene_id": f"s{i}", "prompt": f"scene {i}", "audio": data_uri("wav", 1.0, i)} for i in range(3)]
    r = worker.handle(batch(scenes))
    assert r["scenes_ok"] == 3, r
    stages = [e["stage"] for e in events]
    last_image = max(i for i, s in enumerate(stages) if s == "images")
    first_video = min(i for i, s in enumerate(stages) if s in ("videos", "video_clips"))
    assert stages.index("swap") == last_image + 1 < first_video, stages
    assert [e["scene_id"] for e in events if e["stage"] == "images" and "scene_id" in e] == ["s0", "s1", "s2"]
    assert [e["scene_id"] for e in events if e["stage"] == "videos" and "scene_id" in e] == ["s0", "s1", "s2"]
    for scene in r["scenes"]:
        info = probe_media(scene["video_url"])
        assert info.video.frame_count == FPS and info.audio is not None
        assert Image.open(scene["image_url"]).size == (256, 256)


def test_forced_budget_swaps_once_per_phase_change(tiny_models, tmp_path):
    zsize = sum(p.numel() * 4 for m in ZImageGenerator.from_pretrained(tiny_models[0]).components().values()
                for p in m.parameters())
    worker = make_worker(tiny_models, tmp_path, budget_gib=(zsize + 30 * 2**20) / 2**30)
    scenes = [{"scene_id": "a", "prompt": "x", "audio": data_uri("wav", 1.0)},
              {"scene_id": "b", "prompt": "y", "audio": data_uri("wav", 1.0, 1)}]
    first = worker.handle(batch(scenes))
    assert first["scenes_ok"] == 2, first
    assert first["manager"]["parked"] == ["image"], "the video phase must have parked Z-Image"
    swaps_after_first = first["manager"]["swaps"]
    assert swaps_after_first == 1, "cold images, then exactly one swap to load/make room for Wan"
    second = worker.handle(batch(scenes))
    assert second["manager"]["swaps"] == swaps_after_first + 2, "back to images once, to videos once"
    assert second["swap_time"] > 0


def test_every_audio_format_becomes_a_video_of_its_duration(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path)
    fmts = ["wav", "mp3", "m4a", "flac", "ogg", "opus"]
    scenes = [{"scene_id": f, "prompt": "a face", "audio": data_uri(f, 1.25, i)} for i, f in enumerate(fmts)]
    r = worker.handle(batch(scenes))
    assert r["scenes_ok"] == len(fmts), [s.get("error") for s in r["scenes"]]
    for scene in r["scenes"]:
        info = probe_media(scene["video_url"])
        assert info.video.frame_count == 20, scene["scene_id"]  # round(1.25 s * 16 fps)
        assert info.audio.codec == "aac"
        assert abs(info.audio.duration - 1.25) <= 1 / FPS, (scene["scene_id"], info.audio.duration)


def test_audio_trim_sets_the_video_length(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path)
    scenes = [{"scene_id": "t", "prompt": "a face", "audio": data_uri("mp3", 3.0), "audio_start": 0.5,
               "audio_duration": 1.5}]
    r = worker.handle(batch(scenes))
    info = probe_media(r["scenes"][0]["video_url"])
    assert info.video.frame_count == 24 and abs(info.audio.duration - 1.5) <= 1 / FPS


def test_missing_wan_checkpoint_fails_videos_but_not_images(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path, wan_dir=tmp_path / "no-such-wan")
    r = worker.handle(batch([{"scene_id": "a", "prompt": "x", "audio": data_uri("wav", 1.0)}]))
    scene = r["scenes"][0]
    assert scene["image_url"] and Path(scene["image_url"]).is_file()
    assert scene["error"]["code"] == "checkpoint_missing" and scene["error"]["stage"] == "video"
    assert "no-such-wan" in scene["error"]["error"]
    png = base64.b64encode(Path(scene["image_url"]).read_bytes()).decode()
    single = worker.handle({"id": "v", "input": {"task": "video", "image": png, "audio": data_uri("wav", 1.0),
                                                 **VIDEO}})
    assert single["code"] == "checkpoint_missing" and single["error"].startswith("checkpoint_missing: ")
    ok = worker.handle({"id": "i", "input": {"task": "image", "prompt": "still fine", **IMAGE}})
    assert "error" not in ok and Path(ok["image_url"]).is_file()


def test_out_of_memory_fails_one_job_and_the_worker_goes_on(tiny_models, tmp_path, monkeypatch):
    worker = make_worker(tiny_models, tmp_path)
    original = ZImageGenerator.generate

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ZImageGenerator, "generate", oom)
    r = worker.handle({"id": "i", "input": {"task": "image", "prompt": "x", **IMAGE}})
    assert r["code"] == "out_of_memory" and "lower resolution" in r["error"]
    monkeypatch.setattr(ZImageGenerator, "generate", original)
    r = worker.handle({"id": "j", "input": {"task": "image", "prompt": "x", **IMAGE}})
    assert "error" not in r and r["manager"]["oom_retries"] == 1


def test_unexpected_exception_is_an_internal_error_result(tiny_models, tmp_path, monkeypatch):
    worker = make_worker(tiny_models, tmp_path)
    monkeypatch.setattr(ZImageGenerator, "generate", lambda *a, **k: 1 / 0)
    r = worker.handle({"id": "i", "input": {"task": "image", "prompt": "x", **IMAGE}})
    assert r["code"] == "internal_error" and "ZeroDivisionError" in r["error"] and r["job_id"] == "i"


def test_demo_main_job_writes_pngs_and_mp4s(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "ensure_tiny_checkpoints", lambda models_dir: tiny_models)
    assert demo.main(["--models-dir", str(tmp_path / "unused"), "--output", str(tmp_path / "demo")]) == 0
    pngs = sorted((tmp_path / "demo").rglob("*.png"))
    mp4s = sorted((tmp_path / "demo").rglob("*.mp4"))
    assert len(pngs) == 2 and len(mp4s) == 2
    assert all(Image.open(p).size == (256, 256) for p in pngs)
    frames = sorted(probe_media(p).video.frame_count for p in mp4s)
    assert frames == [24, 40]  # 1.5 s and 2.5 s of speech at 16 fps
    assert all(probe_media(p).audio is not None for p in mp4s)
    assert '"scenes_ok": 2' in capsys.readouterr().out


def test_nothing_loads_at_start_and_prewarm_loads_and_warms_up_only_its_set(tiny_models, tmp_path, caplog,
                                                                          monkeypatch):
    from storystudio.models.video_generator import WanS2VGenerator

    worker = make_worker(tiny_models, tmp_path)
    worker.prewarm()  # STORYSTUDIO_PREWARM unset: none
    assert not worker.manager.is_loaded("image") and not worker.manager.is_loaded("video")
    warmed: list[tuple] = []
    original = WanS2VGenerator.generate

    def recording(self, req, progress=None):
        result = original(self, req, progress)
        warmed.append((req.image.size, req.max_area, req.infer_frames, req.steps, req.guidance,
                       result.engine["clip_frames"]))
        return result

    monkeypatch.setattr(WanS2VGenerator, "generate", recording)
    worker.settings = replace(worker.settings, prewarm=("video",), warmup_video=(64, 64, 8))
    with caplog.at_level("INFO"):
        worker.prewarm()
    assert worker.manager.is_loaded("video") and not worker.manager.is_loaded("image")
    # One 1-step clip at the warm-up shape, guided like a job (the DiT runs eager on a CPU).
    assert warmed == [((64, 64), 64 * 64, 8, 1, 4.5, [8])]
    assert set(worker.startup_seconds) >= {"locate_and_preflight", "load_video", "warmup_video"}
    assert any("pre-warmed model set video: loaded in" in r.getMessage() and "warmed up in" in r.getMessage()
               for r in caplog.records)


def test_prewarm_both_sets_in_order(tiny_models, tmp_path):
    from storystudio.config import WorkerSettings

    assert WorkerSettings.from_env({"STORYSTUDIO_PREWARM": "both"}).prewarm == ("image", "video")
    assert WorkerSettings.from_env({"STORYSTUDIO_PREWARM": "video,image"}).prewarm == ("video", "image")
    assert WorkerSettings.from_env({"STORYSTUDIO_PREWARM": "none"}).prewarm == ()
    with pytest.raises(Exception, match="STORYSTUDIO_PREWARM must be none, image, video or both"):
        WorkerSettings.from_env({"STORYSTUDIO_PREWARM": "audio"})
    worker = make_worker(tiny_models, tmp_path)
    worker.settings = replace(worker.settings, prewarm=("image",), warmup_image=(256, 256))
    worker.prewarm()
    assert worker.manager.is_loaded("image") and worker.startup_seconds["warmup_image"] > 0


def test_prewarm_with_a_broken_volume_leaves_the_worker_answering(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path, wan_dir=tmp_path / "empty-volume")
    worker.settings = replace(worker.settings, prewarm=("video",))
    worker.prewarm()  # logs the checkpoint error, does not raise
    png = base64.b64encode(encode_png(Image.new("RGB", (64, 64), "white"))).decode()
    r = worker.handle({"id": "v", "input": {"task": "video", "image": png, "audio": data_uri("wav", 1.0), **VIDEO}})
    assert r["code"] == "checkpoint_missing" and "empty-volume" in r["error"]
    ok = worker.handle({"id": "i", "input": {"task": "image", "prompt": "x", **IMAGE}})
    assert "error" not in ok


def test_batch_scene_pose_video_and_result_hashes(tiny_models, tmp_path):
    """A scene may carry a pose video; results report size and SHA-256 of each file so a
    client can verify (and skip) its downloads."""
    import hashlib

    import numpy as np

    from storystudio.media import encode_mp4

    pose = encode_mp4((np.random.default_rng(1).random((16, 48, 40, 3)) * 255).astype(np.uint8), FPS, None,
                      tmp_path / "pose.mp4").read_bytes()
    pose_uri = "data:video/mp4;base64," + base64.b64encode(pose).decode()
    worker = make_worker(tiny_models, tmp_path)
    scenes = [{"scene_id": "posed", "prompt": "a dancer", "audio": data_uri("wav", 1.0), "pose_video": pose_uri},
              {"scene_id": "bad-pose", "prompt": "x", "audio": data_uri("wav", 1.0, 1),
               "pose_video": "data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode()}]
    r = worker.handle(batch(scenes))
    posed, bad = r["scenes"]
    assert "error" not in posed, posed
    assert probe_media(posed["video_url"]).video.frame_count == FPS
    video = Path(posed["video_url"]).read_bytes()
    image = Path(posed["image_url"]).read_bytes()
    assert (posed["bytes"], posed["sha256"]) == (len(video), hashlib.sha256(video).hexdigest())
    assert (posed["image_bytes"], posed["image_sha256"]) == (len(image), hashlib.sha256(image).hexdigest())
    assert bad["error"]["stage"] == "pose_video" and bad["error"]["code"] == "invalid_video", bad["error"]
    assert "image_url" in bad, "a bad pose video fails only that scene's video"
