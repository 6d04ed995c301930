"""The fake RunPod must reject what RunPod rejects, or client tests prove nothing."""

from __future__ import annotations

import json

import pytest
import requests

from .conftest import API_KEY, ENDPOINT
from .fake_runpod import FakeRunPod

GOOD = {"Authorization": f"Bearer {API_KEY}"}
JSON = {**GOOD, "Content-Type": "application/json"}
STORY_INPUT = {"task": "batch", "project_id": "p", "scenes": [{"scene_id": "s1", "prompt": "x", "audio": "a"}]}


def _req(fake: FakeRunPod, method: str, path: str, **kw) -> requests.Response:
    return requests.request(method, fake.url + path, timeout=5, **kw)


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": API_KEY},  # no Bearer scheme
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"bearer {API_KEY}"},
])
@pytest.mark.parametrize("method,path", [
    ("GET", f"/v1/endpoints/{ENDPOINT}"),
    ("GET", f"/v2/{ENDPOINT}/health"),
    ("POST", f"/v2/{ENDPOINT}/run"),
])
def test_rejects_bad_authorization(fake, headers, method, path):
    r = _req(fake, method, path, headers=headers)
    assert r.status_code == 401


@pytest.mark.parametrize("method,path", [
    ("POST", f"/v1/endpoints/{ENDPOINT}"),
    ("PUT", f"/v1/endpoints/{ENDPOINT}"),
    ("GET", f"/v2/{ENDPOINT}/run"),
    ("POST", f"/v2/{ENDPOINT}/health"),
    ("DELETE", f"/v2/{ENDPOINT}/health"),
])
def test_rejects_wrong_method(fake, method, path):
    r = _req(fake, method, path, headers=JSON, data=b"{}" if method != "GET" else b"")
    assert r.status_code == 405


def test_rejects_wrong_method_on_job_routes(fake):
    job = _req(fake, "POST", f"/v2/{ENDPOINT}/run", headers=JSON, json={"input": STORY_INPUT}).json()
    assert _req(fake, "POST", f"/v2/{ENDPOINT}/status/{job['id']}", headers=GOOD).status_code == 405
    assert _req(fake, "GET", f"/v2/{ENDPOINT}/cancel/{job['id']}", headers=GOOD).status_code == 405


@pytest.mark.parametrize("body", [
    {"workersMin": -1},
    {"workersMin": "1"},
    {"workersMin": True},
    {"workersMin": 1.5},
    {"workers_min": 1},  # wrong field name
    {"minWorkers": 1},
    {"workersMin": 99},  # > workersMax
    {},
    [1],
])
def test_rejects_bad_patch_bodies(fake, body):
    r = _req(fake, "PATCH", f"/v1/endpoints/{ENDPOINT}", headers=JSON, data=json.dumps(body))
    assert r.status_code == 400, r.text
    assert fake.workers_min() == 0


def test_patch_needs_json_content_type(fake):
    r = _req(fake, "PATCH", f"/v1/endpoints/{ENDPOINT}", headers=GOOD, data=json.dumps({"workersMin": 1}))
    assert r.status_code == 400
    r = _req(fake, "PATCH", f"/v1/endpoints/{ENDPOINT}", headers=JSON, data=b"{not json")
    assert r.status_code == 400


@pytest.mark.parametrize("body", [
    STORY_INPUT,  # not wrapped in "input"
    {"input": "text"},
    {"input": STORY_INPUT, "extra": 1},
    {"input": STORY_INPUT, "policy": {"executionTimeout": 5000}},  # must be > 5000 ms
    {"input": STORY_INPUT, "policy": {"timeout": 10}},
    {"input": STORY_INPUT, "policy": {"ttl": 5}},
    {"input": STORY_INPUT, "webhook": 3},
])
def test_rejects_bad_run_bodies(fake, body):
    r = _req(fake, "POST", f"/v2/{ENDPOINT}/run", headers=JSON, data=json.dumps(body))
    assert r.status_code == 400, r.text
    assert fake.jobs == {}


def test_rejects_unknown_paths_jobs_and_query(fake):
    assert _req(fake, "GET", "/v2/nope/health", headers=GOOD).status_code == 404
    assert _req(fake, "GET", "/v1/endpoints/nope", headers=GOOD).status_code == 404
    assert _req(fake, "GET", f"/v2/{ENDPOINT}/status/nope", headers=GOOD).status_code == 404
    assert _req(fake, "GET", f"/v2/{ENDPOINT}/health?x=1", headers=GOOD).status_code == 400
    assert _req(fake, "GET", f"/v2/{ENDPOINT}/health", headers=JSON, data=b"{}").status_code == 400
    r = _req(fake, "POST", f"/v2/{ENDPOINT}/runsync?wait=10", headers=JSON, json={"input": STORY_INPUT})
    assert r.status_code == 400


def test_documented_shapes(fake):
    """The happy path answers in the documented shapes."""
    r = _req(fake, "GET", f"/v1/endpoints/{ENDPOINT}", headers=GOOD)
    assert r.status_code == 200 and r.json()["workersMin"] == 0
    r = _req(fake, "PATCH", f"/v1/endpoints/{ENDPOINT}", headers=JSON, json={"workersMin": 2})
    assert r.status_code == 200 and r.json()["workersMin"] == 2
    health = _req(fake, "GET", f"/v2/{ENDPOINT}/health", headers=GOOD).json()
    assert set(health) == {"jobs", "workers"}
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert set(health["workers"]) == {"idle", "initializing", "ready", "running", "throttled", "unhealthy"}
    job = _req(fake, "POST", f"/v2/{ENDPOINT}/run", headers=JSON, json={"input": STORY_INPUT}).json()
    assert set(job) == {"id", "status"} and job["status"] == "IN_QUEUE"
    seen = []
    for _ in range(10):
        st = _req(fake, "GET", f"/v2/{ENDPOINT}/status/{job['id']}", headers=GOOD).json()
        seen.append(st["status"])
        if st["status"] == "COMPLETED":
            break
    assert seen[0] == "IN_QUEUE" and "IN_PROGRESS" in seen and seen[-1] == "COMPLETED"
    assert st["output"]["scenes"][0]["scene_id"] == "s1"
    c = _req(fake, "POST", f"/v2/{ENDPOINT}/cancel/{job['id']}", headers=GOOD).json()
    assert c == {"id": job["id"], "status": "COMPLETED"}  # too late to cancel a finished job
