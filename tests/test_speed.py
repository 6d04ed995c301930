"""The fast preset end to end: job schema and messages, the plan against the device, the knobs on
the tiny Wan engine (FP8 emulated on CPU, step cache), and fast jobs through Worker.handle."""

from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from storystudio.errors import InvalidInput
from storystudio.fast_preset import SpeedKnobs
from storystudio.limits import FAST_STEP_CACHE_THRESHOLD, STEP_CACHE_MIN_STEPS
from storystudio.media import encode_png, probe_media
from storystudio.models import attention_fp8, fp8, speed
from storystudio.models.video_generator import VideoRequest, WanS2VGenerator
from storystudio.tasks import BatchTask, VideoTask, parse_job_input
from tests.test_worker import VIDEO, data_uri, make_worker

# What a fast job reports where no 8-bit kernel runs: cuDNN FP8's reason depends on whether the
# frontend wheel is installed here (CI installs it, it then needs CUDA), SageAttention is never installed.
UNAVAILABLE_8BIT = f"unavailable: {attention_fp8.load()[1]}; sageattention is not installed"

PNG = base64.b64encode(encode_png(Image.new("RGB", (64, 64), "gray"))).decode()


# ---------------------------------------------------------------- preset and knobs
def test_preset_sets_defaults_and_explicit_knobs_win():
    assert SpeedKnobs.resolve("exact") == SpeedKnobs("exact", "off", "off", 0.0)
    assert SpeedKnobs.resolve("exact").is_exact
    assert SpeedKnobs.resolve("fast") == SpeedKnobs("fast", "auto", "auto", FAST_STEP_CACHE_THRESHOLD)
    assert SpeedKnobs.resolve("fast", fp8=False, step_cache=0) == SpeedKnobs("fast", "off", "auto", 0.0)
    assert SpeedKnobs.resolve("exact", fp8=True) == SpeedKnobs("exact", "on", "off", 0.0)
    assert SpeedKnobs.resolve("exact", step_cache=0.2).step_cache == 0.2


def _video(**kw) -> dict:
    return {"task": "video", "image": PNG, "audio": "QUJD", **kw}


def test_video_job_parses_preset_and_knobs():
    task = parse_job_input(_video(preset="fast", fp8=False))
    assert isinstance(task, VideoTask)
    assert task.speed_knobs == SpeedKnobs("fast", "off", "auto", FAST_STEP_CACHE_THRESHOLD)
    assert parse_job_input(_video()).speed_knobs.is_exact
    b = parse_job_input({"task": "batch", "project_id": "p", "scenes": [{"image": PNG, "audio": "QUJD"}],
                         "video": {"preset": "fast", "step_cache": 0.1}})
    assert isinstance(b, BatchTask) and b.video.speed_knobs.step_cache == 0.1


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"preset": "turbo"}, "preset: Input should be 'exact' or 'fast'"),
        ({"step_cache": 1.5}, "step_cache: Input should be less than or equal to 1"),
        ({"step_cache": -0.1}, "step_cache: Input should be greater than or equal to 0"),
        ({"step_cache": float("nan")}, "step_cache: Input should be a finite number"),
        ({"step_cache": 0.1, "steps": STEP_CACHE_MIN_STEPS - 1},
         f"step_cache needs at least {STEP_CACHE_MIN_STEPS} steps (the first 2 and last 2 are always computed); "
         f"steps is {STEP_CACHE_MIN_STEPS - 1}"),
        ({"preset": "fast", "fp8": False, "attention_8bit": False, "step_cache": 0},
         "preset 'fast' with fp8, attention_8bit and step_cache all turned off is the exact path"),
        ({"fp8": "sometimes"}, "fp8: Input should be a valid boolean"),
        ({"fp16": True}, "fp16: unknown field"),
    ],
)
def test_bad_speed_requests_are_invalid_input_with_the_reason(fields, message):
    with pytest.raises(InvalidInput) as ei:
        parse_job_input(_video(**fields))
    assert ei.value.code == "invalid_input" and message in ei.value.message, ei.value.message
    with pytest.raises(InvalidInput) as ei:  # the same rules for a batch's shared video settings
        parse_job_input({"task": "batch", "project_id": "p", "scenes": [{"image": PNG, "audio": "QUJD"}],
                         "video": fields})
    assert message in ei.value.message and "video" in ei.value.message


def test_a_preset_default_that_cannot_apply_is_not_an_error():
    task = parse_job_input(_video(preset="fast", steps=2))  # nothing to skip in 2 steps: reported, not refused
    assert task.speed_knobs.step_cache == FAST_STEP_CACHE_THRESHOLD


