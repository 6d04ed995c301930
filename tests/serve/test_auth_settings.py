"""API keys, the loopback-only rule and the service's settings (no server, no models)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from storystudio.errors import InvalidInput
from storystudio.serve import auth
from storystudio.serve.auth import KeyRing, UnsafeBind, check_bind, is_loopback
from storystudio.serve.settings import ServeSettings, parse_video_defaults
from tests.serve.conftest import ROOT


def test_keys_come_from_both_variables_with_labels_and_no_blanks():
    ring = KeyRing.from_env({"STORYSTUDIO_API_KEYS": " a1 , ,b2,", "WAN2_API_KEYS": "old,a1"})
    assert [k.label for k in ring.keys] == ["STORYSTUDIO_API_KEYS#1", "STORYSTUDIO_API_KEYS#2", "WAN2_API_KEYS#1"]
    assert ring.match("b2").label == "STORYSTUDIO_API_KEYS#2"
    assert ring.match("old").label == "WAN2_API_KEYS#1"
    assert ring.match("a1 ") is None and ring.match("") is None and ring.match("A1") is None
    assert "a1" not in repr(ring.keys), "secrets stay out of reprs and logs"
    assert not KeyRing.from_env({"STORYSTUDIO_API_KEYS": " , "}).enabled


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    ring = KeyRing.from_env({"STORYSTUDIO_API_KEYS": "first,second,third"})
    assert ring.match("first").label == "STORYSTUDIO_API_KEYS#1"
    assert len(calls) == 3, "no early exit on a match: the time does not tell which key matched"
    calls.clear()
    assert ring.match("nope") is None and len(calls) == 3


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("example.com", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_without_keys_only_loopback_binds_unless_allowed(caplog):
    none = KeyRing(())
    with caplog.at_level(logging.WARNING, logger="storystudio.serve.auth"):
        check_bind("127.0.0.1", none, allow_unauthenticated=False)
        assert "WITHOUT authentication, reachable from this machine only" in caplog.text
        with pytest.raises(UnsafeBind, match="refusing to serve on 0.0.0.0 without an API key"):
            check_bind("0.0.0.0", none, allow_unauthenticated=False)
        caplog.clear()
        check_bind("0.0.0.0", none, allow_unauthenticated=True)
        assert "WITHOUT authentication on 0.0.0.0 because --allow-unauthenticated" in caplog.text
    check_bind("0.0.0.0", KeyRing.from_env({"WAN2_API_KEYS": "k"}), allow_unauthenticated=False)


def test_the_command_refuses_an_open_public_bind_before_loading_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORYSTUDIO_", "WAN2_"))}
    env.update(STORYSTUDIO_DEVICE="cpu", STORYSTUDIO_OUTPUT_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "storystudio.serve", "--host", "0.0.0.0", "--port", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve on 0.0.0.0 without an API key" in proc.stderr
    assert not (tmp_path / ".serve").exists(), "nothing was created"
    # the same through the `storystudio` console command
    proc = subprocess.run([sys.executable, "-m", "storystudio.backend", "serve", "--host", "0.0.0.0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refusing to serve on 0.0.0.0" in proc.stderr


def test_settings_from_env(tmp_path):
    env = {"STORYSTUDIO_DEVICE": "cpu", "STORYSTUDIO_OUTPUT_DIR": str(tmp_path / "out"), "STORYSTUDIO_PORT": "9001",
           "STORYSTUDIO_HOST": "0.0.0.0", "STORYSTUDIO_ALLOW_UNAUTHENTICATED": "yes",
           "STORYSTUDIO_MAX_JOBS_PER_KEY": "3", "STORYSTUDIO_MEDIA_ROOT": str(tmp_path / "media"),
           "STORYSTUDIO_SERVE_VIDEO_DEFAULTS": '{"steps": 20, "infer_frames": 48}'}
    s = ServeSettings.from_env(env)
    assert (s.host, s.port, s.allow_unauthenticated, s.max_jobs_per_key) == ("0.0.0.0", 9001, True, 3)
    assert s.database == (tmp_path / "out" / ".serve" / "jobs.sqlite3").resolve()
    assert s.video_settings == {"steps": 20, "infer_frames": 48}
    assert s.media_root == tmp_path / "media"
    default = ServeSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"})
    assert (default.host, default.port, default.max_jobs_per_key, default.media_root) == ("127.0.0.1", 8000, 2, None)


@pytest.mark.parametrize(("var", "value", "message"), [
    ("STORYSTUDIO_PORT", "http", "STORYSTUDIO_PORT='http' is not an integer"),
    ("STORYSTUDIO_PORT", "70000", "STORYSTUDIO_PORT=70000 must be between 1 and 65535"),
    ("STORYSTUDIO_MAX_JOBS_PER_KEY", "0", "must be between 1 and 10000"),
    ("STORYSTUDIO_ALLOW_UNAUTHENTICATED", "maybe", "use 1/true or 0/false"),
    ("STORYSTUDIO_SERVE_VIDEO_DEFAULTS", "{steps: 2}", "is not valid JSON"),
    ("STORYSTUDIO_SERVE_VIDEO_DEFAULTS", "[1]", "must be a JSON object"),
    ("STORYSTUDIO_SERVE_VIDEO_DEFAULTS", '{"steps": 0}', "steps: Input should be greater than or equal to 1"),
    ("STORYSTUDIO_SERVE_VIDEO_DEFAULTS", '{"stepz": 2}', "stepz: Extra inputs are not permitted"),
])
def test_bad_settings_fail_at_start_with_the_variable_named(var, value, message):
    with pytest.raises(InvalidInput) as info:
        ServeSettings.from_env({"STORYSTUDIO_DEVICE": "cpu", var: value})
    assert info.value.code == "invalid_config" and message in info.value.message


def test_video_defaults_are_checked_by_the_worker_schema():
    assert parse_video_defaults('{"max_area": 4096, "steps": 2}') == {"max_area": 4096, "steps": 2}
    assert parse_video_defaults("  ") == {}
