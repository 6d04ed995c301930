"""Job input validation: defaults, limits and error codes, without touching a model."""

from __future__ import annotations

import pytest

from storystudio.errors import InvalidInput
from storystudio.first_spec import add_first_spec_names, resolution_label
from storystudio.tasks import (
    FIRST_SPEC_ALIASES,
    BatchTask,
    ImageParams,
    ImageTask,
    Scene,
    VideoParams,
    VideoTask,
    first_spec_aliases,
    parse_job_input,
)


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


# ---------------------------------------------------------------- first-specification names
VIDEO_MIN = {"task": "video", "image": "https://x/i.png", "audio": "https://x/a.wav"}
SCENE_MIN = {"prompt": "a", "audio": "https://x/a.wav"}


def _batch(scenes=None, **extra) -> dict:
    return {"task": "batch", "project_id": "p", "scenes": scenes or [dict(SCENE_MIN)], **extra}


# (model, first-spec name) -> (payload using it, payload using today's name)
ALIAS_CASES = {
    ("VideoTask", "sample_steps"): ({**VIDEO_MIN, "sample_steps": 3}, {**VIDEO_MIN, "steps": 3}),
    ("VideoTask", "image_url"): ({"task": "video", "image_url": "https://x/i.png", "audio": "https://x/a.wav"}, VIDEO_MIN),
    ("VideoTask", "audio_url"): ({"task": "video", "image": "https://x/i.png", "audio_url": "https://x/a.wav"}, VIDEO_MIN),
    ("VideoParams", "sample_steps"): (_batch(video={"sample_steps": 3}), _batch(video={"steps": 3})),
    ("Scene", "id"): (_batch([{**SCENE_MIN, "id": "intro"}]), _batch([{**SCENE_MIN, "scene_id": "intro"}])),
    ("Scene", "image_url"): (_batch([{"image_url": "https://x/i.png", "audio": "y"}]), _batch([{"image": "https://x/i.png", "audio": "y"}])),
    ("Scene", "audio_url"): (_batch([{"prompt": "a", "audio_url": "y"}]), _batch([{"prompt": "a", "audio": "y"}])),
    ("BatchTask", "image_settings"): (_batch(image_settings={"width": 512}), _batch(image={"width": 512})),
    ("BatchTask", "video_settings"): (
        _batch(video_settings={"resolution": "720p", "sample_steps": 5}),
        _batch(video={"resolution": "720p", "steps": 5}),
    ),
}


def test_alias_cases_cover_every_alias_of_the_table():
    """Adding an alias to FIRST_SPEC_ALIASES without a case here fails this test.

    Every model a job input is made of, with its inherited aliases: VideoParams' names
    are tested both in a video job and in a batch's video settings.
    """
    models = (ImageTask, VideoTask, BatchTask, Scene, ImageParams, VideoParams)
    assert set(FIRST_SPEC_ALIASES) <= set(models)
    accepted = {(model.__name__, old) for model in models for old in first_spec_aliases(model)}
    assert accepted == set(ALIAS_CASES)


def test_alias_table_is_consistent_with_the_models():
    for model, names in FIRST_SPEC_ALIASES.items():
        for old, new in names.items():
            assert new in model.model_fields, (model, new)
            assert old not in model.model_fields, (model, old)
    # bases' aliases are inherited: a video job takes VideoParams' sample_steps
    assert first_spec_aliases(VideoTask) == {"sample_steps": "steps", "image_url": "image", "audio_url": "audio"}
    assert first_spec_aliases(ImageTask) == {}


@pytest.mark.parametrize("case", sorted(ALIAS_CASES), ids="-".join)
def test_first_spec_name_parses_like_todays(case):
    first, today = ALIAS_CASES[case]
    assert parse_job_input(first).model_dump() == parse_job_input(today).model_dump()


