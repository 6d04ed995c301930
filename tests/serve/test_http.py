"""``storystudio serve`` end to end: a real uvicorn server on loopback, the tiny checkpoints, CPU.

Every video is decoded back and probed. The tests run in file order: the last one
SIGKILLs the server and starts it again on the same database.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import signal
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from storystudio.media import probe_media
from tests.serve.conftest import AUDIO_SECONDS, FPS, KEY_ONE, KEY_TWO, LEGACY_KEY, Media, Server


def check_mp4(data: bytes, seconds: float = AUDIO_SECONDS, size: tuple[int, int] = (64, 64)) -> None:
    info = probe_media(data)
    assert info.video is not None and info.audio is not None, "MP4 needs a video and an audio stream"
    assert info.video.codec == "h264" and info.video.pix_fmt == "yuv420p"
    assert (info.video.width, info.video.height) == size
    assert info.video.frame_count == round(seconds * FPS)
    assert info.video.fps == pytest.approx(FPS, abs=0.01)
    assert info.audio.codec == "aac"
    assert abs(info.video.duration - seconds) <= 1 / FPS + 1e-3
    assert info.top_level_boxes.index("moov") < info.top_level_boxes.index("mdat"), "faststart"


def files(media: Media, **extra):
    return {"image": ("portrait.png", media.portrait, "image/png"),
            "audio": ("speech.wav", media.speech, "audio/wav"), **extra}


def fetch(server: Server, url: str, key: str = KEY_ONE) -> bytes:
    r = requests.get(url, headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


def wait_queue(server: Server, total: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(server.queue().values()) < total:
        assert time.monotonic() < deadline, f"queue never reached {total}: {server.queue()}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- public, auth, limits
def test_health_and_info_need_no_key(server):
    health = server.get("/health", key=None)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "warming": False, "device": "cpu", "queue": {"queued": 0, "running": 0}}
    info = server.get("/", key=None).json()
    assert info["auth"] is True and info["auth_header"] == "X-API-Key"
    assert info["models"] == ["Wan2.2-S2V-14B", "Z-Image-Turbo"] and info["version"]


@pytest.mark.parametrize(("method", "path"), [
    ("post", "/generate-video"), ("get", "/status/x"), ("post", "/generate/speech-to-video"),
    ("get", "/videos"), ("get", "/videos/a.mp4"), ("get", "/models"), ("post", "/jobs"), ("get", "/jobs/x"),
])
def test_missing_key_is_401_and_wrong_key_is_403(server, media, method, path):
    kw = {"files": files(media)} if path == "/generate-video" else {}
    missing = getattr(server, method)(path, key=None, **kw)
    assert missing.status_code == 401
    assert missing.json() == {"detail": "missing API key: send it in the X-API-Key header"}
    wrong = getattr(server, method)(path, key=KEY_ONE + "x", **kw)
    assert wrong.status_code == 403
    assert wrong.json() == {"detail": "invalid API key"}
    assert server.queue() == {"queued": 0, "running": 0}


def test_keys_from_both_variables_are_accepted(server):
    for key in (KEY_ONE, KEY_TWO, LEGACY_KEY):  # STORYSTUDIO_API_KEYS (two, with a blank) and WAN2_API_KEYS
        r = server.get("/models", key=key)
        assert r.status_code == 200, key
    models = {m["id"]: m for m in r.json()["models"]}
    assert models["wan2.2-s2v-14b"]["state"] == "resident" and models["wan2.2-s2v-14b"]["available"]
    assert models["z-image-turbo"]["state"] == "not loaded"


def test_uploads_over_the_worker_input_limits_are_413(server, media):
    big = b"\x89PNG" + b"\0" * (1024 * 1024 + 10)  # STORYSTUDIO_MAX_IMAGE_MB=1
    r = server.post("/generate-video", files=files(media, image=("big.png", big, "image/png")))
    assert r.status_code == 413
    assert r.json()["detail"] == f"input_too_large: image: the file is {len(big)} bytes, over the limit of 1048576 bytes"
    # a body over the route's limit is refused from its Content-Length, before it is read
    r = server.post("/generate/speech-to-video", data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"].startswith("input_too_large: the request body is")
    assert server.queue() == {"queued": 0, "running": 0}


def test_bad_requests_fail_fast_with_the_worker_codes(server, media):
    r = server.post("/generate-video", files=files(media), data={"resolution": "1080p"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_input"
    assert "resolution" in r.json()["detail"] and r.json()["detail"].startswith("invalid_input: ")
    r = server.post("/generate-video", files={"image": ("p.png", media.portrait, "image/png")})
    assert r.status_code == 422 and r.json()["detail"] == "invalid_input: audio: Field required"
    r = server.post("/jobs", json={"input": {"task": "paint"}})
    assert r.status_code == 422 and r.json()["code"] == "unknown_task"
    r = server.post("/jobs", json={"input": {"task": "video", "image": "x", "audio": "y", "steps": 0}})
    assert r.status_code == 422 and "steps" in r.json()["detail"]
    r = server.post("/generate/speech-to-video", json={"image_path": "portrait.png", "audio_path": "speech.wav",
                                                       "size": "1920*1080"})
    assert r.status_code == 422 and "max_area" in r.json()["detail"], "the worker's schema bounds the size"
    assert server.queue() == {"queued": 0, "running": 0}


def test_a_failing_job_answers_with_its_code(server, media):
    r = server.post("/generate-video", files=files(media, audio=("a.wav", b"certainly not audio" * 20, "audio/wav")))
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == "invalid_audio" and body["detail"].startswith("invalid_audio: ")
    status = server.get(f"/status/{body['job_id']}").json()
    assert status["status"] == "failed" and status["code"] == "invalid_audio"


# ---------------------------------------------------------------------------- two concurrent requests
@pytest.fixture(scope="module")
def pair(server, media):
    """A sync multipart upload and a sync speech-to-video request, sent while the first runs;
    then a third request from the same key, over its limit of two."""
    answers: dict[str, requests.Response] = {}

    def upload():
        answers["upload"] = server.post("/generate-video", key=KEY_ONE, files=files(media),
                                        data={"prompt": "a person talking", "resolution": "480p"})

    def speech():
        answers["speech"] = server.post("/generate/speech-to-video", key=KEY_ONE, json={
            "prompt": "a person talking", "image_path": "portrait.png", "audio_path": str(media.root / "speech.wav"),
            "size": "64*64", "frame_num": 13, "sample_steps": 1, "base_seed": 7})

    first = threading.Thread(target=upload)
    first.start()
    wait_queue(server, 1)
    second = threading.Thread(target=speech)
    second.start()
    wait_queue(server, 2)
    answers["third"] = server.post("/generate-video", key=KEY_ONE, files=files(media), data={"async": "true"})
    answers["other_key"] = server.get("/videos", key=KEY_TWO)
    first.join(600)
    second.join(600)
    return answers


def test_multipart_upload_returns_the_mp4_as_base64(server, pair):
    r = pair["upload"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["format"] == "mp4" and body["resolution"] == "480p" and body["status"] == "completed"
    video = base64.b64decode(body["video"], validate=True)
    check_mp4(video)
    assert body["duration"] == AUDIO_SECONDS and body["frames"] == 8
    assert fetch(server, body["video_url"]) == video, "the stored file is the one returned"


def test_speech_to_video_reads_paths_under_the_media_root(server, pair, media):
    r = pair["speech"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["resolution"] == "64*64" and body["seed"] == 7
    check_mp4(fetch(server, body["video_url"]))
    job = server.get(f"/jobs/{body['job_id']}").json()
    assert job["status"] == "COMPLETED" and job["api"] == "speech-to-video" and job["output"]["seed"] == 7
    hashes = job["input_hashes"]
    assert hashes["image"] == {"sha256": hashlib.sha256(media.portrait).hexdigest(), "bytes": len(media.portrait),
                               "of": "file"}
    assert hashes["audio"]["sha256"] == hashlib.sha256(media.speech).hexdigest()


def test_concurrent_requests_run_one_at_a_time_in_arrival_order(server, pair):
    a = server.get(f"/status/{pair['upload'].json()['job_id']}").json()
    b = server.get(f"/status/{pair['speech'].json()['job_id']}").json()
    assert a["created_at"] < b["created_at"]
    assert a["created_at"] <= a["started_at"] < a["finished_at"] <= b["started_at"] < b["finished_at"]


def test_per_key_concurrency_limit_is_429(pair):
    third = pair["third"]
    assert third.status_code == 429
    assert third.json()["detail"].startswith("too_many_jobs: this API key already has 2 unfinished job(s)")
    assert third.headers["Retry-After"] == "30"
    assert pair["other_key"].status_code == 200, "another key is not limited by this one's jobs"


# ---------------------------------------------------------------------------- async form, /videos, /jobs
@pytest.fixture(scope="module")
def async_job(server, media, pair):
    r = server.post("/generate-video", key=KEY_TWO, files=files(media), data={"async": "true", "resolution": "720p"})
    assert r.status_code == 200, r.text
    return r.json()


def test_async_form_answers_at_once_and_status_is_polled(server, async_job):
    assert set(async_job) == {"job_id", "status", "estimated_time"}
    assert async_job["status"] == "processing"
    assert isinstance(async_job["estimated_time"], int) and async_job["estimated_time"] > 0
    status = server.wait_status(async_job["job_id"])
    assert status["status"] == "completed", status
    assert status["resolution"] == "720p" and status["duration"] == AUDIO_SECONDS
    check_mp4(fetch(server, status["video_url"], key=KEY_TWO))


def test_videos_lists_the_results_and_serves_them(server, async_job):
    status = server.wait_status(async_job["job_id"])
    listed = server.get("/videos").json()
    names = [v["filename"] for v in listed["videos"]]
    assert status["filename"] in names and listed["count"] == len(names) >= 3
    assert all(n.endswith(".mp4") for n in names)
    one = next(v for v in listed["videos"] if v["filename"] == status["filename"])
    served = server.get(urlsplit(one["url"]).path)
    assert served.headers["content-type"] == "video/mp4" and len(served.content) == one["size"]


def test_jobs_takes_the_runpod_input_and_reads_it_back(server, media):
    image = "data:image/png;base64," + base64.b64encode(media.portrait).decode()
    job_input = {"task": "video", "image": image, "audio": base64.b64encode(media.speech).decode(),
                 "steps": 1, "max_area": 64 * 64, "infer_frames": 12, "seed": 3}
    r = server.post("/jobs", key=LEGACY_KEY, json={"input": job_input})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    assert r.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
    deadline = time.monotonic() + 600
    while (job := server.get(f"/jobs/{job_id}").json())["status"] in ("IN_QUEUE", "IN_PROGRESS"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "COMPLETED", job
    out = job["output"]
    assert out["seed"] == 3 and out["frames"] == 8 and out["task"] == "video"
    assert urlsplit(out["video_url"]).path == f"/videos/{out['video_key']}"
    check_mp4(fetch(server, out["video_url"]))
    assert job["input_hashes"]["image"] == {"sha256": hashlib.sha256(image.encode()).hexdigest(),
                                            "bytes": len(image), "of": "value"}


# ---------------------------------------------------------------------------- traversal
def raw_get(server: Server, path: str) -> tuple[int, str]:
    """A request whose path goes on the wire exactly as written (no client-side normalisation)."""
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path, headers={"X-API-Key": KEY_ONE})
    resp = conn.getresponse()
    return resp.status, resp.read().decode(errors="replace")


def test_videos_refuses_traversal(server, media, tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"secret video")
    output = server.env["STORYSTUDIO_OUTPUT_DIR"]
    link = f"{output}/escape.mp4"
    os.symlink(outside, link)
    try:
        for path in ("/videos/../../etc/passwd", "/videos/%2e%2e/%2e%2e/etc/passwd", "/videos/..%2f..%2fetc%2fpasswd",
                     f"/videos/{outside}", f"/videos//{outside}", "/videos/.serve/jobs.sqlite3",
                     "/videos/storystudio/../../secret.mp4", "/videos/storystudio\\..\\x.mp4", "/videos/a%00.mp4"):
            status, body = raw_get(server, path)
            assert status in (400, 404), (path, status, body)
            assert "secret video" not in body and "root:" not in body and "SQLite" not in body
        status, body = raw_get(server, "/videos/escape.mp4")
        assert status == 404 and "secret" not in body, "a symlink out of the folder is not followed"
    finally:
        os.unlink(link)


def test_image_path_outside_the_media_root_is_refused(server, media, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(media.portrait)
    link = media.root / "link.png"
    os.symlink(outside, link)
    try:
        for image_path in ("../" * 8 + "etc/passwd", "/etc/passwd", str(outside),
                           f"{media.root}/../{tmp_path.name}/outside.png", "link.png"):
            r = server.post("/generate/speech-to-video", json={"image_path": image_path, "audio_path": "speech.wav"})
            assert r.status_code == 400, (image_path, r.text)
            assert r.json()["code"] == "input_forbidden"
            assert r.json()["detail"].startswith("input_forbidden: image_path: ") and "outside the media root" in r.json()["detail"]
        r = server.post("/generate/speech-to-video", json={"image_path": "portrait.png", "audio_path": "missing.wav"})
        assert r.status_code == 400 and r.json()["code"] == "input_not_found"
    finally:
        os.unlink(link)
    assert server.queue() == {"queued": 0, "running": 0}


# ---------------------------------------------------------------------------- SIGKILL and restart (last)
def test_sigkill_and_restart_finished_jobs_survive_unfinished_ones_fail(server, media, pair, async_job):
    done_id = pair["upload"].json()["job_id"]
    before = server.get(f"/status/{done_id}").json()
    video_before = fetch(server, before["video_url"])
    # a job in flight when the process dies; this one asks for the async form by query
    r = server.post("/generate-video?async=true", key=KEY_TWO, files=files(media))
    assert r.status_code == 200 and r.json()["status"] == "processing"
    killed_id = r.json()["job_id"]
    server.wait_status(killed_id, until=("running", "completed", "failed"))

    server.kill()
    server.start()

    after = server.get(f"/status/{done_id}").json()
    assert after["status"] == "completed"
    for k in ("job_id", "duration", "resolution", "created_at", "started_at", "finished_at", "filename"):
        assert after[k] == before[k], k
    assert fetch(server, after["video_url"]) == video_before
    assert server.get(f"/jobs/{done_id}").json()["status"] == "COMPLETED"
    killed = server.get(f"/status/{killed_id}").json()
    assert killed["status"] == "failed" and killed["code"] == "server_restarted", killed
    assert "submit it again" in killed["error"]
    assert server.get(f"/jobs/{killed_id}").json()["code"] == "server_restarted"
    assert server.queue() == {"queued": 0, "running": 0}
    assert "marked 1 job(s) left unfinished" in server.log_text()


def test_sigterm_shuts_down_cleanly(server):
    server.proc.terminate()
    # uvicorn re-raises the signal it handled once it has shut down, so the status may say SIGTERM
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    log = server.log_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
