"""Deadlines: a batch that cannot finish in its time budget returns what is done and marks the rest
``deadline_exceeded``. The batch tests drive a fake clock that the renders advance, so they are exact."""

from __future__ import annotations

from dataclasses import replace

import pytest

from storystudio import batch as batch_module
from storystudio import worker as worker_module
from storystudio.config import WorkerSettings
from storystudio.deadline import PRIOR_FIXED_S, SAFETY, Deadline, image_units, video_frames, video_units
from storystudio.errors import InvalidInput
from storystudio.media import probe_media
from tests.test_worker import FPS, batch, data_uri, make_worker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_estimates_start_from_the_prior_then_follow_the_slowest_measured_rate():
    clock = FakeClock()
    d = Deadline(300.0, clock=clock, margin_s=10.0)
    units = video_units(5.0, 480 * 832, 80, 40)
    # The engine's own clip plan: a 5 s line is one 84-frame clip (80 + 3 dropped, the one-latent
    # tail merged), so 40 steps x 84/80; the baseline's two full clips count 80 units.
    assert video_frames(5.0, 80) == 84 and units == pytest.approx(42.0)
    assert video_frames(5.0, 80, trim_last=False) == 160
    assert video_units(5.0, 480 * 832, 80, 40, trim_last=False) == pytest.approx(80.0)
    assert video_frames(3.0, 80) == 52 and video_units(3.0, 720 * 1280, 80, 40) == pytest.approx(26.0 * 720 * 1280
                                                                                                  / (480 * 832))
    ok, est = d.fits("video", units)
    assert est == pytest.approx(PRIOR_FIXED_S["video"] + 12.0 * 42) and not ok, "the prior alone exceeds 290 s"
    assert d.fits("image", image_units(1024, 1024, 8)) == (True, pytest.approx(PRIOR_FIXED_S["image"] + 8.0))
    with d.timed("video", 10.0):
        clock.now += 50.0  # 5 s per unit
    with d.timed("video", 10.0):
        clock.now += 30.0  # faster; the slowest rate is kept
    assert d.estimate("video", 20.0) == pytest.approx(5.0 * SAFETY * 20.0)
    assert d.remaining() == pytest.approx(300 - 10 - 80)
    err = d.exceeded("video", 123.4)
    assert err["code"] == "deadline_exceeded" and err["stage"] == "video"
    assert err["error"].startswith("deadline_exceeded: not started: the video was estimated at 123.4 s")
    assert "STORYSTUDIO_JOB_TIMEOUT_S=300" in err["error"] and '"resume": true' in err["error"]
    assert Deadline(None, clock=clock).fits("video", 1e9) == (True, pytest.approx(20.0 + 12e9))


def test_a_failed_piece_is_not_measured():
    clock = FakeClock()
    d = Deadline(100.0, clock=clock)
    with pytest.raises(RuntimeError), d.timed("image", 1.0):
        clock.now += 99.0
        raise RuntimeError("boom")
    assert d.estimate("image", 1.0) == PRIOR_FIXED_S["image"] + 1.0


def test_job_timeout_comes_from_the_environment():
    assert WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}).job_timeout_s is None
    assert WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu", "STORYSTUDIO_JOB_TIMEOUT_S": "3300"}).job_timeout_s == 3300
    for bad in ("0", "-5", "soon"):
        with pytest.raises(InvalidInput) as ei:
            WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu", "STORYSTUDIO_JOB_TIMEOUT_S": bad})
        assert ei.value.code == "invalid_config" and "STORYSTUDIO_JOB_TIMEOUT_S" in ei.value.message


def _scenes(n: int) -> list[dict]:
    return [{"scene_id": f"s{i}", "prompt": f"scene {i}", "audio": data_uri("wav", 1.0, i)} for i in range(n)]


def test_batch_returns_what_is_done_and_marks_the_rest_deadline_exceeded(tiny_models, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(worker_module, "Deadline", lambda timeout: Deadline(timeout, clock=clock))
    real_image, real_video = batch_module.render_image, batch_module.render_video

    def image(*args, **kwargs):
        clock.now += 1.0
        return real_image(*args, **kwargs)

    def video(*args, **kwargs):
        clock.now += 100.0  # each video "takes" 100 s
        return real_video(*args, **kwargs)

    monkeypatch.setattr(batch_module, "render_image", image)
    monkeypatch.setattr(batch_module, "render_video", video)
    worker = make_worker(tiny_models, tmp_path)
    worker.settings = replace(worker.settings, job_timeout_s=250.0)
    # 3 images (3 s); video 1 on the prior (~20 s) -> t=103; video 2 estimated 120 s, 132 s left -> t=203;
    # video 3 estimated 120 s, 32 s left (250 - 15 margin - 203): not started.
    r = worker.handle(batch(_scenes(3)))
    assert r["scenes_ok"] == 2 and r["scenes_failed"] == 1 and r["scenes_deadline_exceeded"] == 1, r
    s0, s1, s2 = r["scenes"]
    assert "error" not in s0 and "error" not in s1
    assert s2["error"]["code"] == "deadline_exceeded" and s2["error"]["stage"] == "video", s2
    assert "estimated at 120.0 s and 32.0 s were left" in s2["error"]["error"]
    assert "image_url" in s2, "its image was done before the deadline and is returned"
    for s in (s0, s1):
        assert probe_media(s["video_url"]).video.frame_count == FPS


def test_tiny_timeout_returns_at_once_with_every_scene_deadline_exceeded(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path)
    worker.settings = replace(worker.settings, job_timeout_s=1.0)  # less than the margin: nothing can start
    r = worker.handle(batch(_scenes(2)))
    assert r["scenes_ok"] == 0 and r["scenes_deadline_exceeded"] == 2, r
    assert [s["error"]["stage"] for s in r["scenes"]] == ["image", "image"]
    assert all(s["error"]["code"] == "deadline_exceeded" for s in r["scenes"])
    assert not worker.manager.is_loaded("image") and not worker.manager.is_loaded("video")
