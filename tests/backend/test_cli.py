"""The ``storystudio`` CLI: in-process for the commands, subprocesses for real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storystudio.backend.cli import main

from .conftest import API_KEY, ENDPOINT
from .fake_runpod import JobPlan

REPO = Path(__file__).resolve().parents[2]

STORY = {"project_id": "story-1", "scenes": [
    {"scene_id": "s1", "prompt": "a fox", "audio": "https://x.example/s1.mp3"},
    {"scene_id": "s2", "prompt": "an owl", "audio": "https://x.example/s2.mp3"},
]}

FAST = ["--backoff-base", "0.001", "--backoff-max", "0.005", "--max-attempts", "3"]


@pytest.fixture
def env(monkeypatch, fake):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.delenv("RUNPOD_API_KEY_FILE", raising=False)
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", ENDPOINT)
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", fake.api_base)
    monkeypatch.setenv("RUNPOD_REST_BASE_URL", fake.rest_base)
    return fake


@pytest.fixture
def story_file(tmp_path) -> Path:
    path = tmp_path / "story.json"
    path.write_text(json.dumps(STORY))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([*argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_warm_get_set(env, capsys):
    rc, out, _ = run_cli(capsys, "warm", "get")
    assert rc == 0 and json.loads(out) == {"endpoint_id": ENDPOINT, "workersMin": 0}
    rc, out, _ = run_cli(capsys, "warm", "set", "2", "--endpoint", ENDPOINT, *FAST)
    assert rc == 0 and json.loads(out) == {"endpoint_id": ENDPOINT, "workersMin": 2, "previous": 0}
    assert env.workers_min() == 2
    rc, out, _ = run_cli(capsys, "warm", "set", "0")
    assert rc == 0 and env.workers_min() == 0


def test_warm_set_wait(env, capsys):
    env.health_ready_after = 2
    rc, out, _ = run_cli(capsys, "warm", "set", "1", "--wait", "--ready-poll", "0.001", "--ready-timeout", "5")
    assert rc == 0 and json.loads(out)["workers"]["idle"] == 1


def test_warm_set_wait_timeout_is_exit_1(env, capsys):
    env.health_never_ready = True
    rc, _, err = run_cli(capsys, "warm", "set", "1", "--wait", "--ready-poll", "0.001", "--ready-timeout", "0.02")
    assert rc == 1 and "workers_not_ready" in err


def test_warm_hold_for_a_while(env, capsys):
    rc, out, _ = run_cli(capsys, "warm", "hold", "1", "--for", "0.05")
    assert rc == 0 and json.loads(out)["restored"] is True
    assert env.workers_min_history[ENDPOINT] == [1, 0]


def test_health_status_cancel(env, capsys):
    rc, out, _ = run_cli(capsys, "health")
    health = json.loads(out)
    assert rc == 0 and set(health) == {"jobs", "workers", "warm_workers"}
    env.queue_plan(JobPlan(final="NEVER"))
    from storystudio.backend.client import RunPodClient

    job = RunPodClient(API_KEY, api_base=env.api_base, rest_base=env.rest_base).run(ENDPOINT, {"task": "batch"})
    rc, out, _ = run_cli(capsys, "status", job.id)
    assert rc == 0 and json.loads(out)["status"] == "IN_QUEUE"
    rc, out, _ = run_cli(capsys, "cancel", job.id)
    assert rc == 0 and json.loads(out) == {"id": job.id, "status": "CANCELLED"}
    rc, _, err = run_cli(capsys, "status", "no-such-job", *FAST)
    assert rc == 1 and "404" in err


def test_submit_prints_results(env, capsys, story_file):
    rc, out, err = run_cli(capsys, "submit", str(story_file), "--warm", "1", "--poll-interval", "0.002",
                           "--max-poll-interval", "0.01", *FAST)
    assert rc == 0, err
    result = json.loads(out)
    assert result["ok"] is True and [s["scene_id"] for s in result["scenes"]] == ["s1", "s2"]
    assert result["scenes"][0]["video_url"].endswith("s1.mp4")
    assert env.workers_min_history[ENDPOINT] == [1, 0]
    assert "IN_PROGRESS" in err  # progress lines in the log when stderr is not a terminal


def test_submit_from_stdin(env, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"input": {"task": "batch", **STORY}})))
    rc, out, _ = run_cli(capsys, "submit", "-", "--poll-interval", "0.002", "--max-poll-interval", "0.01")
    assert rc == 0 and json.loads(out)["project_id"] == "story-1"


def test_submit_partial_failure_is_exit_3(env, capsys, story_file):
    env.queue_plan(JobPlan(scene_errors={"s2": ("bad audio", "invalid_audio")}))
    rc, out, err = run_cli(capsys, "submit", str(story_file), "--poll-interval", "0.002", "--max-poll-interval", "0.01")
    assert rc == 3
    assert json.loads(out)["scenes"][1]["error"]["code"] == "invalid_audio"
    assert "s2 (invalid_audio)" in err


def test_submit_job_failed_is_exit_1_and_restores(env, capsys, story_file):
    env.queue_plan(JobPlan(output={"error": "out_of_memory: OOM", "code": "out_of_memory"}))
    rc, out, err = run_cli(capsys, "submit", str(story_file), "--warm", "2", "--poll-interval", "0.002",
                           "--max-poll-interval", "0.01")
    assert rc == 1 and out == "" and "out_of_memory" in err
    assert env.workers_min() == 0


def test_submit_timeout_cancels(env, capsys, story_file):
    env.queue_plan(JobPlan(final="NEVER"))
    rc, _, err = run_cli(capsys, "submit", str(story_file), "--warm", "1", "--timeout", "0.1",
                         "--poll-interval", "0.002", "--max-poll-interval", "0.01")
    assert rc == 1 and "job_timeout" in err
    assert list(env.job_statuses().values()) == ["CANCELLED"] and env.workers_min() == 0


def test_restore_failure_is_exit_4(env, capsys, story_file):
    def on_request(record):
        if record["method"] == "POST" and record["path"].endswith("/run"):
            env.add_fault("PATCH", f"/v1/endpoints/{ENDPOINT}", 500, times=100)

    env.on_request = on_request
    rc, _, err = run_cli(capsys, "submit", str(story_file), "--warm", "1", "--poll-interval", "0.002",
                         "--max-poll-interval", "0.01", *FAST)
    assert rc == 4 and f"storystudio warm set 0 --endpoint {ENDPOINT}" in err


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"project_id": "p", "scenes": [{"audio": "a"}]}), "a scene needs either 'prompt'"),
])
def test_bad_story_is_exit_2_without_requests(env, capsys, tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    rc, _, err = run_cli(capsys, "submit", str(path), "--warm", "1")
    assert rc == 2 and match in err and env.requests == []


def test_missing_key_and_endpoint(env, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RUNPOD_API_KEY")
    rc, _, err = run_cli(capsys, "health")
    assert rc == 2 and "RUNPOD_API_KEY" in err
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY)
    key_file.chmod(0o600)
    rc, _, _ = run_cli(capsys, "health", "--api-key-file", str(key_file))
    assert rc == 0
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.delenv("RUNPOD_ENDPOINT_ID")
    with pytest.raises(SystemExit) as info:
        main(["health"])
    assert info.value.code == 2


def test_wrong_key_is_exit_1(env, capsys, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_wrong")
    rc, _, err = run_cli(capsys, "warm", "get")
    assert rc == 1 and "auth_failed" in err


def test_verbose_output_never_has_the_key(env, capsys, story_file):
    env.add_fault("GET", f"/v1/endpoints/{ENDPOINT}", 503, times=1, body={"error": f"echo {API_KEY}"})
    rc, out, err = run_cli(capsys, "submit", str(story_file), "-v", "--warm", "1", "--poll-interval", "0.002",
                           "--max-poll-interval", "0.01", *FAST)
    assert rc == 0 and "DEBUG" in err
    assert API_KEY not in out and API_KEY not in err


# --------------------------------------------------------------------------- real signals


def _spawn(fake, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "RUNPOD_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    env.pop("RUNPOD_API_KEY_FILE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "storystudio.backend", *argv, "--endpoint", ENDPOINT,
         "--api-base", fake.api_base, "--rest-base", fake.rest_base, *FAST],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_submit_cancels_job_and_restores(fake, story_file, sig, code):
    fake.queue_plan(JobPlan(final="NEVER"))
    proc = _spawn(fake, "submit", str(story_file), "--warm", "2", "--timeout", "120",
                  "--poll-interval", "0.01", "--max-poll-interval", "0.05")
    try:
        _wait_for(lambda: fake.workers_min() == 2 and "IN_PROGRESS" in fake.job_statuses().values())
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert fake.workers_min() == 0 and fake.workers_min_history[ENDPOINT] == [2, 0]
    assert list(fake.job_statuses().values()) == ["CANCELLED"]
    assert out == "" and API_KEY not in err


def test_sigterm_to_warm_hold_restores(fake):
    proc = _spawn(fake, "warm", "hold", "1")
    try:
        _wait_for(lambda: fake.workers_min() == 1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert fake.workers_min_history[ENDPOINT] == [1, 0]


# --------------------------------------------------------------------------- local media, --download


def test_submit_uploads_local_media_and_downloads_results(env, capsys, tmp_path, s3_server, monkeypatch):
    from .test_studio import STORY as RESUME_STORY, _media, _plan, _publish

    prefix = f"cli-{time.monotonic_ns()}/"
    for name, value in {"STORYSTUDIO_S3_ENDPOINT_URL": s3_server.endpoint_url, "STORYSTUDIO_S3_BUCKET": s3_server.bucket,
                        "STORYSTUDIO_S3_ACCESS_KEY_ID": s3_server.access_key,
                        "STORYSTUDIO_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
                        "STORYSTUDIO_S3_PREFIX": prefix}.items():
        monkeypatch.setenv(name, value)
    media = _media(tmp_path)
    env.queue_plan(_plan(media, _publish(s3_server, prefix, media)))
    (tmp_path / "s1.wav").write_bytes(b"RIFF local narration")
    story = json.loads(json.dumps(RESUME_STORY))
    story["scenes"][0]["audio"] = "s1.wav"
    path = tmp_path / "story.json"
    path.write_text(json.dumps(story))
    out = tmp_path / "out"
    argv = ["submit", str(path), "--download", str(out), "--input-url-ttl", "7200", "--poll-interval", "0.002",
            "--max-poll-interval", "0.01"]
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["download_dir"] == str(out.resolve())
    assert result["scenes"][0]["image_path"] == str(out.resolve() / "s1.png")
    assert (out / "s1.png").read_bytes() == media["s1.png"] and (out / "s2.mp4").read_bytes() == media["s2.mp4"]
    sent = next(iter(env.jobs.values())).body["input"]["scenes"][0]["audio"]
    assert "X-Amz-Expires=7200" in sent and requests_get(sent) == b"RIFF local narration"
    assert "uploaded input s1.wav" in err
    assert "scene s1: done" in err and "scene s2: done" in err  # per-scene lines when stderr is no terminal
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0 and "not rendered again" in err and len(env.jobs) == 1
    assert json.loads(stdout)["scenes"][1]["video_path"] == str(out.resolve() / "s2.mp4")


def requests_get(url: str) -> bytes:
    import requests

    return requests.get(url, timeout=10).content


def test_submit_missing_local_file_or_too_large_is_exit_2(env, capsys, tmp_path, monkeypatch):
    for name in ("STORYSTUDIO_S3_BUCKET", "STORYSTUDIO_S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    story = {"project_id": "p", "scenes": [{"prompt": "x", "audio": "narration/s1.wav"}]}
    path = tmp_path / "story.json"
    path.write_text(json.dumps(story))
    rc, _, err = run_cli(capsys, "submit", str(path), "--warm", "1")
    assert rc == 2 and "scenes[0].audio: local file not found" in err and env.requests == []
    (tmp_path / "narration").mkdir()
    (tmp_path / "narration" / "s1.wav").write_bytes(os.urandom(7_600_000))
    rc, _, err = run_cli(capsys, "submit", str(path), "--warm", "1")
    assert rc == 2 and "over RunPod's limit of 10,000,000 bytes (10 MB) for /run" in err and env.requests == []
