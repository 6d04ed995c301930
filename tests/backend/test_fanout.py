"""``submit --workers N``: a story fanned out over several workers of the fake RunPod API.

The fake runs K real workers (threads, each its own ``Worker`` with its own ModelManager on
the tiny checkpoints, results in the SeaweedFS bucket, so a video job fetches the image
the images job stored). Checked: the images run as one ``images_only`` batch job; the
video jobs of different scenes overlap in time on different workers; a scene whose worker
is killed is resubmitted and completes; seeds and prompts match the batch rules; the
result has the batch shape; ``workersMin`` is restored after success, failure and Ctrl-C.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from storystudio.backend.cli import main
from storystudio.backend.errors import RunPodAPIError
from storystudio.backend.fanout import FanOut, fan_out_story, images_input, video_input
from storystudio.config import WorkerSettings
from storystudio.media import encode_audio, encode_png, probe_media, synth_speech
from storystudio.tasks import BatchTask, parse_job_input
from storystudio.worker import Worker

from .conftest import API_KEY, ENDPOINT, make_client
from .fake_runpod import FakeRunPod

FAST_POLL_ARGS = ["--poll-interval", "0.05", "--max-poll-interval", "0.2"]


def _audio(seed: int) -> str:
    return "data:audio/wav;base64," + base64.b64encode(encode_audio(synth_speech(0.75, seed=seed), "wav")).decode()


def _png() -> str:
    rng = np.random.RandomState(3)
    return base64.b64encode(encode_png(Image.fromarray((rng.rand(80, 64, 3) * 255).astype(np.uint8)))).decode()


def story(n: int = 3, project_id: str = "fan-1") -> dict:
    scenes = [{"scene_id": f"s{i + 1}", "prompt": f"a lighthouse, view {i}", "audio": _audio(i),
               "video_prompt": f"the keeper says line {i}"} for i in range(n)]
    if n >= 3:
        scenes[2] = {"scene_id": "s3", "image": _png(), "audio": _audio(2)}  # a given image: no image job work
    return {"project_id": project_id, "seed": 40, "scenes": scenes,
            "image": {"width": 256, "height": 256, "steps": 1},
            "video": {"max_area": 64 * 64, "steps": 1, "infer_frames": 16}}


@pytest.fixture(scope="module")
def fleet(tiny_models, s3_server) -> Iterator[FakeRunPod]:
    """The fake API with two real workers sharing the bucket."""
    zdir, wdir = tiny_models
    settings = WorkerSettings.from_env({
        "STORYSTUDIO_DEVICE": "cpu", "STORYSTUDIO_ZIMAGE_DIR": str(zdir), "STORYSTUDIO_WAN_DIR": str(wdir),
        "STORYSTUDIO_ALLOW_NETWORKS": "127.0.0.0/8",
        "STORYSTUDIO_S3_ENDPOINT_URL": s3_server.endpoint_url, "STORYSTUDIO_S3_BUCKET": s3_server.bucket,
        "STORYSTUDIO_S3_ACCESS_KEY_ID": s3_server.access_key,
        "STORYSTUDIO_S3_SECRET_ACCESS_KEY": s3_server.secret_key, "STORYSTUDIO_S3_PREFIX": "fanout/",
    })
    load_lock = threading.Lock()

    def new_worker(sink):
        # Loading builds modules on the meta device through accelerate's init_empty_weights,
        # a process-wide patch: real workers are separate processes, these threads load one
        # at a time (a replacement worker loads while the others only generate).
        worker = Worker.from_settings(replace(settings), sink=sink)
        with load_lock:
            worker.manager.ensure("image")
            worker.manager.ensure("video")
        return worker.handle

    with FakeRunPod(API_KEY, endpoint_id=ENDPOINT, workers_max=3) as server:
        server.start_workers(new_worker, count=2)
        yield server


@pytest.fixture
def fresh(fleet: FakeRunPod) -> FakeRunPod:
    with fleet.lock:
        fleet.jobs.clear()
        fleet.executions.clear()
        fleet.kill_rules.clear()
        fleet.faults.clear()
        fleet.requests.clear()
        fleet.workers_min_history[ENDPOINT] = []
        fleet.endpoints[ENDPOINT]["workersMin"] = 0
    return fleet


def _videos(fake: FakeRunPod) -> list:
    return [e for e in fake.executions if e.task == "video"]


def _overlap(a, b) -> float:
    return min(a.end, b.end) - max(a.start, b.start)


def test_fanout_cli_renders_a_story_over_two_workers_in_parallel(fresh, s3_server, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.delenv("RUNPOD_API_KEY_FILE", raising=False)
    path = tmp_path / "story.json"
    path.write_text(json.dumps(story(3)))
    rc = main(["submit", str(path), "--workers", "2", "--endpoint", ENDPOINT, "--api-base", fresh.api_base,
               "--rest-base", fresh.rest_base, "--timeout", "900", *FAST_POLL_ARGS, "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert fresh.workers_min_history[ENDPOINT] == [2, 0], "raised to N for the story, then restored"

    # one images job (the two prompted scenes), then one video job per scene
    batches = [j for j in fresh.jobs.values() if j.body["input"]["task"] == "batch"]
    assert len(batches) == 1 and batches[0].body["input"]["images_only"] is True
    videos = _videos(fresh)
    assert sorted(fresh.jobs[e.job_id].body["input"]["prompt"] for e in videos) == [
        "", "the keeper says line 0", "the keeper says line 1"]
    # N-way concurrency: two video jobs ran at the same time on different workers
    assert any(_overlap(a, b) > 0 and a.worker != b.worker for a in videos for b in videos if a is not b), \
        [(e.worker, e.start, e.end) for e in videos]

    # the batch result shape, per scene the image and the video
    assert out["ok"] and [s["scene_id"] for s in out["scenes"]] == ["s1", "s2", "s3"]
    assert [s["id"] for s in out["scenes"]] == ["s1", "s2", "s3"], "a batch job's scene id (first spec)"
    for key in ("images_time", "videos_time", "total_time", "swap_time"):
        assert isinstance(out[key], float)
    assert out["fanout"]["workers"] == 2 and out["fanout"]["attempts"] == {"s1": 1, "s2": 1, "s3": 1}
    s1, s2, s3 = out["scenes"]
    assert s1["image_source"] == "generated" and s3["image_source"] == "input" and "image_url" not in s3
    assert (s1["image_seed"], s2["image_seed"]) == (40, 41)
    assert (s1["video_seed"], s2["video_seed"], s3["video_seed"]) == (40, 41, 42), "batch seed + index"
    s3c = s3_server.client()
    for scene in out["scenes"]:
        assert scene["frames"] == 12 and scene["video_job_id"] in fresh.jobs
        data = s3c.get_object(Bucket=s3_server.bucket, Key=scene["video_key"])["Body"].read()
        info = probe_media(data)
        assert info.video.frame_count == 12 and info.audio is not None
    # the video job of a generated scene read the image the images job stored
    image_job_scene = next(e for e in videos if fresh.jobs[e.job_id].body["input"]["seed"] == 40)
    assert fresh.jobs[image_job_scene.job_id].body["input"]["image"] == s1["image_url"]
    assert s3c.get_object(Bucket=s3_server.bucket, Key=s1["image_key"])["Body"].read()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", ["failed", "lost"])
def test_fanout_retries_a_scene_whose_worker_was_killed(fresh, mode):
    fresh.kill_when(lambda inp: inp.get("task") == "video" and inp.get("seed") == 41, mode=mode)
    with make_client(fresh) as client:
        result = fan_out_story(client, ENDPOINT, story(2, f"fan-kill-{mode}"), workers=2, timeout=900,
                               poll=_poll())
    assert result.ok, [s.error for s in result.scenes]
    s2 = result.scene("s2")
    assert result.extra["fanout"]["attempts"] == {"s1": 1, "s2": 2}
    first, second = result.extra["fanout"]["video_jobs"]["s2"]
    killed = [e for e in fresh.executions if e.outcome == "killed"]
    assert [e.job_id for e in killed] == [first], "the first attempt died with its worker"
    assert s2.extra["video_job_id"] == second and fresh.jobs[second].status == "COMPLETED"
    if mode == "lost":
        assert first not in fresh.jobs  # RunPod forgot it: /status answered 404
    else:
        assert fresh.jobs[first].status == "FAILED"
    assert fresh.workers_min_history[ENDPOINT] == [2, 0]


def test_fanout_input_error_is_final_for_its_scene_and_others_complete(fresh):
    bad = story(2, "fan-bad")
    bad["scenes"][1]["audio"] = "data:audio/wav;base64," + base64.b64encode(b"not a wav file at all").decode()
    with make_client(fresh) as client:
        result = fan_out_story(client, ENDPOINT, bad, workers=2, timeout=900, poll=_poll())
    assert result.scene("s1").ok
    err = result.scene("s2").error
    assert err.code == "invalid_audio" and err.stage == "video"
    assert result.extra["fanout"]["attempts"]["s2"] == 1, "the worker's verdict on the input is not retried"
    assert result.extra["scenes_failed"] == 1 and fresh.workers_min_history[ENDPOINT] == [2, 0]


def test_fanout_restores_workers_min_when_the_api_fails(fresh):
    fresh.add_fault("POST", r"/v2/[^/]+/run", status=400, times=10)
    with make_client(fresh) as client, pytest.raises(RunPodAPIError) as info:
        fan_out_story(client, ENDPOINT, story(2, "fan-api"), workers=3, timeout=60, poll=_poll())
    assert info.value.status == 400
    assert fresh.workers_min_history[ENDPOINT] == [3, 0] and fresh.workers_min() == 0


def test_fanout_restores_workers_min_and_cancels_jobs_on_ctrl_c(fresh):
    """A real SIGINT while the first video job runs: KeyboardInterrupt, jobs cancelled, workersMin back."""

    def press_ctrl_c_when_a_video_runs() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if _videos(fresh):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    threading.Thread(target=press_ctrl_c_when_a_video_runs, daemon=True).start()
    with make_client(fresh) as client, pytest.raises(KeyboardInterrupt):
        fan_out_story(client, ENDPOINT, story(3, "fan-ctrl-c"), workers=2, timeout=900, poll=_poll())
    assert fresh.workers_min_history[ENDPOINT] == [2, 0] and fresh.workers_min() == 0
    videos = [j for j in fresh.jobs.values() if j.body["input"]["task"] == "video"]
    assert videos and all(j.status == "CANCELLED" for j in videos), [j.status for j in videos]


def test_fanout_images_only_batch_renders_images_and_fetches_nothing_else(tiny_models, tmp_path):
    """The images job: audio and given images are not even downloaded (unreachable here)."""
    from storystudio.storage import StorageSettings

    zdir, wdir = tiny_models
    settings = replace(WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}), zimage_dir=zdir, wan_dir=wdir,
                       storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(tmp_path)}))
    events: list[dict] = []
    worker = Worker.from_settings(settings, sink=lambda job, event: events.append(event))
    r = worker.handle({"id": "imgs", "input": {
        "task": "batch", "project_id": "p", "images_only": True, "seed": 9,
        "image": {"width": 256, "height": 256, "steps": 1},
        "scenes": [{"scene_id": "a", "prompt": "a cat", "audio": "https://unreachable.invalid/a.mp3"},
                   {"scene_id": "b", "image": "https://unreachable.invalid/b.png",
                    "audio": "https://unreachable.invalid/b.mp3"}]}})
    assert r["scenes_ok"] == 2 and r["scenes_failed"] == 0, r
    a, b = r["scenes"]
    assert a["image_source"] == "generated" and a["image_seed"] == 9 and "video_url" not in a
    assert Image.open(a["image_url"]).size == (256, 256)
    assert b == {"scene_id": "b", "id": "b", "image_source": "input"}
    assert r["swap_time"] == 0 and r["manager"]["resident"] == ["image"], "Wan never loaded"
    assert {e["stage"] for e in events} == {"images"}


def test_fanout_job_inputs_follow_the_batch_rules():
    task = parse_job_input({"task": "batch", **story(3, "rules")})
    assert isinstance(task, BatchTask)
    images = images_input(task)
    assert images["images_only"] is True and [s["scene_id"] for s in images["scenes"]] == ["s1", "s2", "s3"]
    assert isinstance(parse_job_input(images), BatchTask)  # the worker accepts it
    v = video_input(task, 1, "https://bucket.example/s2.png")
    assert v == {"task": "video", "image": "https://bucket.example/s2.png", "audio": task.scenes[1].audio,
                 "prompt": "the keeper says line 1", "max_area": 4096, "steps": 1, "infer_frames": 16, "seed": 41}
    given = video_input(task, 2, task.scenes[2].image)
    assert given["prompt"] == "" and given["seed"] == 42
    all_given = parse_job_input({"task": "batch", "project_id": "g", "scenes": [{"image": _png(), "audio": _audio(0)}]})
    assert images_input(all_given) is None, "nothing to generate: no images job"
    posed = parse_job_input({"task": "batch", "project_id": "p", "scenes": [
        {"prompt": "x", "audio": "https://x.example/a.mp3", "pose_video": "https://x.example/pose.mp4"}]})
    assert video_input(posed, 0, "https://bucket.example/s1.png")["pose_video"] == "https://x.example/pose.mp4"


def test_fanout_rejects_bad_worker_counts(fake):
    with make_client(fake) as client:
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ValueError, match="workers must be an int >= 1"):
                FanOut(client, ENDPOINT, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_attempts"):
            FanOut(client, ENDPOINT, 2, max_attempts=0)
    assert fake.requests == [], "nothing is sent for a bad call"


def _poll():
    from storystudio.backend.client import PollSettings

    return PollSettings(initial=0.05, maximum=0.2, factor=1.5)