# ---------------------------------------------------------------- the plan against the device
def test_plan_on_cpu_emulates_fp8_and_reports_8bit_attention_unavailable():
    plan = speed.resolve_plan(SpeedKnobs.resolve("fast"), torch.device("cpu"))
    assert plan.fp8 is not None and plan.fp8.backend == "emulated" and plan.fp8_detail == "emulated (row-wise scales)"
    assert not plan.attention_8bit and plan.attention_8bit_detail == UNAVAILABLE_8BIT
    assert speed.idle_components(plan) == {speed.BF16_LINEARS}
    assert speed.idle_components(speed.EXACT) == {speed.FP8_WEIGHTS}
    assert speed.resolve_plan(SpeedKnobs(), "cpu").is_exact


def test_fp8_demanded_where_it_cannot_run_is_a_clear_error_and_fast_falls_back(monkeypatch):
    no = fp8.FP8Support(None, reason="NVIDIA A100 is compute capability 8.0; FP8 matmul needs 8.9+")
    monkeypatch.setattr(speed, "fp8_support", lambda device: no)
    with pytest.raises(InvalidInput) as ei:
        speed.resolve_plan(SpeedKnobs.resolve("exact", fp8=True), "cpu")
    assert ei.value.code == "fp8_unsupported" and "compute capability 8.0" in ei.value.message
    plan = speed.resolve_plan(SpeedKnobs.resolve("fast"), "cpu")
    assert plan.fp8 is None and plan.fp8_detail.startswith("unavailable: NVIDIA A100")
    assert speed.idle_components(plan) == {speed.FP8_WEIGHTS}


# ---------------------------------------------------------------- the knobs on the tiny engine
@pytest.fixture(scope="module")
def engine(tiny_models) -> WanS2VGenerator:
    return WanS2VGenerator.from_pretrained(tiny_models[1], device="cpu")


def _req(plan: speed.SpeedPlan, steps: int = 6) -> VideoRequest:
    rng = np.random.RandomState(0)
    return VideoRequest(image=Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8)),
                        audio=(np.random.RandomState(1).randn(8000) * 0.1).astype(np.float32), prompt="talking",
                        max_area=64 * 64, steps=steps, seed=7, infer_frames=16, speed=plan)


def _plan(**kw) -> speed.SpeedPlan:
    return speed.resolve_plan(SpeedKnobs.resolve("exact", **kw), "cpu")


def _latents(engine, plan, steps: int = 6, audio_s: float = 0.5):
    got = []
    req = replace(_req(plan, steps), audio=(np.random.RandomState(1).randn(int(16000 * audio_s)) * 0.1).astype(np.float32))
    out = engine.generate(req, on_latents=lambda clip, lat: got.append(lat.clone()))
    return out, torch.cat([g.flatten() for g in got])


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_step_cache_skips_with_a_loose_threshold_and_changes_nothing_when_it_skips_nothing(engine):
    exact, lat_exact = _latents(engine, speed.EXACT)
    assert exact.speed["preset"] == "exact" and exact.speed["skipped_steps"] == [0]
    # A threshold nothing stays under: every call goes through the recording path, bit for bit.
    idle, lat_idle = _latents(engine, _plan(step_cache=1e-9))
    assert idle.speed["skipped_steps"] == [0] and torch.equal(lat_idle, lat_exact)
    assert np.array_equal(idle.frames, exact.frames)
    loose, lat_loose = _latents(engine, _plan(step_cache=1.0))
    assert loose.speed["skipped_steps"] == [2] and loose.speed["skipped_step_indices"] == [[2, 3]]
    assert 0 < _rel(lat_loose, lat_exact) < 0.5
    assert "blocks" not in engine.transformer.__dict__


def test_step_cache_runs_inside_the_compiled_blocks_and_injection(engine):
    """The step cache wraps the compiled audio injection that DiTCompiler installs, and puts it back."""
    plan = _plan(step_cache=1.0)
    eager, lat_eager = _latents(engine, plan, audio_s=13 / 16)  # one full-length clip: compiled
    saved = engine.options
    engine.options, engine._compiler = replace(saved, compile="on", compile_backend="eager"), None
    try:
        compiled, lat_compiled = _latents(engine, plan, audio_s=13 / 16)
    finally:
        engine.options, engine._compiler = saved, None
    assert compiled.engine["compiled_clips"] == 1 and not compiled.engine["notes"]
    assert compiled.speed["skipped_step_indices"] == eager.speed["skipped_step_indices"] == [[2, 3]]
    torch.testing.assert_close(lat_compiled, lat_eager, rtol=1e-5, atol=1e-5)
    assert not {"blocks", "after_transformer_block"} & set(vars(engine.transformer))


def test_fp8_job_runs_on_the_fp8_copy_and_leaves_the_engine_exact(engine):
    exact, lat_exact = _latents(engine, speed.EXACT)
    plan = _plan(fp8=True)
    engine.build_fp8(plan.fp8.granularity)
    assert speed.FP8_WEIGHTS in engine.components()
    fast, lat_fast = _latents(engine, plan)
    assert fast.speed["fp8"] is True and fast.speed["details"]["fp8"] == "emulated (row-wise scales)"
    assert fast.speed["skipped_steps"] == [0]
    assert 0 < _rel(lat_fast, lat_exact) < 0.2
    assert all(type(m) is torch.nn.Linear for m in fp8.select_linears(engine.transformer).values())
    again, lat_again = _latents(engine, speed.EXACT)
    assert torch.equal(lat_again, lat_exact) and np.array_equal(again.frames, exact.frames)


