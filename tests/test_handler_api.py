"""The real handler through RunPod's local test API (``handler.py --rp_serve_api``), end to end.

A worker process runs on tiny synthetic checkpoints (CPU), takes inputs from an HTTP
server on 127.0.0.1 and uploads results to a real SeaweedFS S3 server. Every result
is read back: objects through boto3, URLs through HTTP, media decoded and measured.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import wave
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
from PIL import Image

from tests.process_ready import wait_until_ready

from storystudio.media import decode_video_frames, encode_audio, encode_png, probe_media, synth_speech

ROOT = Path(__file__).resolve().parent.parent
FPS = 16
# Tiny settings: every video costs seconds, not minutes, on 2 CPU cores.
VIDEO = {"max_area": 64 * 64, "steps": 2, "infer_frames": 16}
IMAGE = {"width": 256, "height": 256, "steps": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Files(BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes, str]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        item = self.files.get(self.path)
        if item is None:
            self.send_error(404, "not found")
            return
        body, ctype = item
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_server() -> Iterator[str]:
    rng = np.random.default_rng(0)
    portrait = Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8))
    _Files.files = {
        "/portrait.png": (encode_png(portrait), "image/png"),
        "/speech-1.5s.mp3": (encode_audio(synth_speech(1.5, seed=1), "mp3"), "audio/mpeg"),
        "/speech-1s.wav": (encode_audio(synth_speech(1.0, seed=2), "wav"), "audio/wav"),
        "/speech-1s.m4a": (encode_audio(synth_speech(1.0, seed=3), "m4a"), "audio/mp4"),
        "/empty.wav": (_empty_wav(), "audio/wav"),
        "/not-an-image.png": (b"<html>certainly not a PNG</html>" * 10, "image/png"),
        "/huge.png": (b"\x89PNG" + b"\x00" * (2 * 1024 * 1024), "image/png"),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _empty_wav() -> bytes:
    """A well-formed WAV file with zero samples: decodable, but nothing to speak."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    return buf.getvalue()


@contextlib.contextmanager
def local_api(env: dict, log: Path, *, startup_s: float) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python handler.py --rp_serve_api`` on a free port, output appended to ``log``; yields
    ``(process, url)`` once its API answers (the test fails with the log's tail if it exits or is
    late) and stops the process on exit (terminate, then kill), whatever state it is in."""
    port = _free_port()
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, lambda: requests.get(f"{url}/docs", timeout=2).status_code < 500, what="worker",
                     timeout=startup_s, interval=0.5, log_tail=log.read_text)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def worker_api(tiny_models, s3_server, tmp_path_factory) -> Iterator[str]:
    zdir, wdir = tiny_models
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **os.environ,
        "STORYSTUDIO_ZIMAGE_DIR": str(zdir),
        "STORYSTUDIO_WAN_DIR": str(wdir),
        "STORYSTUDIO_DEVICE": "cpu",
        "STORYSTUDIO_ALLOW_NETWORKS": "127.0.0.0/8",
        "STORYSTUDIO_MAX_IMAGE_MB": "1",
        "STORYSTUDIO_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "STORYSTUDIO_S3_BUCKET": s3_server.bucket,
        "STORYSTUDIO_S3_ACCESS_KEY_ID": s3_server.access_key,
        "STORYSTUDIO_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "STORYSTUDIO_S3_PREFIX": "e2e/",
        "PYTHONUNBUFFERED": "1",
    }
    with local_api(env, log, startup_s=120) as (_, url):
        yield url


def runsync(api: str, job_input: dict, timeout: float = 600) -> dict:
    r = requests.post(f"{api}/runsync", json={"input": job_input}, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def s3(s3_server):
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )


def _get_object(s3, s3_server, key: str) -> bytes:
    return s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()


def _check_video(data: bytes, audio_seconds: float) -> None:
    info = probe_media(data)
    assert info.video is not None and info.audio is not None, "MP4 needs a video and an audio stream"
    assert info.video.codec == "h264" and info.video.pix_fmt == "yuv420p"
    assert info.video.frame_count == round(audio_seconds * FPS)
    assert info.video.fps == pytest.approx(FPS, abs=0.01)
    assert info.audio.codec == "aac"
    assert abs(info.audio.duration - info.video.duration) <= 1 / FPS + 1e-3
    assert abs(info.video.duration - audio_seconds) <= 1 / FPS + 1e-3
    assert info.top_level_boxes.index("moov") < info.top_level_boxes.index("mdat"), "faststart"


def test_image_job(worker_api, s3, s3_server):
    body = runsync(worker_api, {"task": "image", "prompt": "a fox", **IMAGE, "height": 320, "seed": 5, "return_base64": True})
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    assert out["seed"] == 5 and (out["width"], out["height"]) == (256, 320)
    assert out["image_key"].startswith("e2e/") and out["image_key"].endswith(".png")
    stored = _get_object(s3, s3_server, out["image_key"])
    fetched = requests.get(out["image_url"], timeout=10)
    assert fetched.status_code == 200 and fetched.content == stored
    assert base64.b64decode(out["image_base64"]) == stored
    assert Image.open(io.BytesIO(stored)).size == (256, 320)
    assert "image" in out["manager"]["resident"] and out["timings"]["generate"] > 0
    _check_generation_time(out)


def _check_generation_time(out: dict) -> None:
    """The first spec's ``generation_time``: this job's media work, the sum of its timings."""
    assert out["generation_time"] == pytest.approx(sum(out["timings"].values()), abs=0.002)
    assert 0 < out["generation_time"] <= out["total_time"]


@pytest.fixture(scope="module")
def video_job(worker_api, media_server) -> dict:
    """One video job in today's spelling, shared by the tests that compare against it."""
    return runsync(
        worker_api,
        {
            "task": "video",
            "image": f"{media_server}/portrait.png",
            "audio": f"{media_server}/speech-1.5s.mp3",
            "prompt": "a person talking",
            **VIDEO,
            "seed": 3,
        },
    )


