"""A story survives its worker being killed: the real handler (``handler.py --rp_serve_api``) on tiny
checkpoints, results in a real SeaweedFS S3 bucket. A 3-scene batch is submitted, the process is
SIGKILLed once the first scene's video is in the manifest, a new process is started, and the same
batch is submitted with ``resume``: the scenes finished before the kill are reused, the rest rendered."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import boto3
import requests
from PIL import Image

from storystudio.media import encode_audio, probe_media, synth_speech
from tests.test_handler_api import FPS, IMAGE, VIDEO, local_api

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "resume-e2e/"


def _wav(seconds: float, seed: int) -> str:
    return "data:audio/wav;base64," + base64.b64encode(encode_audio(synth_speech(seconds, seed=seed), "wav")).decode()


def test_sigkilled_batch_is_resumed_reusing_the_finished_scenes(tiny_models, s3_server, tmp_path):
    zdir, wdir = tiny_models
    env = {
        **os.environ,
        "STORYSTUDIO_ZIMAGE_DIR": str(zdir), "STORYSTUDIO_WAN_DIR": str(wdir), "STORYSTUDIO_DEVICE": "cpu",
        "STORYSTUDIO_S3_ENDPOINT_URL": s3_server.endpoint_url, "STORYSTUDIO_S3_BUCKET": s3_server.bucket,
        "STORYSTUDIO_S3_ACCESS_KEY_ID": s3_server.access_key,
        "STORYSTUDIO_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "STORYSTUDIO_S3_PREFIX": PREFIX, "PYTHONUNBUFFERED": "1",
    }
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
    manifest_key = f"{PREFIX}crash-story/resume/manifest.json"

    def manifest() -> dict | None:
        try:
            return json.loads(s3.get_object(Bucket=s3_server.bucket, Key=manifest_key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            return None

    # Later scenes are longer, so the kill lands while one of them is in flight.
    job = {"task": "batch", "project_id": "crash-story", "resume": True, "seed": 3, "image": IMAGE, "video": VIDEO,
           "scenes": [{"scene_id": "s1", "prompt": "a lighthouse", "audio": _wav(1.0, 1)},
                      {"scene_id": "s2", "prompt": "a harbour", "audio": _wav(3.0, 2)},
                      {"scene_id": "s3", "prompt": "a storm", "audio": _wav(3.0, 3)}]}
    log = tmp_path / "worker.log"
    with local_api(env, log, startup_s=180) as (proc, url):
        def submit() -> None:  # the caller's request dies with the worker
            try:
                requests.post(f"{url}/runsync", json={"input": job}, timeout=900)
            except requests.ConnectionError:
                pass

        threading.Thread(target=submit, daemon=True).start()
        limit = time.monotonic() + 600
        while True:
            m = manifest()
            if m and "video" in m["scenes"].get("s1", {}):
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < limit, "scene s1 never finished:\n" + log.read_text()[-3000:]
            time.sleep(0.05)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    at_kill = manifest()
    assert at_kill is not None
    finished = {sid for sid, parts in at_kill["scenes"].items() if "video" in parts}
    assert "s1" in finished and finished != {"s1", "s2", "s3"}, f"the kill did not land mid-batch: {finished}"

    with local_api(env, log, startup_s=180) as (_, url):
        body = requests.post(f"{url}/runsync", json={"input": job}, timeout=900).json()
    assert body["status"] == "COMPLETED", body
    out = body["output"]
    assert out["scenes_ok"] == 3 and out["scenes_failed"] == 0, out
    by_id = {s["scene_id"]: s for s in out["scenes"]}
    assert {sid for sid, s in by_id.items() if s["reused"]} == finished
    assert out["scenes_reused"] == len(finished)
    assert all(s["image_reused"] for s in by_id.values()), "every image was stored before the kill"
    assert "image" not in out["manager"]["load_seconds"], "no image was rendered again: Z-Image never loaded"
    for sid, seconds in (("s1", 1.0), ("s2", 3.0), ("s3", 3.0)):
        s = by_id[sid]
        video = s3.get_object(Bucket=s3_server.bucket, Key=s["video_key"])["Body"].read()
        info = probe_media(video)
        assert info.video.frame_count == round(seconds * FPS) and info.audio is not None
        assert requests.get(s["video_url"], timeout=30).content == video, "the fresh presigned URL serves the file"
        png = s3.get_object(Bucket=s3_server.bucket, Key=s["image_key"])["Body"].read()
        assert Image.open(io.BytesIO(png)).size == (IMAGE["width"], IMAGE["height"])
    final = manifest()
    assert all(sorted(parts) == ["image", "video"] for parts in final["scenes"].values())
