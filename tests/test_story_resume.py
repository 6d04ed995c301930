"""Stories that survive a crash (in-process, tiny checkpoints): each piece is stored with a manifest
entry the moment it is done, progress carries the URLs, and ``resume`` reuses what matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from storystudio import batch as batch_module
from storystudio.media import probe_media
from storystudio.storage import LocalStorage, make_key, make_storage
from tests.test_storage import s3_settings
from tests.test_worker import FPS, batch, data_uri, make_worker


class Killed(BaseException):
    """Stands for SIGKILL in-process: not an Exception, so nothing in the worker catches it."""


def _scenes(prompt2: str = "scene 1") -> list[dict]:
    return [{"scene_id": "s0", "prompt": "scene 0", "audio": data_uri("wav", 1.0, 0)},
            {"scene_id": "s1", "prompt": prompt2, "audio": data_uri("wav", 1.0, 1)},
            {"scene_id": "s2", "prompt": "scene 2", "audio": data_uri("wav", 1.0, 2)}]


def _manifest(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "storystudio" / "p" / "resume" / "manifest.json").read_text())


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_storage_reads_back_what_it_stored(tmp_path, request, backend):
    if backend == "local":
        storage = LocalStorage(tmp_path / "out")
    else:
        storage = make_storage(s3_settings(request.getfixturevalue("s3_server")))
    key = make_key(kind="manifest", job_id="resume", ext="json", project_id=f"story-{backend}")
    missing = make_key(kind="video", job_id="resume", ext="mp4", project_id=f"story-{backend}", scene_id="nope")
    assert storage.get_bytes(missing) is None and storage.exists(missing) is False
    stored = storage.put_bytes(key, b'{"version": 1}', "application/json")
    assert storage.get_bytes(key) == b'{"version": 1}' and storage.exists(key) is True
    url = storage.url(key)
    if backend == "local":
        assert url == stored.url and Path(url).read_bytes() == b'{"version": 1}'
    else:
        import requests

        assert requests.get(url, timeout=10).content == b'{"version": 1}'


def test_killed_batch_resumes_reusing_every_finished_piece(tiny_models, tmp_path, monkeypatch):
    events: list[dict] = []
    worker = make_worker(tiny_models, tmp_path, events=events)
    real = batch_module.render_video
    videos_done = []

    def render_then_die(ctx, *args, scene_id=None, **kwargs):
        if videos_done == ["s0"]:
            raise Killed()  # the worker dies while scene s1's video is in flight
        out = real(ctx, *args, scene_id=scene_id, **kwargs)
        videos_done.append(scene_id)
        return out

    monkeypatch.setattr(batch_module, "render_video", render_then_die)
    with pytest.raises(Killed):
        worker.handle(batch(_scenes(), resume=True))
    monkeypatch.undo()

    # What survived: all three images and s0's video, each in the manifest with its file.
    m = _manifest(tmp_path)
    assert {sid: sorted(parts) for sid, parts in m["scenes"].items()} == {
        "s0": ["image", "video"], "s1": ["image"], "s2": ["image"]}
    for parts in m["scenes"].values():
        for part in parts.values():
            assert (tmp_path / "out" / "storystudio" / part["key"]).stat().st_size > 0
    done = [e for e in events if e["stage"] == "scene_done"]
    assert [e["scene_id"] for e in done] == ["s0"] and Path(done[0]["video_url"]).is_file()
    assert Path(done[0]["image_url"]).is_file()
    image_events = [e for e in events if e["stage"] == "images" and "scene_id" in e]
    assert [Path(e["image_url"]).is_file() for e in image_events] == [True, True, True]

    # A fresh worker (the restarted process) resumes: no image is rendered, s0 is not rendered at all.
    events.clear()
    fresh = make_worker(tiny_models, tmp_path, events=events)
    r = fresh.handle(batch(_scenes(), resume=True))
    assert r["scenes_ok"] == 3 and r["scenes_reused"] == 1, r
    by_id = {s["scene_id"]: s for s in r["scenes"]}
    assert [by_id[s]["reused"] for s in ("s0", "s1", "s2")] == [True, False, False]
    assert all(by_id[s]["image_reused"] for s in ("s0", "s1", "s2"))
    assert not fresh.manager.is_loaded("image"), "every image was reused: Z-Image must not load"
    for s in by_id.values():
        assert probe_media(s["video_url"]).video.frame_count == FPS
        assert Image.open(s["image_url"]).size == (256, 256)
    assert by_id["s0"]["video_key"].endswith("p/resume/s0/video.mp4")
    assert sorted(_manifest(tmp_path)["scenes"]["s2"]) == ["image", "video"]
    assert [e["scene_id"] for e in events if e["stage"] == "scene_done"] == ["s0", "s1", "s2"]

    # Everything stored: a third run renders nothing and never loads Wan either.
    third = make_worker(tiny_models, tmp_path)
    r3 = third.handle(batch(_scenes(), resume=True))
    assert r3["scenes_reused"] == 3 and r3["scenes_ok"] == 3, r3
    assert not third.manager.is_loaded("image") and not third.manager.is_loaded("video")
    assert [s["video_url"] for s in r3["scenes"]] == [by_id[s]["video_url"] for s in ("s0", "s1", "s2")]

    # One scene's prompt changes: only that scene is rendered again.
    r4 = third.handle(batch(_scenes(prompt2="a different scene 1"), resume=True))
    assert [s["reused"] for s in r4["scenes"]] == [True, False, True], r4
    assert r4["scenes"][1].get("image_reused") is None and r4["scenes"][1]["image_source"] == "generated"


def test_changed_audio_bytes_render_the_video_again(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path)
    scenes = _scenes()[:1]
    assert worker.handle(batch(scenes, resume=True))["scenes_ok"] == 1
    scenes[0]["audio"] = data_uri("wav", 1.0, 99)  # same length, other bytes
    r = worker.handle(batch(scenes, resume=True))
    s = r["scenes"][0]
    assert s["reused"] is False and s["image_reused"] is True, s


def test_without_resume_each_job_stores_under_its_own_id_with_a_manifest(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path)
    r = worker.handle(batch(_scenes()[:1]))
    assert "scenes_reused" not in r and "reused" not in r["scenes"][0]
    m = json.loads((tmp_path / "out" / "storystudio" / "p" / "job-1" / "manifest.json").read_text())
    assert sorted(m["scenes"]["s0"]) == ["image", "video"] and m["job_id"] == "job-1"


def test_scene_hashes_cover_every_input():
    from storystudio.manifest import image_hash, video_hash
    from storystudio.tasks import parse_job_input

    def task(**scene_extra):
        return parse_job_input({"task": "batch", "project_id": "p", "seed": 4,
                                "scenes": [{"scene_id": "a", "prompt": "x", "audio": "u", **scene_extra}]})

    base = task()
    ih = image_hash(base, 0, None)
    vh = video_hash(base, 0, ih, "aa")
    assert image_hash(task(prompt="y"), 0, None) != ih
    assert image_hash(base, 0, "given-bytes-sha") != ih
    assert video_hash(base, 0, ih, "bb") != vh, "audio bytes"
    assert video_hash(base, 0, ih, "aa", "pose-sha") != vh, "pose video bytes"
    assert video_hash(task(audio_start=0.5), 0, ih, "aa") != vh, "audio trim"
    assert video_hash(task(video_prompt="talks"), 0, ih, "aa") != vh, "video prompt"
    assert video_hash(task(seed=9), 0, image_hash(task(seed=9), 0, None), "aa") != vh, "seed"
    assert video_hash(task(audio="another-url"), 0, ih, "aa") == vh, "URLs do not matter, bytes do"
