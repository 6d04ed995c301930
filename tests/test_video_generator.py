"""WanS2VGenerator on the tiny Wan2.2-S2V checkpoint (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from storystudio.errors import GenerationError, InvalidInput
from storystudio.models.video_generator import (
    VideoRequest,
    WanS2VGenerator,
    get_size_less_than_area,
)

AREA = 64 * 64


@pytest.fixture(scope="session")
def wan_gen(tiny_models) -> WanS2VGenerator:
    return WanS2VGenerator.from_pretrained(tiny_models[1], device="cpu")


def _image() -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8))


def _audio(seconds: float) -> np.ndarray:
    rng = np.random.RandomState(1)
    return (rng.randn(int(16000 * seconds)) * 0.1).astype(np.float32)


def _req(seconds: float = 1.0, **kw) -> VideoRequest:
    # infer_frames=16 keeps the VAE work small where the clip length does not matter.
    base = dict(image=_image(), audio=_audio(seconds), prompt="a person talking", max_area=AREA, steps=2, seed=7,
                infer_frames=16)
    base.update(kw)
    return VideoRequest(**base)


def test_loads_official_components_from_the_folder(wan_gen):
    from wan.modules.s2v.model_s2v import WanModel_S2V
    from wan.modules.t5 import T5Encoder
    from wan.modules.vae2_1 import WanVAE_

    comps = wan_gen.components()
    # transformer_linears: the bf16 weights of the FP8-able linears, a group of the
    # transformer's own Parameter objects (fast preset; tests/test_speed.py).
    assert set(comps) == {"transformer_linears", "transformer", "text_encoder", "vae", "audio_encoder"}
    assert isinstance(comps["transformer"], WanModel_S2V)
    assert isinstance(comps["text_encoder"], T5Encoder)
    assert isinstance(comps["vae"], WanVAE_) and comps["vae"].dim == 8
    assert type(comps["audio_encoder"]).__name__ == "Wav2Vec2ForCTC"
    for name, m in comps.items():
        assert all(p.device.type == "cpu" and not p.is_meta for p in m.parameters()), name
    assert next(comps["transformer"].parameters()).dtype == torch.float32  # CPU default
    assert next(comps["vae"].parameters()).dtype == torch.float32


def test_one_second_gives_16_frames(wan_gen):
    calls = []
    a = wan_gen.generate(_req(1.0, infer_frames=80), progress=lambda d, t: calls.append((d, t)))
    assert a.frames.shape == (16, 64, 64, 3) and a.frames.dtype == np.uint8
    assert (a.fps, a.width, a.height, a.num_clips, a.seed) == (16, 64, 64, 1, 7)
    assert calls == [(1, 1)] and a.seconds > 0
    assert a.frames.std() > 0


def test_frames_are_deterministic_per_seed(wan_gen):
    a = wan_gen.generate(_req(1.0))
    b = wan_gen.generate(_req(1.0))
    assert np.array_equal(a.frames, b.frames)
    c = wan_gen.generate(_req(1.0, seed=8))
    assert not np.array_equal(a.frames, c.frames)


def test_six_seconds_gives_96_frames_in_two_clips(wan_gen):
    calls = []
    r = wan_gen.generate(_req(6.0, infer_frames=80, steps=1), progress=lambda d, t: calls.append((d, t)))
    assert r.frames.shape == (96, 64, 64, 3)
    assert r.num_clips == 2 and calls == [(1, 2), (2, 2)]


def test_pose_frames_are_accepted_and_condition_the_video(wan_gen):
    pose = (np.random.RandomState(3).rand(20, 50, 40, 3) * 255).astype(np.uint8)
    plain = wan_gen.generate(_req(1.0))
    posed = wan_gen.generate(_req(1.0, pose_frames=pose))
    assert posed.frames.shape == plain.frames.shape == (16, 64, 64, 3)
    assert not np.array_equal(posed.frames, plain.frames)


def test_dpm_solver_and_no_cfg(wan_gen):
    r = wan_gen.generate(_req(0.5, solver="dpm++", guidance=1.0, negative_prompt=""))
    assert r.frames.shape == (8, 64, 64, 3) and r.num_clips == 1


def test_weights_are_only_reached_through_components(wan_gen):
    # The ModelManager reassigns param.data; the engine must follow it.
    before = wan_gen.generate(_req(0.5))
    for m in wan_gen.components().values():
        for p in m.parameters():
            p.data = p.data.clone()
    after = wan_gen.generate(_req(0.5))
    assert np.array_equal(before.frames, after.frames)


def test_weights_not_on_the_device_are_refused(wan_gen):
    # As if the manager had parked the set: weights elsewhere than self.device.
    saved = wan_gen.device
    wan_gen.device = torch.device("meta")
    try:
        with pytest.raises(GenerationError, match="not resident"):
            wan_gen.generate(_req(0.5))
    finally:
        wan_gen.device = saved


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("infer_frames", 30, "multiple of 4"),
        ("infer_frames", 0, "multiple of 4"),
        ("steps", 0, "steps"),
        ("guidance", float("nan"), "guidance"),
        ("solver", "euler", "solver"),
        ("resolution", "1080p", "resolution"),
        ("max_area", 10, "max_area"),
        ("seed", -1, "seed"),
        ("audio", np.zeros(10, np.float32), "too short"),
        ("audio", np.zeros((2, 16000), np.float32), "1-D"),
        ("pose_frames", np.zeros((4, 8, 8), np.uint8), "pose_frames"),
    ],
)
def test_invalid_requests(wan_gen, field, value, match):
    kw = {field: value}
    if field == "resolution":
        kw["max_area"] = None
    with pytest.raises(InvalidInput, match=match):
        wan_gen.generate(_req(1.0, **kw))


def test_official_size_selection():
    for h, w, area in [(720, 1280, 480 * 832), (1280, 720, 720 * 1280), (1000, 1000, 480 * 832), (96, 80, AREA)]:
        th, tw = get_size_less_than_area(h, w, target_area=area)
        assert th % 64 == 0 and tw % 64 == 0 and th * tw <= area
    assert get_size_less_than_area(720, 1280, target_area=480 * 832) == (448, 832)
