"""The client's typed job schema, checked against the worker's own validator."""

from __future__ import annotations

import dataclasses
import json

import pytest

from storystudio import tasks
from storystudio.backend.errors import BackendError
from storystudio.backend.schema import (
    ErrorInfo,
    ImageSettings,
    Scene,
    StoryProject,
    StoryResult,
    VideoSettings,
    split_code,
)
from storystudio.errors import InvalidInput

from .fake_runpod import JobPlan, _worker_output

BRIEF_EXAMPLE = {"input": {
    "task": "batch", "project_id": "story-1",
    "scenes": [{"scene_id": "s1", "prompt": "image prompt", "audio": "https://x.example/s1.mp3",
                "video_prompt": "optional", "image": None, "audio_start": None, "audio_duration": None}],
    "image": {"width": 1024, "height": 1024, "steps": 8, "guidance": 0.0, "negative_prompt": ""},
    "video": {"resolution": "480p", "steps": 40, "guidance": 4.5, "shift": 3.0},
    "seed": 123,
}}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_fields_match_the_worker_schema():
    """Same field names as storystudio.tasks: nothing the worker accepts is missing here,
    nothing here would be rejected as unknown."""
    assert _fields(Scene) == set(tasks.Scene.model_fields)
    assert _fields(ImageSettings) == set(tasks.ImageParams.model_fields)
    assert _fields(VideoSettings) == set(tasks.VideoParams.model_fields)
    # images_only is set by the --workers fan-out on its images job, not by a story file
    assert _fields(StoryProject) | {"task", "images_only"} == set(tasks.BatchTask.model_fields)


def test_brief_example_round_trip_passes_the_worker_validator():
    project = StoryProject.from_dict(BRIEF_EXAMPLE)
    payload = project.to_input()
    assert payload["scenes"][0] == {"scene_id": "s1", "prompt": "image prompt",
                                    "audio": "https://x.example/s1.mp3", "video_prompt": "optional"}
    assert payload["image"]["negative_prompt"] == "" and payload["seed"] == 123
    parsed = tasks.parse_job_input(payload)
    assert isinstance(parsed, tasks.BatchTask)
    assert parsed.scenes[0].scene_id == "s1" and parsed.video.steps == 40
    assert StoryProject.from_dict(payload).to_input() == payload  # bare input accepted too


def test_full_featured_project_passes_the_worker_validator():
    project = StoryProject(
        project_id="p",
        scenes=[Scene(audio="data:audio/wav;base64,AAAA", prompt="a fox", seed=5, audio_start=1.5,
                      audio_duration=4.0, video_prompt="talking"),
                Scene(audio="https://x/a.mp3", image="https://x/i.png")],
        image=ImageSettings(width=768, height=512, steps=6, guidance=0.5, negative_prompt="blur"),
        video=VideoSettings(resolution="720p", max_area=4096, steps=20, guidance=5.0, shift=2.0,
                            infer_frames=40, negative_prompt="static"),
        seed=7,
    )
    parsed = tasks.parse_job_input(json.loads(json.dumps(project.to_input())))
    assert [s.scene_id for s in parsed.scenes] == ["scene-001", "scene-002"]
    assert parsed.video.area == 4096 and parsed.image.width == 768


def test_missing_scene_ids_follow_the_worker_rule():
    project = StoryProject.from_dict({"project_id": "p", "scenes": [
        {"prompt": "a", "audio": "x"}, {"scene_id": "intro", "image": "y", "audio": "z"},
        {"prompt": "c", "audio": "w"}]})
    ids = [s.scene_id for s in project.scenes]
    worker_ids = [s.scene_id for s in tasks.parse_job_input(
        {"task": "batch", "project_id": "p", "scenes": [
            {"prompt": "a", "audio": "x"}, {"scene_id": "intro", "image": "y", "audio": "z"},
            {"prompt": "c", "audio": "w"}]}).scenes]
    assert ids == worker_ids == ["scene-001", "intro", "scene-003"]


