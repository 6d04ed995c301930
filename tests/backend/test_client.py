"""RunPodClient against the strict fake: shapes, retries, backoff, timeouts, waits."""

from __future__ import annotations

import json
import random

import pytest

from storystudio.backend.client import (
    PollSettings,
    RetryPolicy,
    WorkerCounts,
    parse_retry_after,
)
from storystudio.backend.errors import (
    AuthError,
    JobTimeout,
    RequestTimeout,
    RunPodAPIError,
    WorkersNotReady,
)

from .conftest import ENDPOINT, FAST_POLL, FAST_RETRY, make_client
from .fake_runpod import JobPlan

STORY_INPUT = {"task": "batch", "project_id": "p1",
               "scenes": [{"scene_id": "s1", "prompt": "a fox", "audio": "https://x/s1.mp3"}]}


class RecordingSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


# --------------------------------------------------------------------------- workersMin


def test_get_and_set_workers_min(fake, client):
    assert client.get_workers_min(ENDPOINT) == 0
    assert client.set_workers_min(ENDPOINT, 2) == 2
    assert fake.workers_min() == 2
    assert client.get_workers_min(ENDPOINT) == 2
    patch = fake.calls("PATCH")[0]
    assert json.loads(patch["raw"]) == {"workersMin": 2}  # exactly the one field, nothing else
    assert patch["content_type"] == "application/json"
    assert all(r["auth_ok"] for r in fake.requests)


def test_set_workers_min_validates_locally(client, fake):
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError):
            client.set_workers_min(ENDPOINT, bad)
    assert fake.requests == []


def test_server_side_validation_error_is_not_retried(fake, client):
    with pytest.raises(RunPodAPIError) as info:
        client.set_workers_min(ENDPOINT, 50)  # > workersMax
    assert info.value.status == 400 and "workersMax" in str(info.value)
    assert len(fake.calls("PATCH")) == 1


def test_unknown_endpoint_is_404(client):
    with pytest.raises(RunPodAPIError) as info:
        client.get_workers_min("nope")
    assert info.value.status == 404


def test_wrong_key_is_auth_error_and_not_retried(fake):
    from storystudio.backend.client import RunPodClient

    c = RunPodClient("rpa_wrong", api_base=fake.api_base, rest_base=fake.rest_base, retry=FAST_RETRY)
    with pytest.raises(AuthError) as info:
        c.get_workers_min(ENDPOINT)
    assert info.value.status == 401 and info.value.code == "auth_failed"
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- retries


def test_5xx_burst_is_retried_with_backoff(fake):
    sleep = RecordingSleep()
    c = make_client(fake, retry=RetryPolicy(max_attempts=5, backoff_base=0.1, backoff_max=0.3),
                    sleep=sleep, rng=random.Random(1))
    fake.add_fault("GET", f"/v1/endpoints/{ENDPOINT}", 503, times=2)
    fake.add_fault("GET", f"/v1/endpoints/{ENDPOINT}", 502, times=1)
    assert c.get_workers_min(ENDPOINT) == 0
    assert len(fake.calls("GET")) == 4
    # exponential with jitter: retry n waits within [d/2, d], d = min(0.3, 0.1 * 2**(n-1))
    assert len(sleep.calls) == 3
    for n, s in enumerate(sleep.calls, start=1):
        d = min(0.3, 0.1 * 2 ** (n - 1))
        assert d / 2 <= s <= d


def test_retries_are_bounded(fake):
    sleep = RecordingSleep()
    c = make_client(fake, retry=RetryPolicy(max_attempts=3, backoff_base=0.01), sleep=sleep)
    fake.add_fault("GET", f"/v2/{ENDPOINT}/health", 500, times=100)
    with pytest.raises(RunPodAPIError) as info:
        c.health(ENDPOINT)
    assert info.value.status == 500 and info.value.attempts == 3
    assert len(fake.calls("GET")) == 3 and len(sleep.calls) == 2


def test_429_honours_retry_after(fake):
    sleep = RecordingSleep()
    c = make_client(fake, retry=RetryPolicy(max_attempts=3, backoff_base=0.01, retry_after_max=60),
                    sleep=sleep)
    fake.add_fault("POST", f"/v2/{ENDPOINT}/run", 429, headers={"Retry-After": "7"})
    job = c.run(ENDPOINT, STORY_INPUT)
    assert job.status == "IN_QUEUE"
    assert sleep.calls and sleep.calls[0] >= 7  # not the 0.01 s backoff
    assert len(fake.jobs) == 1  # the 429 created nothing, the retry created one job


