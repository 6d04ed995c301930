"""API key sources, and that the key never shows up in logs, errors or reprs."""

from __future__ import annotations

import logging
import os

import pytest

from storystudio.backend.auth import ApiKey, load_api_key, scrub
from storystudio.backend.client import RetryPolicy, RunPodClient
from storystudio.backend.errors import BackendError, ConfigError

from .conftest import API_KEY, ENDPOINT, FAST_POLL, make_client
from .fake_runpod import JobPlan


def test_key_from_env():
    assert load_api_key(env={"RUNPOD_API_KEY": f"  {API_KEY}\n"}).reveal() == API_KEY


def test_key_from_env_file(tmp_path):
    f = tmp_path / "key"
    f.write_text(API_KEY + "\n")
    f.chmod(0o600)
    assert load_api_key(env={"RUNPOD_API_KEY_FILE": str(f)}).reveal() == API_KEY


def test_explicit_file_wins(tmp_path):
    f = tmp_path / "key"
    f.write_text(API_KEY)
    key = load_api_key(f, env={"RUNPOD_API_KEY": "other", "RUNPOD_API_KEY_FILE": "/nonexistent"})
    assert key.reveal() == API_KEY


def test_both_env_vars_is_an_error(tmp_path):
    f = tmp_path / "key"
    f.write_text(API_KEY)
    with pytest.raises(ConfigError, match="only one"):
        load_api_key(env={"RUNPOD_API_KEY": API_KEY, "RUNPOD_API_KEY_FILE": str(f)})


@pytest.mark.parametrize("content", ["", "\n\n", "rpa_SECRETONE\nrpa_SECRETTWO\n", "rpa_SECRET rpa_WORDS"])
def test_bad_key_files(tmp_path, content):
    f = tmp_path / "key"
    f.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_api_key(f)
    for word in content.split():
        assert word not in str(info.value)


def test_missing_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="RUNPOD_API_KEY"):
        load_api_key(env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_key(tmp_path / "missing")


def test_world_readable_key_file_warns_without_the_key(tmp_path, caplog):
    f = tmp_path / "key"
    f.write_text(API_KEY)
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_api_key(f)
    assert "chmod 600" in caplog.text and API_KEY not in caplog.text


def test_apikey_repr_and_scrub():
    key = ApiKey(API_KEY)
    assert API_KEY not in repr(key) and API_KEY not in str(key) and API_KEY not in f"{key}"
    assert scrub(f"x {API_KEY} y", key) == "x *** y"
    client = RunPodClient(key)
    assert API_KEY not in repr(client)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(key)


def _assert_no_key(*texts: str) -> None:
    for text in texts:
        assert API_KEY not in text


def test_key_never_logged_or_in_errors(fake, debug_logs):
    """Run every client path at DEBUG, including failures, and search all output."""
    from storystudio.backend.submit import submit_story
    from storystudio.backend.warm import WarmWorkers

    client = make_client(fake, retry=RetryPolicy(max_attempts=2, backoff_base=0.001), timeout=(1, 0.2))
    texts: list[str] = [repr(client)]
    # an error body that echoes the Authorization header back (some proxies do)
    fake.add_fault("GET", f"/v2/{ENDPOINT}/health", 400, body={"error": f"bad header Bearer {API_KEY}"})
    fake.add_fault("GET", f"/v1/endpoints/{ENDPOINT}", 503, times=5,
                   body={"error": f"upstream said {API_KEY}"})
    fake.add_fault("POST", f"/v2/{ENDPOINT}/run", 200, delay=0.3, times=5)
    errors: list[BaseException] = []
    for call in (
        lambda: client.health(ENDPOINT),
        lambda: client.get_workers_min(ENDPOINT),
        lambda: client.run(ENDPOINT, {"task": "batch"}),
        lambda: RunPodClient("rpa_wrong", api_base=fake.api_base, rest_base=fake.rest_base).health(ENDPOINT),
    ):
        with pytest.raises(BackendError) as info:
            call()
        errors.append(info.value)
    fake.faults.clear()
    fake.queue_plan(JobPlan(final="FAILED", error=f"handler printed env: RUNPOD_API_KEY={API_KEY}"))
    with pytest.raises(BackendError) as info:
        with WarmWorkers(client, ENDPOINT, 1):
            submit_story(client, ENDPOINT, {"project_id": "p", "scenes": [
                {"scene_id": "s1", "prompt": "x", "audio": "a"}]}, timeout=5, poll=FAST_POLL)
    errors.append(info.value)
    for exc in errors:
        texts += [str(exc), repr(exc), repr(exc.args), repr(getattr(exc, "__cause__", None)),
                  repr(getattr(exc, "__context__", None))]
    texts.append(debug_logs.text)
    texts += [r.getMessage() for r in debug_logs.records]
    assert any("Bearer" in t for t in texts)  # the echoed-header error was seen, scrubbed
    _assert_no_key(*texts)
    assert fake.workers_min() == 0
    assert os.environ.get("RUNPOD_API_KEY") != API_KEY  # the tests never export it