def test_first_spec_values_land_in_todays_fields():
    v = parse_job_input({"task": "video", "image_url": "i", "audio_url": "a", "sample_steps": 3})
    assert (v.image, v.audio, v.steps) == ("i", "a", 3)
    b = parse_job_input(
        _batch(
            [{"id": "s1", "prompt": "p", "audio_url": "a1"}, {"id": "s2", "image_url": "i2", "audio_url": "a2"}],
            image_settings={"width": 512, "steps": 4},
            video_settings={"sample_steps": 7, "resolution": "720p"},
        )
    )
    assert isinstance(b, BatchTask)
    assert [(s.scene_id, s.image, s.audio) for s in b.scenes] == [("s1", None, "a1"), ("s2", "i2", "a2")]
    assert (b.image.width, b.image.steps, b.video.steps, b.video.resolution) == (512, 4, 7, "720p")
    assert "sample_steps" not in b.model_dump()["video"] and "id" not in b.model_dump()["scenes"][0]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({**VIDEO_MIN, "steps": 3, "sample_steps": 3}, "invalid video input: both 'steps' and 'sample_steps' given; use one"),
        ({**VIDEO_MIN, "image_url": "https://x/i.png"}, "invalid video input: both 'image' and 'image_url' given; use one"),
        ({**VIDEO_MIN, "audio_url": "https://x/b.wav"}, "invalid video input: both 'audio' and 'audio_url' given; use one"),
        (_batch(video={"steps": 2, "sample_steps": 2}), "video: both 'steps' and 'sample_steps' given; use one"),
        (_batch([{**SCENE_MIN, "scene_id": "a", "id": "a"}]), "scenes.0: both 'scene_id' and 'id' given; use one"),
        (_batch([SCENE_MIN, {**SCENE_MIN, "image": "i", "image_url": "i"}]), "scenes.1: both 'image' and 'image_url' given; use one"),
        (_batch([{**SCENE_MIN, "audio_url": "b"}]), "scenes.0: both 'audio' and 'audio_url' given; use one"),
        (_batch(image={}, image_settings={}), "invalid batch input: both 'image' and 'image_settings' given; use one"),
        (_batch(video={}, video_settings={}), "invalid batch input: both 'video' and 'video_settings' given; use one"),
    ],
)
def test_both_spellings_of_one_field_is_invalid_input_naming_both(raw, fragment):
    with pytest.raises(InvalidInput) as ei:
        parse_job_input(raw)
    assert ei.value.code == "invalid_input"
    assert fragment in ei.value.message, ei.value.message


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"task": "image", "prompt": "x", "sample_steps": 3}, "sample_steps: unknown field"),
        ({"task": "image", "prompt": "x", "image_url": "i"}, "image_url: unknown field"),
        ({"task": "video", "image_url": "i", "audio_url": "a", "sample_stepz": 3}, "sample_stepz: unknown field"),
        ({"task": "video", "image_url": "i", "audio_url": "a", "id": "v"}, "id: unknown field"),
        (_batch(image_settings={"sample_steps": 3}), "image.sample_steps: unknown field"),
        (_batch(image_url="i"), "image_url: unknown field"),
        (_batch([{**SCENE_MIN, "video_settings": {}}]), "scenes.0.video_settings: unknown field"),
    ],
)
def test_unknown_fields_are_still_rejected_next_to_aliases(raw, fragment):
    with pytest.raises(InvalidInput) as ei:
        parse_job_input(raw)
    assert ei.value.code == "invalid_input"
    assert fragment in ei.value.message, ei.value.message


def test_first_spec_names_obey_todays_limits_and_rules():
    with pytest.raises(InvalidInput, match="steps: Input should be greater than or equal to 1"):
        parse_job_input({**VIDEO_MIN, "sample_steps": 0})
    with pytest.raises(InvalidInput, match="unique"):
        parse_job_input(_batch([{**SCENE_MIN, "id": "a"}, {**SCENE_MIN, "scene_id": "a"}]))
    with pytest.raises(InvalidInput, match="image_url"):
        parse_job_input(_batch([{"audio_url": "a"}]))
    with pytest.raises(InvalidInput, match="audio: Field required"):
        parse_job_input({"task": "video", "image_url": "i"})


def test_resolution_label():
    assert resolution_label(VideoParams()) == "480p"
    assert resolution_label(VideoParams(resolution="720p")) == "720p"
    assert resolution_label(VideoParams(resolution="720p", max_area=64 * 64)) == "custom"


def test_add_first_spec_names_per_task():
    image = add_first_spec_names(
        parse_job_input({"task": "image", "prompt": "x"}),
        {"timings": {"generate": 1.25, "encode": 0.1, "upload": 0.0504}},
    )
    assert image["generation_time"] == 1.4 and "resolution" not in image
    video = add_first_spec_names(
        parse_job_input({**VIDEO_MIN, "resolution": "720p"}),
        {"width": 1280, "height": 720, "timings": {"inputs": 0.5, "generate": 2.0, "upload": 0.25}},
    )
    assert (video["generation_time"], video["resolution"], video["width"]) == (2.75, "720p", 1280)
    batch = add_first_spec_names(
        parse_job_input(_batch([{**SCENE_MIN, "id": "b"}, SCENE_MIN])),
        {"scenes": [{"scene_id": "b", "video_url": "u"}, {"scene_id": "scene-002", "error": {"code": "x"}}]},
    )
    assert batch["scenes"] == [
        {"scene_id": "b", "id": "b", "video_url": "u"},
        {"scene_id": "scene-002", "id": "scene-002", "error": {"code": "x"}},
    ]
    assert list(batch["scenes"][0]) == ["scene_id", "id", "video_url"]