def test_video_job(video_job, s3, s3_server):
    body = video_job
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    assert out["frames"] == 24 and out["fps"] == FPS and out["seed"] == 3
    data = _get_object(s3, s3_server, out["video_key"])
    assert requests.get(out["video_url"], timeout=10).content == data
    _check_video(data, 1.5)
    _check_generation_time(out)
    assert out["resolution"] == "custom", "max_area overrides the 480p default"


def test_video_job_in_first_spec_spelling_renders_the_same_video(worker_api, media_server, video_job, s3, s3_server):
    """``image_url``, ``audio_url`` and ``sample_steps`` drive the same render as today's names.

    Same seed and settings as ``video_job``, so the frames must match; had ``sample_steps``
    been dropped, the default 40 steps would give other frames.
    """
    first_spec = {k: v for k, v in VIDEO.items() if k != "steps"} | {"sample_steps": VIDEO["steps"]}
    body = runsync(
        worker_api,
        {
            "task": "video",
            "image_url": f"{media_server}/portrait.png",
            "audio_url": f"{media_server}/speech-1.5s.mp3",
            "prompt": "a person talking",
            **first_spec,
            "seed": 3,
        },
    )
    assert body["status"] == "COMPLETED", body
    out, ref = body["output"], video_job["output"]
    assert (out["frames"], out["width"], out["height"], out["seed"]) == (ref["frames"], ref["width"], ref["height"], 3)
    data = _get_object(s3, s3_server, out["video_key"])
    _check_video(data, 1.5)
    ours = decode_video_frames(data, fps=FPS).astype(np.int16)
    theirs = decode_video_frames(_get_object(s3, s3_server, ref["video_key"]), fps=FPS).astype(np.int16)
    assert ours.shape == theirs.shape
    # Not bit-exact: CPU float noise flips a few H.264 decisions on these noise-like frames.
    # Measured on the tiny checkpoint: a repeat differs by 0.03 levels on average, 3 or 40
    # steps instead of 2 by about 21.
    diff = np.abs(ours - theirs)
    assert diff.mean() < 1.0, f"mean {diff.mean():.3f}, max {diff.max()}, >8: {(diff > 8).mean():.4f}"
    _check_generation_time(out)
    assert out["resolution"] == "custom"


