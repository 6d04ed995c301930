"""The service's parts without a server: translations, folders, the job table, error statuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
import time

import pytest
from starlette.exceptions import HTTPException

from storystudio.errors import InputFetchError, InvalidInput
from storystudio.inputs import InputLimits
from storystudio.serve.errors import http_status
from storystudio.serve.legacy import SpeechToVideoRequest, generate_video_input, speech_to_video_input
from storystudio.serve.uploads import BodyLimits
from storystudio.serve.paths import MediaRoot, OutputFolder
from storystudio.serve.queue import GpuQueue
from storystudio.serve.store import DatabaseBusy, JobStore, TooManyJobs, describe_input
from storystudio.tasks import VideoTask, parse_job_input

MEDIA = {"image": "aW1n", "audio": "YXVk"}


# ---------------------------------------------------------------------------- translations
def test_generate_video_form_becomes_a_video_job():
    job = generate_video_input({"steps": 2}, prompt=None, resolution="720p", num_clips=None)
    assert job == {"task": "video", "steps": 2, "prompt": "", "resolution": "720p"}
    task = parse_job_input({**job, **MEDIA})
    assert isinstance(task, VideoTask) and task.area == 720 * 1280 and task.steps == 2


def test_num_clips_caps_the_audio_length():
    assert generate_video_input({}, prompt="p", resolution="480p", num_clips=2)["audio_duration"] == 2 * 80 / 16
    assert generate_video_input({"infer_frames": 12}, prompt="p", resolution="480p", num_clips=3)["audio_duration"] == 3 * 12 / 16


@pytest.mark.parametrize(("size", "area", "label"), [
    ("1280*720", 1280 * 720, "1280*720"), ("832*480", 832 * 480, "832*480"), ("480*832", 480 * 832, "480*832"),
    (" 1024 x 704 ", 1024 * 704, "1024*704"),
])
def test_speech_to_video_size_is_the_pixel_area(size, area, label):
    job, got = speech_to_video_input(SpeechToVideoRequest(image_path="i", audio_path="a", size=size), {})
    assert job["max_area"] == area and got == label
    assert parse_job_input({**job, **MEDIA}).area == area


def test_speech_to_video_official_names_map_onto_the_worker_fields():
    req = SpeechToVideoRequest(image_path="i", audio_path="a", prompt="hi", frame_num=81, sample_steps=30,
                               sample_guide_scale=5.0, sample_shift=4.0, base_seed=42, negative_prompt="blur")
    job, label = speech_to_video_input(req, {"steps": 2, "resolution": "720p"})
    assert job == {"task": "video", "steps": 30, "resolution": "720p", "prompt": "hi", "infer_frames": 80,
                   "guidance": 5.0, "shift": 4.0, "seed": 42, "negative_prompt": "blur"}
    assert label == "720p"
    task = parse_job_input({**job, **MEDIA})
    assert (task.infer_frames, task.steps, task.guidance, task.shift, task.seed) == (80, 30, 5.0, 4.0, 42)
    job, _ = speech_to_video_input(SpeechToVideoRequest(image_path="i", audio_path="a", frame_num=48, base_seed=-1), {})
    assert job["infer_frames"] == 48 and "seed" not in job, "Wan's -1 means a random seed"


def test_speech_to_video_bounds_come_from_the_worker_schema():
    job, _ = speech_to_video_input(SpeechToVideoRequest(image_path="i", audio_path="a", size="1920*1080"), {})
    with pytest.raises(InvalidInput, match="max_area"):
        parse_job_input({**job, **MEDIA})
    job, _ = speech_to_video_input(SpeechToVideoRequest(image_path="i", audio_path="a", frame_num=30), {})
    with pytest.raises(InvalidInput, match="infer_frames"):
        parse_job_input({**job, **MEDIA})
    with pytest.raises(InvalidInput, match="size: expected WIDTH\\*HEIGHT"):
        speech_to_video_input(SpeechToVideoRequest(image_path="i", audio_path="a", size="big"), {})


# ---------------------------------------------------------------------------- folders
@pytest.fixture()
def media_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"png-bytes")
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "sub" / "a.png", root / "inner.png")
    return root


def test_media_root_reads_inside_and_refuses_everything_else(media_root, tmp_path):
    media, limits = MediaRoot(media_root), InputLimits(max_image_bytes=100)
    assert media.read("sub/a.png", "image", limits, "image_path") == b"png-bytes"
    assert media.read(str(media_root / "sub/a.png"), "image", limits, "image_path") == b"png-bytes"
    assert media.read("sub/../inner.png", "image", limits, "image_path") == b"png-bytes", "links inside are fine"
    for path in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/../../secret.png", "/etc/passwd",
                 f"{media_root}/../secret.png", f"{media_root}x/a.png"):
        with pytest.raises(InputFetchError) as info:
            media.read(path, "image", limits, "image_path")
        assert info.value.code == "input_forbidden", path
        assert info.value.message.startswith("image_path: ") and "outside the media root" in info.value.message
    with pytest.raises(InputFetchError) as info:
        media.read("sub/missing.png", "image", limits, "image_path")
    assert info.value.code == "input_not_found"
    with pytest.raises(InputFetchError) as info:
        media.read("sub", "image", limits, "image_path")
    assert info.value.code == "input_not_found"
    with pytest.raises(InputFetchError) as info:
        media.read("sub/a.png", "image", InputLimits(max_image_bytes=4), "image_path")
    assert info.value.code == "input_too_large" and "over the limit of 4 bytes" in info.value.message
    with pytest.raises(InputFetchError) as info:
        MediaRoot(None).read("sub/a.png", "image", limits, "image_path")
    assert info.value.code == "input_forbidden" and "STORYSTUDIO_MEDIA_ROOT" in info.value.message


def test_output_folder_serves_results_only(tmp_path):
    root = tmp_path / "out"
    (root / "storystudio/jobs/j1").mkdir(parents=True)
    (root / "storystudio/jobs/j1/video.mp4").write_bytes(b"mp4")
    (root / "storystudio/jobs/j1/image.png").write_bytes(b"png")
    (root / ".serve").mkdir()
    (root / ".serve/jobs.mp4").write_bytes(b"db")
    (root / "notes.txt").write_text("x")
    (tmp_path / "secret.mp4").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.mp4", root / "escape.mp4")
    out = OutputFolder(root)
    assert out.resolve("storystudio/jobs/j1/video.mp4").read_bytes() == b"mp4"
    assert out.resolve("storystudio/jobs/j1/image.png").read_bytes() == b"png"
    for name, status in (("../secret.mp4", 400), ("storystudio/../../secret.mp4", 400), ("/etc/passwd", 400),
                         (".serve/jobs.mp4", 400), ("notes.txt", 400), ("a\\..\\b.mp4", 400), ("", 400),
                         ("escape.mp4", 404), ("storystudio/jobs/j2/video.mp4", 404)):
        with pytest.raises(HTTPException) as info:
            out.resolve(name)
        assert info.value.status_code == status, name
    assert [v["filename"] for v in out.videos()] == ["storystudio/jobs/j1/video.mp4"]


def test_results_point_at_videos():
    out = OutputFolder("/srv/out")
    result = {"video_url": "/srv/out/storystudio/jobs/j/video.mp4", "video_key": "storystudio/jobs/j/video.mp4",
              "scenes": [{"image_url": "/x.png", "image_key": "p/j/s 1/image.png", "video_url": "/y"}],
              "other_url": "kept"}
    public = out.public(result, "http://h:8000/")
    assert public["video_url"] == "http://h:8000/videos/storystudio/jobs/j/video.mp4"
    assert public["scenes"][0]["image_url"] == "http://h:8000/videos/p/j/s%201/image.png"
    assert public["scenes"][0]["video_url"] == "/y" and public["other_url"] == "kept", "no key, no rewrite"
    assert result["video_url"].startswith("/srv"), "the stored result is not changed"


# ---------------------------------------------------------------------------- job table
def test_describe_input_hashes_media_and_keeps_settings():
    job = {"task": "batch", "project_id": "p", "scenes": [{"audio": "https://x/a.mp3", "prompt": "hi"},
                                                          {"audio": "QUJD", "image": "SU1H"}],
           "video": {"steps": 2}, "image": {"width": 512}}
    params, hashes = describe_input(job, {"scenes.1.audio": b"ABC"})
    assert params["scenes"][0] == {"audio": "sha256:" + hashlib.sha256(b"https://x/a.mp3").hexdigest(), "prompt": "hi"}
    assert hashes["scenes.1.audio"] == {"sha256": hashlib.sha256(b"ABC").hexdigest(), "bytes": 3, "of": "file"}
    assert hashes["scenes.1.image"]["of"] == "value" and params["image"] == {"width": 512}
    assert params["video"] == {"steps": 2}
    again, hashes2 = describe_input(json.loads(json.dumps(job)), {"scenes.1.audio": b"ABC"})
    assert hashes2["input"] == hashes["input"] and again == params
    _, other = describe_input({**job, "seed": 1}, {"scenes.1.audio": b"ABC"})
    assert other["input"] != hashes["input"]
    long_prompt, h = describe_input({"task": "video", "prompt": "x" * 5000, "x_payload": "y" * 5000})
    assert long_prompt["x_payload"].startswith("sha256:") and h["x_payload"]["bytes"] == 5000


def _add(store: JobStore, job_id: str, key: str = "k", limit: int = 5, now: float = 1.0):
    return store.add(job_id=job_id, api="jobs", task="video", api_key=key, params={}, input_hashes={}, meta={},
                     now=now, max_unfinished=limit)


def test_store_limits_unfinished_jobs_per_key(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    _add(store, "a", limit=2)
    _add(store, "b", limit=2)
    with pytest.raises(TooManyJobs, match="already has 2 unfinished"):
        _add(store, "c", limit=2)
    _add(store, "c", key="other", limit=2)
    store.mark_running("a", 2.0)
    store.finish("a", {"video_key": "v"}, 3.0)
    _add(store, "d", limit=2)
    assert store.counts() == {"queued": 3, "running": 0}
    assert store.ahead_of(store.get("d")) == 2


def test_store_survives_reopen_and_fails_what_was_unfinished(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    with pytest.raises(DatabaseBusy, match="another storystudio serve process"):
        JobStore(path)
    for job_id in ("done", "broken", "running", "queued"):
        _add(store, job_id)
    store.mark_running("done", 2.0)
    store.finish("done", {"video_key": "k", "duration_s": 1.5}, 5.0)
    store.finish("broken", {"error": "invalid_audio: no", "code": "invalid_audio"}, 5.0)
    store.mark_running("running", 6.0)
    store.close()
    store = JobStore(path)
    assert store.recover(now=9.0) == ["running", "queued"]
    done = store.get("done")
    assert (done.status, done.result, done.started_at, done.finished_at) == ("completed", {"video_key": "k", "duration_s": 1.5}, 2.0, 5.0)
    assert store.get("broken").error_code == "invalid_audio"
    for job_id in ("running", "queued"):
        job = store.get(job_id)
        assert job.status == "failed" and job.error_code == "server_restarted" and job.finished_at == 9.0
        assert job.result["error"].startswith("server_restarted: ")
    assert store.mean_run_seconds("video") == 3.0
    store.close()
    with sqlite3.connect(path) as db:  # a plain sqlite3 reader sees the same rows
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 4


# ---------------------------------------------------------------------------- statuses and limits
@pytest.mark.parametrize(("code", "status"), [
    ("invalid_input", 422), ("unknown_task", 422), ("input_too_large", 413), ("input_forbidden", 400),
    ("input_not_found", 400), ("input_download_failed", 400), ("invalid_audio", 400), ("audio_too_long", 400),
    ("image_too_large", 400), ("out_of_memory", 500), ("checkpoint_missing", 500), ("server_restarted", 500),
    ("internal_error", 500), ("storage_failed", 500),
])
def test_http_status_of_each_code(code, status):
    assert http_status(code) == status


def test_body_limits_follow_the_worker_input_limits():
    limits = BodyLimits.from_inputs(InputLimits(max_image_bytes=3 * 2**20, max_audio_bytes=5 * 2**20,
                                                max_video_bytes=6 * 2**20))
    assert limits.for_path("/generate-video") == 9 * 2**20
    assert limits.for_path("/jobs") == 14 * 2**20 * 4 // 3 + 2**20 + 1
    assert limits.for_path("/generate/speech-to-video") == 2**20


# ---------------------------------------------------------------------------- the GPU queue
def test_queue_runs_jobs_one_at_a_time_in_order_and_survives_a_raising_worker(tmp_path):
    seen, running, overlap = [], [], []
    gate = threading.Event()

    def run(job):
        running.append(job["id"])
        if len(running) > 1:
            overlap.append(list(running))
        gate.wait(5)
        time.sleep(0.01)
        seen.append(job["input"]["n"])
        running.remove(job["id"])
        if job["input"]["n"] == 1:
            raise RuntimeError("boom")
        return {"n": job["input"]["n"]}

    store = JobStore(tmp_path / "jobs.sqlite3")
    q = GpuQueue(store, run, snapshot=lambda: {"resident": ["video"]})
    q.start()
    jobs = [q.submit(api="jobs", task="video", api_key="k", job_input={"n": n}, meta={}, max_unfinished=10)
            for n in range(4)]
    assert q.estimate_seconds(jobs[3]) == 4 * 300, "no history yet: the first estimate per job"
    gate.set()

    async def wait_all():
        return await asyncio.gather(*(q.wait(j.id) for j in jobs))

    done = asyncio.run(wait_all())
    assert seen == [0, 1, 2, 3] and not overlap
    assert [d.status for d in done] == ["completed", "failed", "completed", "completed"]
    assert done[1].error_code == "internal_error" and "RuntimeError: boom" in done[1].result["error"]
    for a, b in zip(done, done[1:]):
        assert a.finished_at <= b.started_at
    assert q.models_state == {"resident": ["video"]}
    q.stop()
    assert not q.alive
    store.close()