def test_retry_after_is_capped(fake):
    sleep = RecordingSleep()
    c = make_client(fake, retry=RetryPolicy(max_attempts=2, backoff_base=0.01, retry_after_max=2.5),
                    sleep=sleep)
    fake.add_fault("GET", f"/v2/{ENDPOINT}/health", 429, headers={"Retry-After": "3600"})
    c.health(ENDPOINT)
    assert sleep.calls == [2.5]


def test_parse_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_slow_response_times_out_then_retries(fake):
    c = make_client(fake, timeout=(1.0, 0.2))
    fake.add_fault("GET", f"/v2/{ENDPOINT}/health", 200, delay=0.6, times=1)
    health = c.health(ENDPOINT)  # first attempt times out, second succeeds
    assert health.workers.warm == 0
    assert len(fake.calls("GET")) == 2


def test_always_slow_is_request_timeout(fake):
    c = make_client(fake, timeout=(1.0, 0.1), retry=RetryPolicy(max_attempts=2, backoff_base=0.001))
    fake.add_fault("GET", f"/v2/{ENDPOINT}/health", 200, delay=0.3, times=10)
    with pytest.raises(RequestTimeout) as info:
        c.health(ENDPOINT)
    assert info.value.attempts == 2 and info.value.status is None
    assert "timed out" in str(info.value)


def test_connection_refused_is_retried_then_raised():
    from storystudio.backend.client import RunPodClient

    sleep = RecordingSleep()
    c = RunPodClient("k", api_base="http://127.0.0.1:9/v2", rest_base="http://127.0.0.1:9/v1",
                     retry=RetryPolicy(max_attempts=3, backoff_base=0.001), sleep=sleep, timeout=1)
    with pytest.raises(RequestTimeout) as info:
        c.health(ENDPOINT)
    assert "connection failed" in str(info.value)
    assert len(sleep.calls) == 2


def test_non_json_success_body_is_an_error(fake, client):
    fake.add_fault("GET", f"/v2/{ENDPOINT}/health", 200, body=b"<html>oops</html>")
    with pytest.raises(RunPodAPIError) as info:
        client.health(ENDPOINT)
    assert info.value.code == "bad_response"


# --------------------------------------------------------------------------- health / ready


def test_health_parses_all_worker_counts(fake, client):
    fake.set_workers_min(2)
    h = client.health(ENDPOINT)
    assert h.workers == WorkerCounts(idle=2, ready=2)
    assert h.jobs.completed == 0 and h.jobs.in_queue == 0


@pytest.mark.parametrize("counts,warm", [
    ({"idle": 4, "ready": 4, "running": 1}, 5),   # ready == idle (docs example)
    ({"idle": 1, "ready": 3, "running": 2}, 3),   # ready includes running
    ({"idle": 0, "running": 0}, 0),               # only the keys the docs example shows
    ({"initializing": 2, "throttled": 1}, 0),
])
def test_warm_count(counts, warm):
    assert WorkerCounts.from_dict(counts).warm == warm


def test_wait_for_workers_until_ready(fake, client):
    fake.health_ready_after = 3
    client.set_workers_min(ENDPOINT, 1)
    h = client.wait_for_workers(ENDPOINT, timeout=5, poll_interval=0.001)
    assert h.workers.warm == 1
    assert len(fake.calls("GET", rf"/v2/{ENDPOINT}/health")) == 4


def test_wait_for_workers_is_bounded(fake, client):
    fake.health_never_ready = True
    client.set_workers_min(ENDPOINT, 1)
    with pytest.raises(WorkersNotReady) as info:
        client.wait_for_workers(ENDPOINT, timeout=0.05, poll_interval=0.005)
    assert "throttled=1" in str(info.value)


# --------------------------------------------------------------------------- jobs


def test_run_status_progress_and_completion(fake, client):
    job = client.run(ENDPOINT, STORY_INPUT, execution_timeout_s=900)
    body = fake.jobs[job.id].body
    assert body == {"input": STORY_INPUT, "policy": {"executionTimeout": 900000}}
    updates = []
    final = client.wait_for_job(ENDPOINT, job.id, timeout=5, poll=FAST_POLL, on_update=updates.append)
    assert final.status == "COMPLETED" and final.done
    assert [u.status for u in updates] == ["IN_QUEUE"] + ["IN_PROGRESS"] * 4 + ["COMPLETED"]
    assert [u.output["stage"] for u in updates[1:5]] == ["images", "swap", "video_clips", "videos"]
    assert final.output["scenes"][0]["video_url"].endswith("/s1.mp4")
    assert final.output["job_id"] == job.id
    assert final.execution_time_ms == 3400