def test_batch_job_reports_failing_scene_and_completes_others(worker_api, media_server, s3, s3_server):
    scenes = [
        {"scene_id": "intro", "prompt": "a lighthouse", "audio": f"{media_server}/speech-1s.wav"},
        {"scene_id": "given", "image": f"{media_server}/portrait.png", "audio": f"{media_server}/speech-1s.m4a",
         "video_prompt": "the keeper talks"},
        {"scene_id": "broken", "prompt": "a storm", "audio": f"{media_server}/missing.mp3"},
    ]
    body = runsync(
        worker_api,
        {"task": "batch", "project_id": "../Story One", "scenes": scenes, "image": IMAGE, "video": VIDEO, "seed": 11},
    )
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    by_id = {s["scene_id"]: s for s in out["scenes"]}
    assert [s["scene_id"] for s in out["scenes"]] == ["intro", "given", "broken"]
    assert [s["id"] for s in out["scenes"]] == ["intro", "given", "broken"], "the first spec's scene id"
    assert out["scenes_ok"] == 2 and out["scenes_failed"] == 1
    broken = by_id["broken"]
    assert broken["error"]["code"] == "input_download_failed" and broken["error"]["stage"] == "audio"
    assert "404" in broken["error"]["error"]
    assert "image_url" in broken, "the broken scene's image was still rendered"
    for sid in ("intro", "given"):
        scene = by_id[sid]
        assert "error" not in scene, scene
        assert ".." not in scene["video_key"] and " " not in scene["video_key"]
        _check_video(_get_object(s3, s3_server, scene["video_key"]), 1.0)
    assert by_id["intro"]["image_source"] == "generated" and by_id["given"]["image_source"] == "input"
    png = _get_object(s3, s3_server, by_id["intro"]["image_key"])
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    for key in ("images_time", "swap_time", "videos_time", "total_time"):
        assert out[key] >= 0
    assert out["total_time"] >= out["images_time"] + out["videos_time"]
    assert set(out["manager"]["resident"]) == {"image", "video"}


def test_batch_job_in_first_spec_spelling(worker_api, media_server, s3, s3_server):
    """A story as the first spec spelled it: scene ``id``/``audio_url``/``image_url``,
    ``image_settings`` and ``video_settings`` (with ``sample_steps``)."""
    scenes = [
        {"id": "one", "prompt": "a lighthouse", "audio_url": f"{media_server}/speech-1s.wav"},
        # image_url is fetched as the scene's image: a 404 there fails this scene at its image stage
        {"id": "two", "image_url": f"{media_server}/nope.png", "audio_url": f"{media_server}/speech-1s.m4a"},
    ]
    video = {k: v for k, v in VIDEO.items() if k != "steps"} | {"sample_steps": VIDEO["steps"]}
    body = runsync(
        worker_api,
        {"task": "batch", "project_id": "first-spec", "scenes": scenes, "seed": 4,
         "image_settings": {**IMAGE, "height": 272}, "video_settings": video},
    )
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    assert [(s["id"], s["scene_id"]) for s in out["scenes"]] == [("one", "one"), ("two", "two")]
    one, two = out["scenes"]
    assert "error" not in one, one
    assert Image.open(io.BytesIO(_get_object(s3, s3_server, one["image_key"]))).size == (256, 272)  # image_settings
    assert one["width"] * one["height"] <= VIDEO["max_area"]  # video_settings (the default is 480p)
    _check_video(_get_object(s3, s3_server, one["video_key"]), 1.0)  # audio_url
    assert two["error"]["code"] == "input_download_failed" and two["error"]["stage"] == "image"
    assert "scenes[1].image" in two["error"]["error"] and "404" in two["error"]["error"]
    assert (out["scenes_ok"], out["scenes_failed"]) == (1, 1)


