"""submit_story end to end against the fake: results, failures, and always-restored workersMin."""

from __future__ import annotations

import json

import pytest

from storystudio.backend.client import JobStatus, RetryPolicy
from storystudio.backend.errors import JobFailed, JobTimeout, RequestTimeout
from storystudio.backend.submit import ProgressUpdate, interpret_final, parse_progress, submit_story

from .conftest import ENDPOINT, FAST_POLL, make_client
from .fake_runpod import JobPlan

STORY = {"project_id": "story-1", "seed": 100, "scenes": [
    {"scene_id": "s1", "prompt": "a fox in a forest", "audio": "https://x.example/s1.mp3"},
    {"scene_id": "s2", "prompt": "a fox at night", "audio": "https://x.example/s2.mp3",
     "video_prompt": "the fox talks"},
]}


def _submit(client, **kw):
    kw.setdefault("timeout", 5)
    kw.setdefault("poll", FAST_POLL)
    return submit_story(client, ENDPOINT, STORY, **kw)


def test_happy_path_returns_typed_results_and_progress(fake, client):
    updates: list[ProgressUpdate] = []
    result = _submit(client, on_progress=updates.append)
    assert result.ok and [s.scene_id for s in result.scenes] == ["s1", "s2"]
    assert result.scene("s2").video_url == "https://cdn.example/story-1/s2.mp4"
    assert result.scene("s1").image_seed == 100 and result.scene("s2").video_seed == 101
    assert result.job_id in fake.jobs
    body = fake.jobs[result.job_id].body
    assert body["policy"] == {"executionTimeout": 10_000}  # max(timeout, 10 s), RunPod needs > 5 s
    assert body["input"]["scenes"][1]["video_prompt"] == "the fox talks"
    stages = [u.stage for u in updates if u.status == "IN_PROGRESS"]
    assert stages == ["images", "swap", "video_clips", "videos"]
    assert updates[0].status == "IN_QUEUE" and updates[-1].status == "COMPLETED"
    assert fake.calls("PATCH") == []  # no warm requested: workersMin untouched


def test_explicit_execution_timeout_and_none(fake, client):
    r1 = _submit(client, execution_timeout=1800)
    assert fake.jobs[r1.job_id].body["policy"] == {"executionTimeout": 1_800_000}
    r2 = _submit(client, execution_timeout=None)
    assert "policy" not in fake.jobs[r2.job_id].body


def test_warm_is_restored_after_success(fake, client):
    _submit(client, warm=1)
    assert fake.workers_min_history[ENDPOINT] == [1, 0]


def test_scene_errors_stay_per_scene(fake, client):
    fake.queue_plan(JobPlan(scene_errors={"s2": ("could not decode", "invalid_audio")}))
    result = _submit(client, warm=1)
    assert not result.ok and result.scene("s1").ok
    err = result.scene("s2").error
    assert (err.code, err.stage) == ("invalid_audio", "audio")
    assert fake.workers_min() == 0


def test_handler_error_is_job_failed_with_its_code(fake, client):
    # Worker.handle returns {"error": "<code>: <msg>", "code", "job_id"}; the runpod SDK
    # turns that into status FAILED, error=<msg string>, output={"code", "job_id"}.
    fake.queue_plan(JobPlan(output={"error": "out_of_memory: CUDA out of memory", "code": "out_of_memory",
                                    "job_id": "x"}))
    with pytest.raises(JobFailed) as info:
        _submit(client, warm=2)
    assert info.value.code == "out_of_memory" and info.value.status == "FAILED"
    assert "CUDA out of memory" in str(info.value)
    assert fake.workers_min_history[ENDPOINT] == [2, 0]
    assert list(fake.job_statuses().values()) == ["FAILED"]  # a final job is not cancelled


def test_handler_exception_is_decoded(fake, client):
    error_info = json.dumps({"error_type": "<class 'RuntimeError'>", "error_message": "boom",
                             "error_traceback": "Traceback ...", "hostname": "h"})
    fake.queue_plan(JobPlan(final="FAILED", error=error_info))
    with pytest.raises(JobFailed) as info:
        _submit(client, warm=1)
    assert "RuntimeError" in str(info.value) and "boom" in str(info.value)
    assert "Traceback" not in str(info.value) and info.value.code == "job_failed"
    assert fake.workers_min() == 0


def test_code_recovered_from_message_when_only_the_string_is_kept(fake, client):
    fake.queue_plan(JobPlan(final="FAILED", error="invalid_input: scenes.0.audio: field required"))
    with pytest.raises(JobFailed) as info:
        _submit(client)
    assert info.value.code == "invalid_input"


@pytest.mark.parametrize("final,code", [("TIMED_OUT", "job_timed_out")])
def test_runpod_side_timeout(fake, client, final, code):
    fake.queue_plan(JobPlan(final=final))
    with pytest.raises(JobFailed) as info:
        _submit(client, warm=1)
    assert info.value.code == code and fake.workers_min() == 0