def test_fp8_job_does_not_read_the_bf16_linears(engine):
    # While an FP8 job runs the manager may have parked the bf16 copy: it must not be read.
    plan = _plan(fp8=True)
    engine.build_fp8(plan.fp8.granularity)
    _, want = _latents(engine, plan)
    saved = {}
    for name, p in engine.transformer_linears.named_parameters():
        saved[name], p.data = p.data, torch.full_like(p.data, float("nan"))
    try:
        _, got = _latents(engine, plan)
        assert torch.equal(got, want)
    finally:
        for name, p in engine.transformer_linears.named_parameters():
            p.data = saved[name]


# ---------------------------------------------------------------- through the worker
def test_fast_video_job_end_to_end(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path)
    job = {"task": "video", "image": PNG, "audio": data_uri("wav", 0.5), **VIDEO, "steps": 6}  # one clip
    fast = worker.handle({"id": "f", "input": {**job, "preset": "fast", "step_cache": 1.0}})
    assert "error" not in fast, fast
    assert fast["preset"] == "fast" and fast["frames"] == 8 and fast["num_clips"] == 1
    assert probe_media(fast["video_url"]).video.frame_count == 8
    sp = fast["speed"]
    assert sp["fp8"] is True and sp["attention_8bit"] is False and sp["step_cache"] == 1.0
    assert sp["details"] == {"fp8": "emulated (row-wise scales)",
                             "attention_8bit": UNAVAILABLE_8BIT}
    assert sp["steps"] == 6 and sp["skipped_steps"] == [2] and sp["skipped_step_indices"] == [[2, 3]]
    res = worker.manager.component_residency()
    assert res["video.transformer_fp8"] is True, "the FP8 copy is a managed component"
    exact = worker.handle({"id": "e", "input": job})
    assert exact["preset"] == "exact" and exact["speed"]["fp8"] is False and exact["speed"]["skipped_steps"] == [0]
    assert exact["manager"]["load_seconds"].keys() == {"video"}, "one load for both kinds of job"


def test_fp8_demanded_on_an_unsupported_device_fails_the_job_before_loading(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "fp8_support", lambda device: fp8.FP8Support(None, reason="test device"))
    worker = make_worker(tiny_models, tmp_path)
    r = worker.handle({"id": "x", "input": {"task": "video", "image": PNG, "audio": data_uri("wav", 1.0), **VIDEO,
                                            "fp8": True}})
    assert r["code"] == "fp8_unsupported" and r["error"].startswith("fp8_unsupported: fp8 was requested")
    assert not worker.manager.is_loaded("video")


def test_preload_builds_the_fp8_copy_with_the_set(tiny_models, tmp_path):
    from dataclasses import replace

    worker = make_worker(tiny_models, tmp_path)
    worker.settings = replace(worker.settings, fast_preset="preload")
    from storystudio.worker import build_manager

    worker.manager = build_manager(worker.settings)
    engine = worker.manager.ensure("video")
    assert worker.manager.component_residency()["video.transformer_fp8"] is True
    # The engine can ask the manager for the room an exact job's idle FP8 copy holds (its CFG batch).
    worker.manager.ensure("video", idle=speed.idle_components(speed.EXACT))
    assert engine.make_room(1) > 0 and worker.manager.component_residency()["video.transformer_fp8"] is False


def test_a_story_demanding_fp8_where_it_cannot_run_fails_before_any_image(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "fp8_support", lambda device: fp8.FP8Support(None, reason="test device"))
    worker = make_worker(tiny_models, tmp_path)
    r = worker.handle({"id": "b", "input": {"task": "batch", "project_id": "p", "video": {"fp8": True},
                                            "scenes": [{"prompt": "a face", "audio": data_uri("wav", 0.5)}]}})
    assert r["code"] == "fp8_unsupported" and "test device" in r["error"]
    assert not worker.manager.is_loaded("image") and not worker.manager.is_loaded("video")


def test_fast_story_reports_the_speed_of_each_scene(tiny_models, tmp_path):
    worker = make_worker(tiny_models, tmp_path)
    r = worker.handle({"id": "b", "input": {"task": "batch", "project_id": "p",
                                            "video": {**VIDEO, "steps": 6, "preset": "fast", "step_cache": 1.0},
                                            "scenes": [{"image": PNG, "audio": data_uri("wav", 0.5)}]}})
    assert r["scenes_ok"] == 1, r
    scene = r["scenes"][0]
    assert scene["preset"] == "fast" and scene["speed"]["fp8"] is True and scene["speed"]["skipped_steps"] == [2]
    assert probe_media(scene["video_url"]).video.frame_count == 8