@pytest.mark.parametrize(
    ("job", "fragment"),
    [
        ({"task": "video", "image": "{media}/portrait.png", "image_url": "{media}/portrait.png",
          "audio": "{media}/speech-1s.wav"}, "both 'image' and 'image_url' given; use one"),
        ({"task": "video", "image": "{media}/portrait.png", "audio": "{media}/speech-1s.wav",
          "audio_url": "{media}/speech-1s.wav"}, "both 'audio' and 'audio_url' given; use one"),
        ({"task": "video", "image_url": "{media}/portrait.png", "audio_url": "{media}/speech-1s.wav",
          "steps": 2, "sample_steps": 2}, "both 'steps' and 'sample_steps' given; use one"),
        ({"task": "batch", "project_id": "p", "scenes": [{"id": "a", "scene_id": "a", "prompt": "x", "audio": "a"}]},
         "scenes.0: both 'scene_id' and 'id' given; use one"),
        ({"task": "batch", "project_id": "p", "scenes": [{"image": "i", "image_url": "i", "audio": "a"}]},
         "scenes.0: both 'image' and 'image_url' given; use one"),
        ({"task": "batch", "project_id": "p", "scenes": [{"prompt": "x", "audio": "a", "audio_url": "a"}]},
         "scenes.0: both 'audio' and 'audio_url' given; use one"),
        ({"task": "batch", "project_id": "p", "scenes": [{"prompt": "x", "audio": "a"}], "image": {}, "image_settings": {}},
         "both 'image' and 'image_settings' given; use one"),
        ({"task": "batch", "project_id": "p", "scenes": [{"prompt": "x", "audio": "a"}], "video": {}, "video_settings": {}},
         "both 'video' and 'video_settings' given; use one"),
        ({"task": "batch", "project_id": "p", "scenes": [{"prompt": "x", "audio": "a"}],
          "video_settings": {"steps": 2, "sample_steps": 2}}, "video: both 'steps' and 'sample_steps' given; use one"),
        # the aliases obey today's limits, and unknown fields are still rejected next to them
        ({"task": "video", "image_url": "i", "audio_url": "a", "sample_steps": 0},
         "steps: Input should be greater than or equal to 1"),
        ({"task": "batch", "project_id": "p", "scenes": [{"prompt": "x", "audio_url": "a"}],
          "video_settings": {"sample_steps": 0}}, "video.steps: Input should be greater than or equal to 1"),
        ({"task": "video", "image_url": "i", "audio_url": "a", "sample_stepz": 2}, "sample_stepz: unknown field"),
        ({"task": "image", "prompt": "x", "sample_steps": 2}, "sample_steps: unknown field"),
    ],
)
def test_first_spec_conflicts_and_limits_fail_with_invalid_input(worker_api, media_server, job, fragment):
    job = json.loads(json.dumps(job).replace("{media}", media_server))
    body = runsync(worker_api, job, timeout=60)
    assert body["status"] == "FAILED", body
    assert body["error"].startswith(f"invalid_input: invalid {job['task']} input: "), body["error"]
    assert fragment in body["error"], body["error"]


@pytest.mark.parametrize(
    ("job", "code", "fragment"),
    [
        ({"task": "image", "prompt": "x", "width": 100000}, "invalid_input", "width"),
        ({"task": "image", "prompt": "x", "steps": -2}, "invalid_input", "steps"),
        ({"task": "paint", "prompt": "x"}, "unknown_task", "paint"),
        ({"task": "video", "image": "{media}/portrait.png"}, "invalid_input", "audio: Field required"),
        ({"task": "video", "image": "htp://nowhere/x.png", "audio": "{media}/speech-1s.wav"}, "input_forbidden", "scheme"),
        ({"task": "video", "image": "{media}/nope.png", "audio": "{media}/speech-1s.wav"}, "input_download_failed", "404"),
        ({"task": "video", "image": "{media}/huge.png", "audio": "{media}/speech-1s.wav"}, "input_too_large", "image"),
        ({"task": "video", "image": "{media}/not-an-image.png", "audio": "{media}/speech-1s.wav"}, "invalid_image", ""),
        ({"task": "video", "image": "{media}/portrait.png", "audio": "{media}/empty.wav"}, "empty_audio", ""),
        ({"task": "video", "image": "http://10.20.30.40/x.png", "audio": "{media}/speech-1s.wav"}, "input_forbidden", "10.20.30.40"),
        ({"task": "video", "image": "http://169.254.169.254/latest/meta-data", "audio": "{media}/speech-1s.wav"},
         "input_forbidden", "169.254.169.254"),
    ],
)
def test_bad_input_fails_job_with_code_and_worker_survives(worker_api, media_server, job, code, fragment):
    job = {k: v.replace("{media}", media_server) if isinstance(v, str) else v for k, v in job.items()}
    body = runsync(worker_api, job, timeout=120)
    assert body["status"] == "FAILED", body
    assert body["error"].startswith(f"{code}: "), body["error"]
    assert fragment in body["error"]
    # still serving
    assert requests.get(f"{worker_api}/docs", timeout=5).status_code == 200