def test_wait_for_job_times_out(fake, client):
    fake.queue_plan(JobPlan(final="NEVER"))
    job = client.run(ENDPOINT, STORY_INPUT)
    with pytest.raises(JobTimeout) as info:
        client.wait_for_job(ENDPOINT, job.id, timeout=0.05, poll=FAST_POLL)
    assert info.value.job_id == job.id and info.value.status == "IN_PROGRESS"


def test_poll_interval_backs_off_and_resets(fake):
    sleep = RecordingSleep()
    c = make_client(fake, sleep=sleep)
    fake.queue_plan(JobPlan(queue_polls=4, progress=["a", "a", "b"]))
    job = c.run(ENDPOINT, STORY_INPUT)
    c.wait_for_job(ENDPOINT, job.id, timeout=60, poll=PollSettings(initial=1, maximum=4, factor=2))
    # IN_QUEUE x4: 1 2 4 4 ; IN_PROGRESS 'a' resets: 1 ; 'a' again: 2 ; 'b' resets: 1
    assert sleep.calls == [1, 2, 4, 4, 1, 2, 1]


def test_status_of_failed_job_keeps_error(fake, client):
    fake.queue_plan(JobPlan(queue_polls=0, progress=[], final="FAILED", error="boom"))
    job = client.run(ENDPOINT, STORY_INPUT)
    final = client.wait_for_job(ENDPOINT, job.id, timeout=5, poll=FAST_POLL)
    assert final.status == "FAILED" and final.error == "boom"


def test_cancel(fake, client):
    fake.queue_plan(JobPlan(final="NEVER"))
    job = client.run(ENDPOINT, STORY_INPUT)
    assert client.cancel(ENDPOINT, job.id).status == "CANCELLED"
    assert client.status(ENDPOINT, job.id).status == "CANCELLED"


def test_run_sync(fake, client):
    result = client.run_sync(ENDPOINT, STORY_INPUT, wait_ms=120000)
    assert result.status == "COMPLETED" and result.id.startswith("sync-")
    assert fake.calls("POST")[0]["query"] == {"wait": ["120000"]}
    with pytest.raises(ValueError):
        client.run_sync(ENDPOINT, STORY_INPUT, wait_ms=10)


def test_stream(fake, client):
    fake.queue_plan(JobPlan(queue_polls=0, progress=["p"], stream=["tok1", "tok2"]))
    job = client.run(ENDPOINT, STORY_INPUT)
    chunks = list(client.iter_stream(ENDPOINT, job.id, poll_interval=0.001, timeout=5))
    assert chunks == ["tok1", "tok2"]


def test_ids_are_checked_before_sending(client, fake):
    from storystudio.backend.errors import BackendError

    for bad in ("", " x", "a/b"):
        with pytest.raises(BackendError):
            client.status(ENDPOINT, bad)
        with pytest.raises(BackendError):
            client.health(bad)
    assert fake.requests == []


def test_policy_constraints_checked_locally(client, fake):
    with pytest.raises(ValueError):
        client.run(ENDPOINT, STORY_INPUT, execution_timeout_s=5)
    with pytest.raises(ValueError):
        client.run(ENDPOINT, STORY_INPUT, ttl_s=1)
    assert fake.requests == []


def test_duplicate_warning_only_when_the_run_may_have_landed(fake, caplog):
    import logging

    from storystudio.backend.client import RunPodClient

    with caplog.at_level(logging.INFO):
        refused = RunPodClient("k", api_base="http://127.0.0.1:9/v2", rest_base="http://127.0.0.1:9/v1",
                               retry=RetryPolicy(max_attempts=2, backoff_base=0.001), timeout=1)
        with pytest.raises(RequestTimeout):
            refused.run(ENDPOINT, STORY_INPUT)
    assert "duplicate" not in caplog.text
    caplog.clear()
    c = make_client(fake, timeout=(1.0, 0.1), retry=RetryPolicy(max_attempts=2, backoff_base=0.001))
    fake.add_fault("POST", f"/v2/{ENDPOINT}/run", 200, delay=0.3, apply=True)
    with caplog.at_level(logging.INFO):
        c.run(ENDPOINT, STORY_INPUT)
    assert "duplicate" in caplog.text
    assert len(fake.jobs) == 2  # the lost answer's job exists too: what the warning is about