def test_never_finishing_job_times_out_is_cancelled_and_restored(fake, client):
    fake.queue_plan(JobPlan(final="NEVER"))
    with pytest.raises(JobTimeout):
        _submit(client, warm=1, timeout=0.1)
    assert list(fake.job_statuses().values()) == ["CANCELLED"]
    assert fake.workers_min_history[ENDPOINT] == [1, 0]


def test_keyboard_interrupt_while_waiting_cancels_and_restores(fake, client):
    fake.queue_plan(JobPlan(final="NEVER"))

    def on_progress(update):
        if update.status == "IN_PROGRESS":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _submit(client, warm=1, on_progress=on_progress)
    assert list(fake.job_statuses().values()) == ["CANCELLED"]
    assert fake.workers_min() == 0


def test_5xx_bursts_and_429_along_the_way(fake, client):
    fake.add_fault("GET", f"/v1/endpoints/{ENDPOINT}", 502, times=2)
    fake.add_fault("PATCH", f"/v1/endpoints/{ENDPOINT}", 503, times=1)
    fake.add_fault("POST", f"/v2/{ENDPOINT}/run", 429, headers={"Retry-After": "0"}, times=2)
    fake.add_fault("GET", rf"/v2/{ENDPOINT}/status/.+", 500, times=3)
    result = _submit(client, warm=1)
    assert result.ok and len(fake.jobs) == 1
    assert fake.workers_min_history[ENDPOINT] == [1, 0]


def test_status_unreachable_cancels_and_restores(fake):
    client = make_client(fake, timeout=(1.0, 0.1), retry=RetryPolicy(max_attempts=2, backoff_base=0.001))
    fake.queue_plan(JobPlan(final="NEVER"))
    fake.add_fault("GET", rf"/v2/{ENDPOINT}/status/.+", 200, delay=0.3, times=100)
    with pytest.raises(RequestTimeout):
        _submit(client, warm=1)
    assert list(fake.job_statuses().values()) == ["CANCELLED"]
    assert fake.workers_min() == 0


def test_cancel_failure_is_logged_not_raised(fake, client, caplog):
    fake.queue_plan(JobPlan(final="NEVER"))
    fake.add_fault("POST", rf"/v2/{ENDPOINT}/cancel/.+", 500, times=100)
    with pytest.raises(JobTimeout):
        _submit(client, warm=1, timeout=0.05)
    assert "storystudio cancel" in caplog.text
    assert fake.workers_min() == 0


def test_no_cancel_when_asked(fake, client):
    fake.queue_plan(JobPlan(final="NEVER"))
    with pytest.raises(JobTimeout):
        _submit(client, timeout=0.05, cancel_on_abort=False)
    assert list(fake.job_statuses().values()) == ["IN_PROGRESS"]


def test_invalid_story_is_rejected_before_any_request(fake, client):
    from storystudio.errors import InvalidInput

    with pytest.raises(InvalidInput):
        submit_story(client, ENDPOINT, {"project_id": "p", "scenes": [{"audio": "a"}]}, warm=1)
    assert fake.requests == []


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("output,expected", [
    ({"stage": "images", "done": 1, "total": 4, "elapsed_s": 3.0}, ("images", None, 1, 4)),
    ({"stage": "swap", "to": "video"}, ("swap", "to video", None, None)),
    ({"stage": "video_clips", "done": 2, "total": 3, "scene_id": "s2"}, ("video_clips", "s2", 2, 3)),
    ({"progress": 0.25}, (None, None, 0.25, 1)),
    ({"progress": 40}, (None, None, 40, 100)),
    (0.5, (None, None, 0.5, 1)),
    ("warming up", (None, "warming up", None, None)),
    (None, (None, None, None, None)),
    ({"step": 3, "steps": 8, "message": "denoising"}, (None, "denoising", 3, 8)),
])
def test_parse_progress(output, expected):
    u = parse_progress(JobStatus("j", "IN_PROGRESS", output=output))
    assert (u.stage, u.message, u.done, u.total) == expected
    assert isinstance(u.describe(), str)


def test_parse_progress_ignores_final_output():
    u = parse_progress(JobStatus("j", "COMPLETED", output={"scenes": [], "progress": 1}))
    assert u.done is None and u.describe() == "COMPLETED"


def test_interpret_completed_error_output():
    job = JobStatus("j", "COMPLETED", output={"error": "unknown_task: nope", "code": "unknown_task"})
    with pytest.raises(JobFailed) as info:
        interpret_final(job)
    assert info.value.code == "unknown_task"
    with pytest.raises(JobFailed) as info:
        interpret_final(JobStatus("j", "CANCELLED"))
    assert info.value.code == "job_cancelled"
