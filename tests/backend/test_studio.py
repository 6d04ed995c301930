"""StoryStudio against the fake RunPod API and the SeaweedFS S3 server: local media uploaded
once and deduplicated, inlined only under RunPod's size limit, results written to disk
and resumed, and one story end to end through the real Worker on tiny checkpoints."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from storystudio.backend.client import RUN_PAYLOAD_LIMIT_BYTES, RUNSYNC_PAYLOAD_LIMIT_BYTES
from storystudio.backend.downloads import MANIFEST_NAME
from storystudio.backend.errors import ConfigError, DownloadFailed, LocalMediaError, PayloadTooLarge
from storystudio.backend.scene_progress import DONE, VIDEO
from storystudio.backend.studio import StoryStudio
from storystudio.backend.submit import submit_story
from storystudio.inputs import InputLimits, fetch_bytes
from storystudio.media import encode_audio, encode_mp4, encode_png, probe_media, synth_speech
from storystudio.storage import StorageSettings

from .conftest import ENDPOINT, FAST_POLL, make_client
from .fake_runpod import JobPlan

FPS = 16
TINY_IMAGE = {"width": 256, "height": 256, "steps": 2}
TINY_VIDEO = {"max_area": 64 * 64, "steps": 2, "infer_frames": 16}
LOOPBACK = InputLimits(allow_networks=("127.0.0.0/8",))  # the worker's setting for the local S3 server


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def bucket(s3_server) -> StorageSettings:
    """The test bucket under a prefix of its own, so object counts are this test's."""
    return StorageSettings(bucket=s3_server.bucket, endpoint_url=s3_server.endpoint_url,
                           access_key_id=s3_server.access_key, secret_access_key=s3_server.secret_key,
                           prefix=f"client-{uuid.uuid4().hex[:8]}/")


def objects(s3_server, prefix: str) -> dict[str, tuple[str, object, int]]:
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"], o["Size"]) for o in listing.get("Contents", [])}


class S3Calls:
    """Counts the S3 operations a StoryStudio's uploader makes (botocore events)."""

    def __init__(self, studio: StoryStudio) -> None:
        self.ops: list[str] = []
        studio.uploader.client.meta.events.register("before-call.s3", self._record)

    def _record(self, model, **kwargs) -> None:
        self.ops.append(model.name)

    def count(self, op: str) -> int:
        return self.ops.count(op)


def studio_for(fake, storage: StorageSettings, **kw) -> StoryStudio:
    return StoryStudio(ENDPOINT, client=make_client(fake), storage=storage, **kw)


def sent_input(fake, job_id: str) -> dict:
    return fake.jobs[job_id].body["input"]


def write_story(folder: Path, story: dict) -> Path:
    path = folder / "story.json"
    path.write_text(json.dumps(story))
    return path


# --------------------------------------------------------------------------- uploads


