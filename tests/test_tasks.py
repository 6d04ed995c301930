"""Job input validation: defaults, limits and error codes, without touching a model."""

from __future__ import annotations

import pytest

from storystudio.errors import InvalidInput
from storystudio.tasks import BatchTask, ImageTask, VideoTask, parse_job_input


def test_image_defaults():
    t = parse_job_input({"task": "image", "prompt": "a fox"})
    assert isinstance(t, ImageTask)
    assert (t.width, t.height, t.steps, t.guidance, t.seed, t.return_base64) == (1024, 1024, 8, 0.0, None, False)


def test_video_defaults_and_area():
    t = parse_job_input({"task": "video", "image": "https://x/i.png", "audio": "https://x/a.wav"})
    assert isinstance(t, VideoTask)
    assert (t.resolution, t.steps, t.guidance, t.shift, t.infer_frames) == ("480p", 40, 4.5, 3.0, 80)
    assert t.area == 480 * 832
    assert parse_job_input({**t.model_dump(), "resolution": "720p"}).area == 720 * 1280
    assert parse_job_input({**t.model_dump(), "max_area": 4096}).area == 4096


def test_batch_assigns_scene_ids_and_checks_uniqueness():
    t = parse_job_input(
        {
            "task": "batch",
            "project_id": "p1",
            "scenes": [{"prompt": "a", "audio": "x"}, {"scene_id": "intro", "image": "y", "audio": "z"}],
        }
    )
    assert isinstance(t, BatchTask)
    assert [s.scene_id for s in t.scenes] == ["scene-001", "intro"]
    with pytest.raises(InvalidInput, match="unique"):
        parse_job_input(
            {
                "task": "batch",
                "project_id": "p1",
                "scenes": [{"scene_id": "a", "prompt": "a", "audio": "x"}, {"scene_id": "a", "prompt": "b", "audio": "y"}],
            }
        )


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        ({"task": "sing", "prompt": "x"}, "unknown_task", "unknown task 'sing'"),
        ({"prompt": "x"}, "invalid_input", "missing field 'task'"),
        ("not an object", "invalid_input", "JSON object"),
        ({"task": "image"}, "invalid_input", "prompt: Field required"),
        ({"task": "image", "prompt": "x", "colour": "red"}, "invalid_input", "colour: unknown field"),
        ({"task": "image", "prompt": "x", "width": 100000}, "invalid_input", "width: Input should be less than or equal to 2048"),
        ({"task": "image", "prompt": "x", "width": 1000}, "invalid_input", "width: Input should be a multiple of 16"),
        ({"task": "image", "prompt": "x", "steps": -3}, "invalid_input", "steps: Input should be greater than or equal to 1"),
        ({"task": "image", "prompt": "x", "seed": -1}, "invalid_input", "seed"),
        ({"task": "video", "image": "i"}, "invalid_input", "audio: Field required"),
        ({"task": "video", "image": "i", "audio": "a", "resolution": "4k"}, "invalid_input", "resolution"),
        ({"task": "video", "image": "i", "audio": "a", "infer_frames": 81}, "invalid_input", "infer_frames"),
        ({"task": "video", "image": "i", "audio": "a", "audio_start": -1}, "invalid_input", "audio_start"),
        ({"task": "batch", "project_id": "p", "scenes": []}, "invalid_input", "scenes"),
        ({"task": "batch", "project_id": "p", "scenes": [{"audio": "a"}]}, "invalid_input", "either 'prompt'"),
        ({"task": "batch", "project_id": "p", "scenes": [{"prompt": "a", "audio": "a"}], "video": {"steps": 0}}, "invalid_input", "video.steps"),
    ],
)
def test_bad_input_table(raw, code, fragment):
    with pytest.raises(InvalidInput) as ei:
        parse_job_input(raw)
    assert ei.value.code == code
    assert fragment in ei.value.message, ei.value.message
    assert ei.value.to_result() == {"error": f"{code}: {ei.value.message}", "code": code}
