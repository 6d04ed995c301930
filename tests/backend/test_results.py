"""Typed results of a batch job, parsed from what the worker (here: the fake's copy of
``run_batch``'s output shape) returns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storystudio.backend.errors import BackendError
from storystudio.backend.results import ErrorInfo, SceneResult, StoryResult, split_code
from storystudio.backend.story import Story

from .fake_runpod import JobPlan, _worker_output


def test_split_code_and_error_info():
    assert split_code("invalid_audio: not audio") == ("invalid_audio", "not audio")
    assert split_code("Something: else") == (None, "Something: else")
    e = ErrorInfo.from_any({"error": "out_of_memory: CUDA OOM", "stage": "video"})
    assert (e.code, e.stage) == ("out_of_memory", "video")
    assert ErrorInfo.from_any("plain text").code == "internal_error"


def test_parse_worker_output():
    story = Story.from_mapping({"project_id": "p", "seed": 10, "scenes": [
        {"scene_id": "s1", "prompt": "a", "audio": "https://x/a.mp3"},
        {"scene_id": "s2", "image": "https://x/i.png", "audio": "https://x/b.mp3"},
        {"scene_id": "s3", "prompt": "c", "audio": "https://x/c.mp3"}]})
    output = _worker_output(story.job_input, JobPlan(scene_errors={"s3": ("bad file", "invalid_audio")}), "job-1")
    result = StoryResult.from_output(output, scene_ids=story.scene_ids, job_id="job-1")
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


def test_to_dict_round_trips_with_paths():
    """result.json stores ``to_dict()``; reading it back gives the same result."""
    scene = SceneResult("s1", image_url="u", video_url="v", image_path=Path("/d/s1.png"),
                        video_path=Path("/d/s1.mp4"), extra={"bytes": 12, "sha256": "ab", "image_bytes": 3})
    result = StoryResult("p", [scene], job_id="j", total_time=1.0, download_dir=Path("/d"))
    back = StoryResult.from_output(json.loads(json.dumps(result.to_dict())))
    assert back == result
    assert back.scenes[0].expected("video") == (12, "ab") and back.scenes[0].expected("image") == (3, None)


def test_missing_scene_in_output_is_reported():
    result = StoryResult.from_output({"project_id": "p", "scenes": [{"scene_id": "s1", "video_url": "u"}]},
                                     scene_ids=["s1", "s2"])
    assert result.scene("s2").error.code == "missing_result"


@pytest.mark.parametrize("output", [None, [], {"scenes": "x"}, {"scenes": [{"no_id": 1}]}])
def test_bad_output_is_a_clear_error(output):
    with pytest.raises(BackendError) as info:
        StoryResult.from_output(output)
    assert info.value.code == "bad_output"