def test_local_files_are_uploaded_once_then_deduplicated(fake, bucket, s3_server, tmp_path):
    (tmp_path / "narration").mkdir()
    one, two, face = os.urandom(3000), os.urandom(5000), encode_png(np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "narration" / "s1.wav").write_bytes(one)
    (tmp_path / "narration" / "s2.wav").write_bytes(two)
    (tmp_path / "face.png").write_bytes(face)
    story_file = write_story(tmp_path, {"project_id": "dedupe", "scenes": [
        {"scene_id": "s1", "prompt": "a fox", "audio": "narration/s1.wav"},
        {"scene_id": "s2", "image": str(tmp_path / "face.png"), "audio": (tmp_path / "narration" / "s2.wav").as_uri()},
        {"scene_id": "s3", "prompt": "the fox again", "audio": "./narration/s1.wav"},  # same file: one object
    ]})

    with studio_for(fake, bucket) as studio:
        calls = S3Calls(studio)
        result = studio.run_story(story_file, poll=FAST_POLL, timeout=30)
    assert result.ok
    assert calls.count("PutObject") == 3 and calls.count("HeadObject") == 3
    stored = objects(s3_server, bucket.prefix)
    expected_keys = {f"{bucket.prefix}inputs/sha256/{sha(one)}.wav", f"{bucket.prefix}inputs/sha256/{sha(two)}.wav",
                     f"{bucket.prefix}inputs/sha256/{sha(face)}.png"}
    assert set(stored) == expected_keys
    s3 = s3_server.client()
    head = s3.head_object(Bucket=s3_server.bucket, Key=f"{bucket.prefix}inputs/sha256/{sha(face)}.png")
    assert head["ContentType"] == "image/png"

    scenes = sent_input(fake, result.job_id)["scenes"]
    assert scenes[0]["audio"] == scenes[2]["audio"]
    for scene, data in ((scenes[0], one), (scenes[1], two)):
        url = scene["audio"]
        parts = urlsplit(url)
        assert url.startswith(s3_server.endpoint_url) and parts.path.endswith(f"/inputs/sha256/{sha(data)}.wav")
        assert parse_qs(parts.query)["X-Amz-Expires"] == ["86400"]  # default lifetime: 24 h
        assert requests.get(url, timeout=10).content == data
        # the worker's own fetcher (address checks on, loopback allowed as in the e2e tests) gets it too
        assert fetch_bytes(url, kind="audio", limits=LOOPBACK, field="scenes[0].audio") == data
    assert fetch_bytes(scenes[1]["image"], kind="image", limits=LOOPBACK) == face

    # a second run of the same story, from a fresh client: nothing is uploaded again
    with studio_for(fake, bucket, input_url_seconds=3600 * 48) as studio:
        calls = S3Calls(studio)
        again = studio.run_story(story_file, poll=FAST_POLL, timeout=30)
    assert again.ok and again.job_id != result.job_id
    assert calls.count("PutObject") == 0 and calls.count("HeadObject") == 3
    assert objects(s3_server, bucket.prefix) == stored, "same objects, same ETags, not rewritten"
    url = sent_input(fake, again.job_id)["scenes"][0]["audio"]
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == [str(3600 * 48)]
    assert requests.get(url, timeout=10).content == one


