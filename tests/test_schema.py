"""The committed JSON Schema of the job input: fresh, valid, and in agreement with the worker.

The schema is what other programs (the story app) validate against, so beyond being
regenerated from the models it must accept every payload the worker accepts and reject
the ones the worker rejects for reasons a schema can express (unknown fields, both
spellings of one field, a missing required field, out-of-range values).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from storystudio import schema_export
from storystudio.errors import InvalidInput
from storystudio.tasks import parse_job_input

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schema" / "job-input.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    assert cls is jsonschema.Draft202012Validator
    return cls(schema)


def test_committed_schema_is_fresh():
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_export.render_schema(), (
        "schema/job-input.schema.json is stale: run python -m storystudio.schema_export"
    )


def test_export_cli_writes_and_checks(tmp_path):
    out = tmp_path / "s.json"
    assert schema_export.main(["--check", "--out", str(out)]) == 1  # missing
    assert schema_export.main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == schema_export.render_schema()
    assert schema_export.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace('"sample_steps"', '"sample_stepz"'), encoding="utf-8")
    assert schema_export.main(["--check", "--out", str(out)]) == 1


def _readme_job_examples() -> list[dict]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    jobs = readme[readme.index("\n## Jobs\n") : readme.index("\n## Backend client\n")]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", jobs, flags=re.S)]


def test_readme_examples_are_valid_and_use_the_first_spec_spelling(validator):
    examples = _readme_job_examples()
    assert [e["input"]["task"] for e in examples] == ["image", "video", "batch"]
    for example in examples:
        validator.validate(example["input"])
        parse_job_input(example["input"])
    image, video, batch = (e["input"] for e in examples)
    assert {"image_url", "audio_url", "sample_steps"} <= video.keys()
    assert {"image_settings", "video_settings"} <= batch.keys() and "sample_steps" in batch["video_settings"]
    assert all("id" in s and "audio_url" in s for s in batch["scenes"])
    assert any("image_url" in s for s in batch["scenes"])


VIDEO = {"task": "video", "image": "https://x/i.png", "audio": "https://x/a.wav"}
SCENE = {"prompt": "a", "audio": "https://x/a.wav"}


def _batch(scenes=None, **extra) -> dict:
    return {"task": "batch", "project_id": "p", "scenes": scenes or [dict(SCENE)], **extra}


AGREEMENT = [
    # accepted by both
    ({"task": "image", "prompt": "x", "width": 512, "seed": 1}, True),
    (VIDEO, True),
    ({"task": "video", "image_url": "i", "audio_url": "a", "sample_steps": 4}, True),
    (_batch([{"id": "s", "image_url": "i", "audio_url": "a"}], image_settings={"steps": 2},
            video_settings={"sample_steps": 3, "resolution": "720p"}), True),
    (_batch([{"scene_id": "s", "prompt": "p", "audio": "a"}], image={"steps": 2}, video={"steps": 3}), True),
    # both spellings
    ({**VIDEO, "sample_steps": 3, "steps": 3}, False),
    ({**VIDEO, "image_url": "i"}, False),
    ({**VIDEO, "audio_url": "a"}, False),
    (_batch([{**SCENE, "id": "s", "scene_id": "s"}]), False),
    (_batch([{**SCENE, "audio_url": "a"}]), False),
    (_batch([{"image": "i", "image_url": "i", "audio": "a"}]), False),
    (_batch(image={}, image_settings={}), False),
    (_batch(video={}, video_settings={}), False),
    (_batch(video_settings={"steps": 2, "sample_steps": 2}), False),
    # unknown fields, aliases where they do not belong
    ({"task": "image", "prompt": "x", "sample_steps": 3}, False),
    ({"task": "video", "image_url": "i", "audio_url": "a", "colour": "red"}, False),
    (_batch(image_settings={"sample_steps": 2}), False),
    # required fields in either spelling, limits, tasks
    ({"task": "video", "image_url": "i"}, False),
    (_batch([{"prompt": "a"}]), False),
    ({**VIDEO, "sample_steps": 0}, False),
    (_batch(video_settings={"resolution": "4k"}), False),
    ({"task": "sing"}, False),
]


@pytest.mark.parametrize(("payload", "accepted"), AGREEMENT)
def test_schema_and_worker_agree(validator, payload, accepted):
    schema_ok = validator.is_valid(payload)
    try:
        parse_job_input(payload)
        worker_ok = True
    except InvalidInput:
        worker_ok = False
    assert (schema_ok, worker_ok) == (accepted, accepted)
