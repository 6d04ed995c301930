"""Limits in one place: the job schema and the engines refuse exactly the same requests,
and a refused request fails at validation, before any model is loaded or moved."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storystudio import limits as L
from storystudio.config import WorkerSettings
from storystudio.errors import InvalidInput
from storystudio.media import AudioClip, encode_audio, encode_png, synth_speech
from storystudio.models.image_generator import ImageRequest, validate_image_request
from storystudio.models.model_manager import ModelManager
from storystudio.models.video_generator import VideoRequest, validate_video_request
from storystudio.storage import LocalStorage
from storystudio.tasks import parse_job_input
from storystudio.worker import Worker

IMAGE_CASES = [
    ("width", v) for v in (L.IMAGE_SIZE_MIN - 16, L.IMAGE_SIZE_MIN, L.IMAGE_SIZE_MAX, L.IMAGE_SIZE_MAX + 16,
                           L.IMAGE_SIZE_MIN + L.IMAGE_SIZE_MULTIPLE, L.IMAGE_SIZE_MIN + L.IMAGE_SIZE_MULTIPLE // 2)
] + [("height", v) for v in (L.IMAGE_SIZE_MIN - 1, 512, L.IMAGE_SIZE_MAX + 1)] + [
    ("steps", v) for v in (0, 1, L.IMAGE_STEPS_MAX, L.IMAGE_STEPS_MAX + 1)
] + [("guidance", v) for v in (-0.1, 0.0, L.IMAGE_GUIDANCE_MAX, L.IMAGE_GUIDANCE_MAX + 0.5)] + [
    ("prompt", v) for v in ("   ", "\n", "a", " a ")
] + [("seed", v) for v in (-1, 0, L.SEED_MAX, L.SEED_MAX + 1)]

VIDEO_CASES = [
    ("max_area", v) for v in (2000, L.VIDEO_AREA_MIN - 1, L.VIDEO_AREA_MIN, L.VIDEO_AREA_MAX, L.VIDEO_AREA_MAX + 1)
] + [("steps", v) for v in (0, 1, L.VIDEO_STEPS_MAX, L.VIDEO_STEPS_MAX + 1)] + [
    ("guidance", v) for v in (-0.5, 0.0, L.VIDEO_GUIDANCE_MAX, L.VIDEO_GUIDANCE_MAX + 0.5)
] + [("shift", v) for v in (0.0, 0.01, L.VIDEO_SHIFT_MAX, L.VIDEO_SHIFT_MAX + 0.5)] + [
    ("infer_frames", v) for v in (0, L.INFER_FRAMES_MIN - 1, L.INFER_FRAMES_MIN, L.INFER_FRAMES_MIN + 2,
                                  L.INFER_FRAMES_MAX, L.INFER_FRAMES_MAX + L.INFER_FRAMES_MULTIPLE)
] + [("resolution", v) for v in ("480p", "720p", "1080p")] + [("seed", v) for v in (-1, L.SEED_MAX + 1)] + [
    ("audio_duration", v) for v in (0.02, L.AUDIO_DURATION_MIN_S, 0.03)
]


def _schema_accepts(job: dict) -> bool:
    try:
        parse_job_input(job)
    except InvalidInput as exc:
        assert exc.code == "invalid_input"
        return False
    return True


def _engine_accepts(check, request) -> bool:
    try:
        check(request)
    except InvalidInput:
        return False
    return True


@pytest.mark.parametrize(("field", "value"), IMAGE_CASES, ids=[f"{f}={v!r}" for f, v in IMAGE_CASES])
def test_image_schema_and_engine_agree(field, value):
    job = {"task": "image", "prompt": "a lighthouse", field: value}
    request = ImageRequest(**{"prompt": "a lighthouse", field: value})
    schema, engine = _schema_accepts(job), _engine_accepts(validate_image_request, request)
    assert schema == engine, f"{field}={value!r}: schema {'accepts' if schema else 'refuses'}, engine the opposite"


@pytest.mark.parametrize(("field", "value"), VIDEO_CASES, ids=[f"{f}={v!r}" for f, v in VIDEO_CASES])
def test_video_schema_and_engine_agree(field, value):
    job = {"task": "video", "image": "https://example.com/a.png", "audio": "https://example.com/a.wav", field: value}
    audio = np.full(L.SPEECH_SAMPLE_RATE, 0.1, np.float32)
    kwargs = {field: value}
    if field == "audio_duration":  # the engine sees the trimmed audio's samples
        audio = np.full(round(value * L.SPEECH_SAMPLE_RATE), 0.1, np.float32)
        kwargs = {}
    request = VideoRequest(image=Image.new("RGB", (64, 64)), audio=audio, **kwargs)
    schema, engine = _schema_accepts(job), _engine_accepts(validate_video_request, request)
    assert schema == engine, f"{field}={value!r}: schema {'accepts' if schema else 'refuses'}, engine the opposite"
    # The batch's video settings and scenes use the same definitions.
    if field == "audio_duration":
        scene = {"prompt": "x", "audio": "https://example.com/a.wav", field: value}
        batch = {"task": "batch", "project_id": "p", "scenes": [scene]}
    else:
        batch = {"task": "batch", "project_id": "p", "scenes": [{"prompt": "x", "audio": "a"}], "video": {field: value}}
    assert _schema_accepts(batch) == schema


# ------------------------------------------------------------------ nothing moves for a refused request
def _worker(tmp_path: Path) -> tuple[Worker, list[str]]:
    loads: list[str] = []
    manager = ModelManager("cpu")

    def loader(name):
        def load(device):
            loads.append(name)
            raise AssertionError(f"model set {name} must not load for a refused request")

        return load

    manager.register("image", loader("image"))
    manager.register("video", loader("video"))
    settings = WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"})
    return Worker(settings, manager, LocalStorage(tmp_path / "out")), loads


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


PNG = _data_uri("image/png", encode_png(Image.new("RGB", (64, 64), (200, 10, 10))))
WAV = _data_uri("audio/wav", encode_audio(synth_speech(1.0, seed=1), "wav"))


@pytest.mark.parametrize(("job", "fragment"), [
    ({"task": "video", "image": PNG, "audio": WAV, "max_area": 2000}, "max_area: Input should be greater than or equal to 4096"),
    ({"task": "batch", "project_id": "p", "scenes": [{"prompt": "x", "audio": WAV}], "video_settings": {"max_area": 2000}},
     "video.max_area"),
    ({"task": "video", "image": PNG, "audio": WAV, "audio_duration": 0.01}, "audio_duration"),
    ({"task": "image", "prompt": "   "}, "prompt: String should match pattern"),
    ({"task": "video", "image": PNG, "audio": WAV, "shift": 0}, "shift"),
], ids=["video-max_area-2000", "batch-max_area-2000", "audio-too-short", "blank-prompt", "shift-0"])
def test_refused_request_fails_before_any_model_moves(tmp_path, job, fragment):
    worker, loads = _worker(tmp_path)
    r = worker.handle({"id": "j", "input": job})
    assert r["code"] == "invalid_input", r
    assert fragment in r["error"], r["error"]
    assert loads == [], "a model set was loaded for a request the schema should have refused"
    stats = worker.manager.stats()
    assert stats.loads == {} and stats.resident == [] and stats.swaps == 0
    assert not (tmp_path / "out").exists(), "nothing may be stored for a refused request"


def test_decoded_audio_too_short_for_the_engine_fails_before_any_model_moves(tmp_path):
    """The schema cannot see the file's length; the engine's check runs before the manager is asked."""
    worker, loads = _worker(tmp_path)
    short = AudioClip(np.full(200, 0.1, np.float32), 16_000)  # 12.5 ms: below the speech encoder's window
    wav = _data_uri("audio/wav", encode_audio(short, "wav"))
    r = worker.handle({"id": "j", "input": {"task": "video", "image": PNG, "audio": wav}})
    assert r["code"] == "invalid_input", r
    assert "audio is too short: 200 samples, need at least 400" in r["error"], r["error"]
    assert loads == [] and worker.manager.stats().loads == {}
