"""One schema: the client validates stories with the worker's own models, refuses what the
worker would refuse with the worker's message, and stays free of heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from storystudio.backend.errors import LocalMediaError
from storystudio.backend.media import LocalMedia, local_path, local_references
from storystudio.backend.scene_progress import SceneTracker
from storystudio.backend.story import Story
from storystudio.backend.studio import StoryStudio
from storystudio.errors import InvalidInput
from storystudio.storage import StorageSettings

from .conftest import ENDPOINT, make_client

REPO = Path(__file__).resolve().parents[2]

GOOD = {"project_id": "story-1", "seed": 123, "scenes": [
    {"scene_id": "s1", "prompt": "image prompt", "audio": "https://x.example/s1.mp3", "video_prompt": "optional"}],
    "image": {"width": 1024, "height": 1024, "steps": 8, "guidance": 0.0, "negative_prompt": ""},
    "video": {"resolution": "480p", "steps": 40, "guidance": 4.5, "shift": 3.0}}

BAD = [
    lambda d: d.update(extra=1),
    lambda d: d.update(project_id=""),
    lambda d: d.update(scenes=[]),
    lambda d: d.update(seed=-1),
    lambda d: d["scenes"][0].pop("audio"),
    lambda d: d["scenes"][0].pop("prompt"),
    lambda d: d["scenes"][0].update(audio_duration=0),
    lambda d: d["scenes"].append(dict(d["scenes"][0])),
    lambda d: d.update(image={"width": 1000}),  # not a multiple of 16: only the worker's model knows
    lambda d: d.update(video={"resolution": "1080p"}),
    lambda d: d.update(video={"infer_frames": 81}),
]


def _bad(i: int) -> dict:
    data = json.loads(json.dumps(GOOD))
    BAD[i](data)
    return {"task": "batch", **data}


def test_good_story_is_sent_as_written_and_scene_ids_follow_the_worker():
    story = Story.from_mapping({"input": {"project_id": "p", "scenes": [
        {"prompt": "a", "audio": "x"}, {"scene_id": "intro", "image": "y", "audio": "z"}, {"prompt": "c", "audio": "w"}]}})
    assert story.job_input["task"] == "batch" and "image" not in story.job_input  # worker applies its defaults
    assert story.scene_ids == ["scene-001", "intro", "scene-003"]
    assert "scene_id" not in story.job_input["scenes"][0]


def test_a_story_must_be_a_batch():
    with pytest.raises(InvalidInput, match="a story is a 'batch' job"):
        Story.from_mapping({"task": "image", "prompt": "x"})
    assert not Story.from_mapping({"task": "image", "prompt": "x"}, batch_only=False).is_batch


@pytest.fixture(scope="module")
def real_worker(tiny_models, tmp_path_factory):
    """The production Worker (nothing is loaded: bad input fails before any model)."""
    from storystudio.config import WorkerSettings
    from storystudio.worker import Worker

    zdir, wdir = tiny_models
    out = tmp_path_factory.mktemp("worker-out")
    settings = replace(WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}), zimage_dir=zdir, wan_dir=wdir,
                       storage=StorageSettings(output_dir=out))
    return Worker.from_settings(settings)


@pytest.mark.parametrize("i", range(len(BAD)))
def test_refused_locally_with_the_workers_own_message(i, real_worker, fake, tmp_path):
    bad = _bad(i)
    answer = real_worker.handle({"id": "j", "input": json.loads(json.dumps(bad))})
    assert answer["code"] == "invalid_input", answer
    with StoryStudio(ENDPOINT, client=make_client(fake), storage=StorageSettings()) as studio:
        with pytest.raises(InvalidInput) as info:
            studio.run_story(bad, warm=1, download=tmp_path / "out")
    assert answer["error"] == f"invalid_input: {info.value.message}"
    assert fake.requests == [], "nothing may be sent for a story the worker would refuse"
    assert not (tmp_path / "out").exists()


def test_client_modules_import_nothing_heavy():
    code = ("import sys\n"
            "import storystudio.backend, storystudio.backend.cli, storystudio.backend.studio, storystudio.tasks\n"
            "heavy = ('torch', 'numpy', 'PIL', 'av', 'diffusers', 'transformers', 'wan', 'boto3')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------- local paths


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "s1.wav").write_bytes(b"RIFF-one")
    (tmp_path / "portrait.png").write_bytes(b"\x89PNG-two")
    return tmp_path


@pytest.mark.parametrize("value", [
    "https://x.example/a.wav", "http://10.0.0.1/a.wav", "data:audio/wav;base64,UklGRg==", "HTTPS://X/a.wav",
    "/9j/4AAQSkZJRgABAQEASABIAAD/2wBD", "UklGRiQAAABXQVZFZm10IBAAAAABAAEA", "ftp://x/y.wav", "s3://bucket/key.wav",
])
def test_urls_data_uris_and_base64_are_left_for_the_worker(value, files):
    assert local_path(value, files) is None


def test_local_paths_are_found(files, monkeypatch):
    monkeypatch.setenv("HOME", str(files))
    wav = (files / "audio" / "s1.wav").resolve()
    assert local_path("audio/s1.wav", files) == wav
    assert local_path("./audio/../audio/s1.wav", files) == wav
    assert local_path(str(wav), Path("/")) == wav
    assert local_path(wav.as_uri(), Path("/")) == wav
    assert local_path("file:audio/s1.wav", files) == wav
    assert local_path("~/audio/s1.wav", Path("/")) == wav


@pytest.mark.parametrize("value,match", [
    ("audio/missing.wav", "scenes.0.audio: local file not found: .*missing.wav"),
    ("file:///nowhere/x.wav", "local file not found: /nowhere/x.wav"),
    ("audio", "is not a regular file"),
    ("file://otherhost/x.wav", "names another host"),
])
def test_bad_local_paths_name_the_field(value, match, files):
    with pytest.raises(LocalMediaError, match=match) as info:
        local_path(value, files, field="scenes.0.audio")
    assert info.value.code == "local_media"


def test_scan_finds_every_media_field_but_not_the_image_settings(files):
    story = Story.from_mapping({"project_id": "p", "image": {"width": 512}, "scenes": [
        {"prompt": "a", "audio": "audio/s1.wav"},
        {"image": "portrait.png", "audio": "https://x/b.mp3", "pose_video": "audio/s1.wav"}]}, base_dir=files)
    refs = local_references(story)
    assert [r.field for r in refs] == ["scenes[0].audio", "scenes[1].image", "scenes[1].pose_video"]
    assert [r.kind for r in refs] == ["audio", "image", "video"]
    media = LocalMedia.scan(story)
    assert len(media.files) == 2 and media.total_bytes == len(b"RIFF-one") + len(b"\x89PNG-two")
    sent = media.substitute(story.job_input, lambda f: f"sha:{f.sha256[:6]}:{f.content_type}")
    assert sent["scenes"][0]["audio"] == sent["scenes"][1]["pose_video"]
    assert sent["scenes"][1]["image"].endswith("image/png") and sent["image"] == {"width": 512}
    assert story.job_input["scenes"][0]["audio"] == "audio/s1.wav", "the story itself is not modified"
    fp = media.fingerprint(story.job_input)
    (files / "audio" / "s1.wav").write_bytes(b"RIFF-changed")
    assert LocalMedia.scan(story).fingerprint(story.job_input) != fp


def test_video_job_media_at_the_top_level(files):
    story = Story.from_mapping({"task": "video", "image": "portrait.png", "audio": "audio/s1.wav"},
                               base_dir=files, batch_only=False)
    assert [r.field for r in local_references(story)] == ["image", "audio"]


# --------------------------------------------------------------------------- scene progress


def test_scene_tracker_follows_the_batch_order():
    t = SceneTracker(["a", "b", "c"])
    assert t.apply({"stage": "images", "done": 0, "total": 3})
    assert [s.state for s in t.snapshot()] == ["image", "waiting", "waiting"]
    t.apply({"stage": "images", "done": 2, "total": 3, "scene_id": "b", "ok": False})  # "a" fell between polls
    assert [s.state for s in t.snapshot()] == ["image ready", "failed", "image"]
    t.apply({"stage": "swap", "to": "video"})
    t.apply({"stage": "video_clips", "done": 1, "total": 2, "scene_id": "a"})
    assert t.snapshot()[0].describe() == "video clip 1/2"
    t.apply({"stage": "video_clips", "done": 2, "total": 3, "scene_id": "c"})
    assert [s.state for s in t.snapshot()] == ["done", "failed", "video"]
    assert not t.apply({"stage": "video_clips", "done": 2, "total": 3, "scene_id": "c"})
    assert not t.apply("warming up") and not t.apply({"stage": "videos", "scene_id": "zzz"})


def test_scene_tracker_sees_finished_and_reused_scenes():
    """``scene_done`` may come out of order: a resumed story reports its reused scenes before the swap."""
    t = SceneTracker(["a", "b", "c"])
    t.apply({"stage": "images", "done": 1, "total": 3, "scene_id": "a", "ok": True})
    assert t.apply({"stage": "scene_done", "scene_id": "c", "reused": True, "video_url": "u"})
    assert [s.state for s in t.snapshot()] == ["image ready", "image ready", "done"]
    t.apply({"stage": "video_clips", "done": 1, "total": 2, "scene_id": "a"})
    t.apply({"stage": "scene_done", "scene_id": "a", "reused": False, "video_url": "v"})
    assert [s.state for s in t.snapshot()] == ["done", "image ready", "done"]
    assert not t.apply({"stage": "scene_done", "scene_id": "zzz"})


def test_data_uri_length_is_known_without_reading(files):
    story = Story.from_mapping({"project_id": "p", "scenes": [{"prompt": "a", "audio": "audio/s1.wav"}]},
                               base_dir=files)
    for size in (0, 1, 2, 3, 4, 1000):
        (files / "audio" / "s1.wav").write_bytes(b"\x01" * size or b"\x01")
        f = next(iter(LocalMedia.scan(story).files.values()))
        assert f.data_uri_length == len(f.data_uri())


def test_first_spec_spelling_with_local_files(files):
    """The first specification's names (scene ``id``, ``audio_url``, ``image_url``,
    ``video_settings``) work for local files too; what is sent keeps the caller's spelling."""
    story = Story.from_mapping({"project_id": "p", "video_settings": {"sample_steps": 4}, "scenes": [
        {"id": "intro", "prompt": "a", "audio_url": "audio/s1.wav"},
        {"id": "cat", "image_url": "portrait.png", "audio_url": "https://x/b.mp3"}]}, base_dir=files)
    assert story.scene_ids == ["intro", "cat"] and story.task.video.steps == 4
    media = LocalMedia.scan(story)
    assert [r.field for r in media.refs] == ["scenes[0].audio_url", "scenes[1].image_url"]
    sent = media.substitute(story.job_input, lambda f: f"https://bucket.example/{f.sha256}")
    assert story.with_input(sent).task.scenes[1].image == f"https://bucket.example/{media.file(media.refs[1]).sha256}"
    assert "audio_url" in sent["scenes"][0] and "audio" not in sent["scenes"][0]