def test_empty_settings_are_left_out():
    project = StoryProject("p", [Scene(audio="a", prompt="x")], image=ImageSettings(), video=VideoSettings())
    assert project.to_input() == {"task": "batch", "project_id": "p",
                                  "scenes": [{"audio": "a", "scene_id": "scene-001", "prompt": "x"}]}


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.update(task="image"), "'task' must be 'batch'"),
    (lambda d: d.update(project_id=""), "project_id"),
    (lambda d: d.update(scenes=[]), "non-empty"),
    (lambda d: d.update(scenes="s1"), "must be a list"),
    (lambda d: d.update(seed=-1), "seed"),
    (lambda d: d.update(seed="1"), "seed"),
    (lambda d: d["scenes"][0].pop("audio"), "'audio' is required"),
    (lambda d: d["scenes"][0].pop("prompt"), "needs 'prompt'"),
    (lambda d: d["scenes"][0].update(prompt="   "), "needs 'prompt'"),
    (lambda d: d["scenes"][0].update(negative="x"), "unknown key"),
    (lambda d: d["scenes"][0].update(audio_duration=0), "audio_duration"),
    (lambda d: d["scenes"][0].update(audio_start=-1), "audio_start"),
    (lambda d: d["scenes"][0].update(seed=1.5), "seed"),
    (lambda d: d["scenes"].append(dict(d["scenes"][0])), "duplicate scene_id"),
    (lambda d: d.update(image={"width": "big"}), "width"),
    (lambda d: d.update(image={"cfg": 1}), "unknown key"),
    (lambda d: d.update(video={"resolution": "1080p"}), "resolution"),
    (lambda d: d.update(video={"steps": True}), "steps"),
])
def test_bad_projects_are_rejected_before_sending(mutate, match):
    data = json.loads(json.dumps(BRIEF_EXAMPLE["input"]))
    mutate(data)
    with pytest.raises(InvalidInput, match=match):
        StoryProject.from_dict(data)


def test_split_code_and_error_info():
    assert split_code("invalid_audio: not audio") == ("invalid_audio", "not audio")
    assert split_code("Something: else") == (None, "Something: else")
    e = ErrorInfo.from_any({"error": "out_of_memory: CUDA OOM", "stage": "video"})
    assert (e.code, e.stage) == ("out_of_memory", "video")
    assert ErrorInfo.from_any("plain text").code == "internal_error"


def test_parse_worker_output():
    project = StoryProject.from_dict({"project_id": "p", "seed": 10, "scenes": [
        {"scene_id": "s1", "prompt": "a", "audio": "x"},
        {"scene_id": "s2", "image": "https://x/i.png", "audio": "y"},
        {"scene_id": "s3", "prompt": "c", "audio": "z"}]})
    output = _worker_output(project.to_input(), JobPlan(scene_errors={"s3": ("bad file", "invalid_audio")}), "job-1")
    result = StoryResult.from_output(output, project=project, job_id="job-1")
    assert [s.scene_id for s in result.scenes] == ["s1", "s2", "s3"]
    s1, s2, s3 = result.scenes
    assert s1.ok and s1.image_url.endswith("s1.png") and s1.video_url.endswith("s1.mp4")
    assert (s1.image_seed, s1.video_seed) == (10, 10)
    assert s2.image_url is None and s2.extra["image_source"] == "input"
    assert not s3.ok and s3.error == ErrorInfo("invalid_audio: bad file", "invalid_audio", "audio")
    assert not result.ok and result.failed_scenes == [s3]
    assert result.total_time == 34.0 and result.manager["swaps"] == 1
    assert result.extra["scenes_failed"] == 1
    d = json.loads(json.dumps(result.to_dict()))
    assert d["ok"] is False and d["scenes"][2]["error"]["code"] == "invalid_audio"
    assert d["scenes"][0]["frames"] == 96 and d["job_id"] == "job-1"
    assert result.scene("s2") is s2


def test_missing_scene_in_output_is_reported():
    project = StoryProject.from_dict({"project_id": "p", "scenes": [
        {"scene_id": "s1", "prompt": "a", "audio": "x"}, {"scene_id": "s2", "prompt": "b", "audio": "y"}]})
    result = StoryResult.from_output({"project_id": "p", "scenes": [{"scene_id": "s1", "video_url": "u"}]},
                                     project=project)
    assert result.scene("s2").error.code == "missing_result"


@pytest.mark.parametrize("output", [None, [], {"scenes": "x"}, {"scenes": [{"no_id": 1}]}])
def test_bad_output_is_a_clear_error(output):
    with pytest.raises(BackendError) as info:
        StoryResult.from_output(output)
    assert info.value.code == "bad_output"