def test_input_urls_must_outlive_the_wait(fake, bucket, tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF....")
    story = {"project_id": "p", "scenes": [{"prompt": "x", "audio": "a.wav"}]}
    with studio_for(fake, bucket, input_url_seconds=600) as studio, pytest.raises(ConfigError) as info:
        studio.run_story(story, base_dir=tmp_path, timeout=3600)
    assert "expire after 600s" in str(info.value) and fake.requests == []


def test_submit_story_refuses_local_files(fake, tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF....")
    with make_client(fake) as client, pytest.raises(LocalMediaError, match=r"scenes\[0\].audio"):
        submit_story(client, ENDPOINT, {"project_id": "p", "scenes": [{"prompt": "x", "audio": str(tmp_path / "a.wav")}]})
    assert fake.requests == []


# --------------------------------------------------------------------------- inline


def test_without_a_bucket_small_files_are_inlined_as_data_uris(fake, tmp_path):
    wav = encode_audio(synth_speech(0.5, seed=3), "wav")
    (tmp_path / "line.wav").write_bytes(wav)
    story = {"project_id": "inline", "scenes": [{"scene_id": "s1", "prompt": "x", "audio": "line.wav"}]}
    with studio_for(fake, StorageSettings()) as studio:
        result = studio.run_story(story, base_dir=tmp_path, poll=FAST_POLL, timeout=30)
    assert result.ok
    uri = sent_input(fake, result.job_id)["scenes"][0]["audio"]
    assert uri.startswith("data:audio/x-wav;base64,") or uri.startswith("data:audio/wav;base64,")
    assert fetch_bytes(uri, kind="audio", limits=InputLimits()) == wav  # what the worker will decode


def test_oversize_inline_is_refused_with_limit_and_size(fake, tmp_path):
    for name in ("a.wav", "b.wav"):
        (tmp_path / name).write_bytes(os.urandom(4_000_000))  # 8 MB -> ~10.7 MB of base64
    story = {"project_id": "big", "scenes": [{"prompt": "x", "audio": "a.wav"}, {"prompt": "y", "audio": "b.wav"}]}
    with studio_for(fake, StorageSettings()) as studio:
        with pytest.raises(PayloadTooLarge) as info:
            studio.run_story(story, base_dir=tmp_path, warm=1, timeout=30)
        err = info.value
        assert (err.code, err.limit, err.route) == ("payload_too_large", RUN_PAYLOAD_LIMIT_BYTES, "run")
        assert RUN_PAYLOAD_LIMIT_BYTES < err.size < RUNSYNC_PAYLOAD_LIMIT_BYTES
        assert f"{err.size:,} bytes" in err.message and "10,000,000 bytes (10 MB) for /run" in err.message
        assert "2 local file(s) of 8,000,000 bytes were inlined" in err.message
        assert "STORYSTUDIO_S3_BUCKET" in err.message
        assert fake.requests == [], "refused before workersMin or /run is touched"
        # the same input fits /runsync's 20 MB
        prepared = studio.prepare(story, base_dir=tmp_path, route="runsync")
        assert prepared.inlined and prepared.body_bytes == err.size - len(',"policy":{"executionTimeout":30000}')


def test_the_fake_refuses_what_runpod_refuses(fake):
    """Without the client's check, RunPod (here the fake) would answer 413."""
    body = json.dumps({"input": {"task": "batch", "blob": "x" * RUN_PAYLOAD_LIMIT_BYTES}})
    r = requests.post(f"{fake.api_base}/{ENDPOINT}/run", data=body, timeout=30,
                      headers={"Authorization": f"Bearer {fake.api_key}", "Content-Type": "application/json"})
    assert r.status_code == 413


# --------------------------------------------------------------------------- downloads


def _media(tmp_path: Path) -> dict[str, bytes]:
    png = encode_png((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    frames = (np.random.default_rng(1).random((16, 32, 32, 3)) * 255).astype(np.uint8)
    mp4 = encode_mp4(frames, FPS, synth_speech(1.0, seed=1), tmp_path / "src.mp4").read_bytes()
    frames2 = (np.random.default_rng(2).random((8, 32, 32, 3)) * 255).astype(np.uint8)
    mp4b = encode_mp4(frames2, FPS, None, tmp_path / "src2.mp4").read_bytes()
    return {"s1.png": png, "s1.mp4": mp4, "s2.mp4": mp4b}


def _publish(s3_server, prefix: str, media: dict[str, bytes]) -> dict[str, str]:
    s3 = s3_server.client()
    urls = {}
    for name, data in media.items():
        key = f"{prefix}results/{name}"
        s3.put_object(Bucket=s3_server.bucket, Key=key, Body=data)
        urls[name] = s3.generate_presigned_url("get_object", Params={"Bucket": s3_server.bucket, "Key": key},
                                               ExpiresIn=3600)
    return urls


def _plan(media: dict[str, bytes], urls: dict[str, str], *, bad_hash: bool = False) -> JobPlan:
    def h(name: str) -> str:
        return "0" * 64 if bad_hash and name == "s2.mp4" else sha(media[name])

    return JobPlan(output={"project_id": "resume", "job_id": "x", "task": "batch", "scenes": [
        {"scene_id": "s1", "image_source": "generated", "image_url": urls["s1.png"], "image_bytes": len(media["s1.png"]),
         "image_sha256": h("s1.png"), "video_url": urls["s1.mp4"], "bytes": len(media["s1.mp4"]), "sha256": h("s1.mp4")},
        {"scene_id": "s2", "image_source": "input", "video_url": urls["s2.mp4"], "bytes": len(media["s2.mp4"]),
         "sha256": h("s2.mp4")}]})


STORY = {"project_id": "resume", "scenes": [{"scene_id": "s1", "prompt": "x", "audio": "https://x.example/a.mp3"},
                                           {"scene_id": "s2", "image": "https://x.example/i.png",
                                            "audio": "https://x.example/b.mp3"}]}


def test_download_resumes_keeping_complete_files(fake, bucket, s3_server, tmp_path):
    media = _media(tmp_path)
    urls = _publish(s3_server, bucket.prefix, media)
    out = tmp_path / "out"
    out.mkdir()
    (out / "s1.png").write_bytes(media["s1.png"])  # complete from an earlier run
    (out / "s1.mp4").write_bytes(media["s1.mp4"][: len(media["s1.mp4"]) // 2])  # cut off mid-download
    kept = os.stat(out / "s1.png")
    fake.queue_plan(_plan(media, urls))
    saved = []
    with studio_for(fake, StorageSettings()) as studio:
        result = studio.run_story(STORY, download=out, poll=FAST_POLL, timeout=30, on_download=saved.append)
    assert result.ok and result.download_dir == out.resolve()
    assert {(s.file.name, s.skipped) for s in saved} == {("s1.png", True), ("s1.mp4", False), ("s2.mp4", False)}
    now = os.stat(out / "s1.png")
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns), "a complete file is not rewritten"
    for name, data in media.items():
        assert (out / name).read_bytes() == data
    assert not (out / "s2.png").exists(), "a given image is not a result"
    assert Image.open(out / "s1.png").size == (48, 40)
    info = probe_media(out / "s1.mp4")
    assert info.video.frame_count == 16 and info.audio.codec == "aac"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "s1.mp4", "s1.png", "s2.mp4"], "no .part left"
    s1 = result.scene("s1")
    assert (s1.image_path, s1.video_path) == (out.resolve() / "s1.png", out.resolve() / "s1.mp4")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["job_id"] == result.job_id and manifest["ok"] is True
    assert all(f["complete"] for f in manifest["files"].values()) and len(manifest["files"]) == 3
    assert manifest["result"]["scenes"][1]["video_path"] == str(out.resolve() / "s2.mp4")

    # again, the same story: not rendered again; one damaged file fetched, the others kept
    (out / "s2.mp4").write_bytes(media["s2.mp4"][:-10] + b"0123456789")  # same size, other bytes
    kept = {n: os.stat(out / n).st_ino for n in ("s1.png", "s1.mp4")}
    runs = len(fake.calls("POST", rf"/v2/{ENDPOINT}/run"))
    saved.clear()
    with studio_for(fake, StorageSettings()) as studio:
        again = studio.run_story(STORY, download=out, poll=FAST_POLL, timeout=30, on_download=saved.append)
    assert len(fake.calls("POST", rf"/v2/{ENDPOINT}/run")) == runs, "an unchanged, finished story is not rerun"
    assert again.job_id == result.job_id
    assert [s.file.name for s in saved if not s.skipped] == ["s2.mp4"], "the hash caught the damaged file"
    assert {n: os.stat(out / n).st_ino for n in kept} == kept
    assert (out / "s2.mp4").read_bytes() == media["s2.mp4"]

    # --rerun: rendered again (a new job) even though the folder holds the result
    fake.queue_plan(_plan(media, urls))
    with studio_for(fake, StorageSettings()) as studio:
        third = studio.run_story(STORY, download=out, rerun=True, poll=FAST_POLL, timeout=30)
    assert third.job_id != result.job_id and len(fake.calls("POST", rf"/v2/{ENDPOINT}/run")) == runs + 1


def test_download_refuses_a_file_that_does_not_match_its_hash(fake, bucket, s3_server, tmp_path):
    media = _media(tmp_path)
    fake.queue_plan(_plan(media, _publish(s3_server, bucket.prefix, media), bad_hash=True))
    out = tmp_path / "out"
    with studio_for(fake, StorageSettings()) as studio, pytest.raises(DownloadFailed) as info:
        studio.run_story(STORY, download=out, poll=FAST_POLL, timeout=30)
    assert info.value.code == "download_failed" and "s2 video" in info.value.message
    assert "differs from the worker's" in info.value.message
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "s1.mp4", "s1.png"]
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert files["s2.mp4"]["complete"] is False and files["s1.mp4"]["complete"] is True


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e_settings(tiny_models, s3_server):
    """Settings of the production Worker on tiny checkpoints, storing results in SeaweedFS and
    fetching inputs with the address checks on (loopback allowed, as tests/test_handler_api.py does)."""
    from storystudio.config import WorkerSettings

    zdir, wdir = tiny_models
    env = {"STORYSTUDIO_DEVICE": "cpu", "STORYSTUDIO_ALLOW_NETWORKS": "127.0.0.0/8",
           "STORYSTUDIO_S3_ENDPOINT_URL": s3_server.endpoint_url, "STORYSTUDIO_S3_BUCKET": s3_server.bucket,
           "STORYSTUDIO_S3_ACCESS_KEY_ID": s3_server.access_key,
           "STORYSTUDIO_S3_SECRET_ACCESS_KEY": s3_server.secret_key, "STORYSTUDIO_S3_PREFIX": "e2e-client/"}
    settings = replace(WorkerSettings.from_env(env), zimage_dir=zdir, wan_dir=wdir)
    return settings


def test_story_end_to_end_through_the_real_worker(fake, e2e_settings, bucket, s3_server, tmp_path):
    from storystudio.worker import Worker

    fake.start_workers(lambda sink: Worker.from_settings(e2e_settings, sink=sink).handle, count=1)
    story_dir = tmp_path / "story"
    story_dir.mkdir()
    (story_dir / "s1.wav").write_bytes(encode_audio(synth_speech(1.0, seed=1), "wav"))
    (story_dir / "s2.mp3").write_bytes(encode_audio(synth_speech(1.5, seed=2), "mp3"))
    portrait = (np.random.default_rng(5).random((96, 64, 3)) * 255).astype(np.uint8)
    (story_dir / "portrait.png").write_bytes(encode_png(portrait))
    encode_mp4((np.random.default_rng(6).random((16, 48, 40, 3)) * 255).astype(np.uint8), FPS, None,
               story_dir / "pose.mp4")
    story_file = write_story(story_dir, {"project_id": "e2e", "seed": 3, "image": TINY_IMAGE, "video": TINY_VIDEO,
                                         "scenes": [
        {"scene_id": "s1", "prompt": "a lighthouse keeper", "audio": "s1.wav"},
        {"scene_id": "s2", "image": "portrait.png", "audio": "s2.mp3", "pose_video": "pose.mp4",
         "video_prompt": "the keeper talks"}]})
    updates = []
    out = tmp_path / "out"
    with studio_for(fake, bucket) as studio:
        calls = S3Calls(studio)
        result = studio.run_story(story_file, warm=1, download=out, poll=FAST_POLL, timeout=600,
                                  on_progress=updates.append)
    assert result.ok, [s.error for s in result.scenes]
    assert calls.count("PutObject") == 4
    sent = sent_input(fake, result.job_id)["scenes"]
    assert all(sent[1][k].startswith(s3_server.endpoint_url) and "X-Amz-Signature=" in sent[1][k]
               for k in ("image", "audio", "pose_video"))
    assert result.scene("s2").extra["image_source"] == "input"  # the worker fetched the presigned image
    assert fake.workers_min_history[ENDPOINT] == [1, 0]

    # per-scene progress came from the worker's own updates
    assert any(u.status == "IN_PROGRESS" and any(s.state == VIDEO for s in u.scenes) for u in updates)
    assert [s.state for s in updates[-1].scenes] == [DONE, DONE] and updates[-1].status == "COMPLETED"

    # the files on disk: decoded and measured
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "s1.mp4", "s1.png", "s2.mp4"]
    assert Image.open(out / "s1.png").size == (256, 256)
    for name, seconds in (("s1.mp4", 1.0), ("s2.mp4", 1.5)):
        info = probe_media(out / name)
        assert info.video.frame_count == round(seconds * FPS) and info.audio.codec == "aac"
        scene = result.scene(name[:2])
        data = (out / name).read_bytes()
        assert (scene.extra["bytes"], scene.extra["sha256"]) == (len(data), sha(data))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["files"]["s1.png"]["sha256"] == sha((out / "s1.png").read_bytes())

    # run it again: nothing uploaded, rendered or downloaded
    inodes = {p.name: p.stat().st_ino for p in out.iterdir() if p.name != MANIFEST_NAME}
    with studio_for(fake, bucket) as studio:
        calls = S3Calls(studio)
        again = studio.run_story(story_file, warm=1, download=out, poll=FAST_POLL, timeout=600)
    assert again.job_id == result.job_id and len(fake.jobs) == 1 and calls.ops == []
    assert {p.name: p.stat().st_ino for p in out.iterdir() if p.name != MANIFEST_NAME} == inodes


def test_the_readme_example_runs(s3_server, bucket, tmp_path, monkeypatch, capsys):
    """The README's Python API example, run as written against the fake API."""
    from .conftest import API_KEY
    from .fake_runpod import FakeRunPod

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Python API"):]
    code = section[section.index("```python\n") + 10: section.index("\n```", section.index("```python"))]
    app = tmp_path / "app"
    for rel in ("tts/s1.wav", "tts/s2.wav", "refs/cat.png"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_bytes(os.urandom(2000))
    code = code.replace("/srv/app/stories/lighthouse", str(app)).replace('"out/lighthouse"', repr(str(tmp_path / "out")))
    media = _media(tmp_path)
    urls = _publish(s3_server, bucket.prefix, media)
    with FakeRunPod(API_KEY, endpoint_id="abc123xyz") as fake:
        plan = _plan(media, urls)
        plan.output["project_id"] = "lighthouse"
        fake.queue_plan(plan)
        monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
        monkeypatch.delenv("RUNPOD_API_KEY_FILE", raising=False)
        monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", fake.api_base)
        monkeypatch.setenv("RUNPOD_REST_BASE_URL", fake.rest_base)
        for name in ("STORYSTUDIO_S3_BUCKET", "STORYSTUDIO_S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        exec(compile(code, "README.md", "exec"), {})
        assert fake.workers_min_history["abc123xyz"] == [1, 0]
        sent = next(iter(fake.jobs.values())).body["input"]
    assert sent["scenes"][1]["image"].startswith("data:image/png;base64,")
    printed = capsys.readouterr().out
    assert f"s1 {tmp_path / 'out' / 's1.png'} {tmp_path / 'out' / 's1.mp4'}" in printed
    assert "COMPLETED s1: done, s2: done" in printed


def test_single_jobs_local_media_and_result_hash(fake, e2e_settings, bucket, s3_server, tmp_path):
    """A single video job's image/audio may be local too (``prepare``, then send); a single
    image job's result carries the size and SHA-256 of its PNG (real worker, cheap job)."""
    from storystudio.worker import Worker

    (tmp_path / "face.png").write_bytes(encode_png(np.full((32, 32, 3), 200, np.uint8)))
    (tmp_path / "line.wav").write_bytes(encode_audio(synth_speech(0.5, seed=1), "wav"))
    with studio_for(fake, bucket) as studio:
        prepared = studio.prepare({"task": "video", "image": "face.png", "audio": "line.wav"},
                                  base_dir=tmp_path, batch_only=False, route="runsync")
        assert not prepared.inlined and [u.uploaded for u in prepared.uploads] == [True, True]
        job = prepared.story.job_input
        assert fetch_bytes(job["image"], kind="image", limits=LOOPBACK) == (tmp_path / "face.png").read_bytes()
        assert fetch_bytes(job["audio"], kind="audio", limits=LOOPBACK) == (tmp_path / "line.wav").read_bytes()

        fake.start_workers(lambda sink: Worker.from_settings(e2e_settings, sink=sink).handle, count=1)
        submitted = studio.client.run(ENDPOINT, {"task": "image", "prompt": "a fox", **TINY_IMAGE, "seed": 4})
        done = studio.client.wait_for_job(ENDPOINT, submitted.id, timeout=600, poll=FAST_POLL)
    assert done.status == "COMPLETED", done
    png = requests.get(done.output["image_url"], timeout=10).content
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    assert (done.output["bytes"], done.output["sha256"]) == (len(png), sha(png))


def test_results_of_a_worker_with_local_storage_are_copied(tmp_path):
    """A worker writing to a shared disk reports file paths as URLs; they are copied."""
    from storystudio.backend.downloads import download_story
    from storystudio.backend.results import SceneResult, StoryResult

    src = tmp_path / "worker-out" / "s1.png"
    src.parent.mkdir()
    data = encode_png(np.zeros((8, 8, 3), np.uint8))
    src.write_bytes(data)
    result = StoryResult("p", [SceneResult("s1", image_url=str(src), extra={"image_bytes": len(data),
                                                                            "image_sha256": sha(data)})])
    out = download_story(result, tmp_path / "out")
    assert out.scenes[0].image_path.read_bytes() == data and out.scenes[0].video_path is None
