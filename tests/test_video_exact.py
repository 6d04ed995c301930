"""The exact path (issue 10) on the tiny Wan2.2-S2V checkpoint: same video as the baseline, fewer frames
generated for short audio, CFG batched, compiled blocks that follow the ModelManager's re-pointed weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from storystudio.errors import InvalidInput
from storystudio.models import attention
from storystudio.models.compile import BlockCompiler, cache_dir_for, configure_cache
from storystudio.models.footprint import GiB, video_working_bytes
from storystudio.models.model_manager import ModelManager
from storystudio.models.clip_plan import plan_clip_frames
from storystudio.models.video_generator import VideoRequest, WanS2VGenerator
from storystudio.models.video_path import VideoPathOptions

AREA = 64 * 64
EXACT = VideoPathOptions()
BASELINE = VideoPathOptions.baseline()


@pytest.fixture(scope="module")
def wan(tiny_models) -> WanS2VGenerator:
    return WanS2VGenerator.from_pretrained(tiny_models[1], device="cpu")


@pytest.fixture
def engine(wan):
    """The module's engine with its options restored after each test."""
    saved = wan.options
    yield wan
    wan.options = saved


@pytest.fixture(scope="module")
def cached(wan):
    """Runs shared by several tests (the tiny VAE is the slow part on a CPU): ``cached(name)``."""
    memo: dict[str, tuple] = {}
    runs = {
        "exact": (EXACT, dict(seconds=FULL_CLIP_S)),
        "baseline": (BASELINE, dict(seconds=FULL_CLIP_S)),
        "exact-cfg-off": (replace(EXACT, cfg_batch="off"), dict(seconds=FULL_CLIP_S)),
    }

    def get(name: str):
        if name not in memo:
            options, kw = runs[name]
            saved = wan.options
            try:
                memo[name] = _run(wan, options, _req(**kw))
            finally:
                wan.options = saved
        return memo[name]

    return get


FULL_CLIP_S = 13 / 16  # 13 frames + the 3 the first clip drops = one full 16-frame clip


def _req(seconds: float, **kw) -> VideoRequest:
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8))
    audio = (np.random.RandomState(1).randn(int(16000 * seconds)) * 0.1).astype(np.float32)
    base = dict(image=image, audio=audio, prompt="a person talking", max_area=AREA, steps=2, seed=7, infer_frames=16)
    base.update(kw)
    return VideoRequest(**base)


def _run(engine: WanS2VGenerator, options: VideoPathOptions, req: VideoRequest):
    """Generate with ``options``; also return each clip's denoised latents and the DiT's input batch sizes."""
    engine.options = options
    latents, batches = [], []
    real = engine._denoise

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        latents.append(out.clone())
        return out

    hook = engine.transformer.register_forward_pre_hook(lambda m, a, kw: batches.append(len(a[0])), with_kwargs=True)
    engine._denoise = recording
    try:
        result = engine.generate(req)
    finally:
        del engine._denoise
        hook.remove()
    return result, latents, batches


# ------------------------------------------------------------------ the frame-count rule
@pytest.mark.parametrize(
    "target,infer,drop,trim,want",
    [
        (16, 80, 3, True, [20]),  # 1 s: 16 frames + 3 dropped -> one 20-frame clip
        (16, 80, 3, False, [80]),  # the baseline always generates full clips
        (77, 80, 3, True, [80]),  # exactly one full clip
        (78, 80, 3, True, [84]),  # one frame more: the one-latent tail is merged, not a second clip
        (81, 80, 3, True, [84]),  # 5 s + 1 frame: still one latent frame of tail
        (82, 80, 3, True, [80, 8]),  # two latent frames of tail: a clip of its own
        (78, 80, 3, False, [80, 80]),  # the baseline keeps the official rule
        (96, 80, 3, True, [80, 20]),  # 6 s
        (157, 80, 3, True, [80, 80]),
        (158, 80, 3, True, [80, 84]),
        (78, 160, 3, True, [84]),
        (158, 160, 3, True, [160, 4]),  # a merged clip stays within the longest clip allowed (160)
        (1, 80, 3, True, [4]),
        (16, 80, 0, True, [16]),  # without drop_first_motion
        (17, 16, 0, True, [20]),
        (21, 16, 0, True, [16, 8]),
        (29, 16, 3, True, [16, 16]),
    ],
)
def test_clip_frames_rule(target, infer, drop, trim, want):
    clips = plan_clip_frames(target, infer, first_clip_drop=drop, trim_last=trim)
    assert clips == want
    assert all(c % 4 == 0 and 4 <= c <= min(infer + 4, 160) for c in clips)
    assert sum(clips) - drop >= target  # enough frames for the audio
    if trim:  # and never more than one granule too many
        assert sum(clips) - drop - target < 4
    else:
        assert set(clips) == {infer}


def test_clip_frames_rule_rejects_nonsense():
    with pytest.raises(ValueError, match="bad clip plan"):
        plan_clip_frames(0, 80)
    with pytest.raises(ValueError, match="bad clip plan"):
        plan_clip_frames(16, 30)


# ------------------------------------------------------------------ exact == baseline
def test_exact_path_equals_baseline_when_the_audio_fills_the_clip(cached):
    # The frame rule changes nothing here; attention kernel, CFG batch and code path do.
    base, base_lat, base_batches = cached("baseline")
    exact, exact_lat, exact_batches = cached("exact")
    assert base.frames.shape == exact.frames.shape == (13, 64, 64, 3)
    assert exact.engine["clip_frames"] == base.engine["clip_frames"] == [16]
    # Different code paths really ran: two batch-1 forwards per step vs one batch-2 forward.
    assert base_batches == [1, 1, 1, 1] and exact_batches == [2, 2]
    assert exact.engine["cfg_batched"] and not base.engine["cfg_batched"]
    assert exact.engine["attention"] != "default" and base.engine["attention"] == "default"
    assert (exact.engine["rope"], base.engine["rope"]) == ("fused", "official")
    torch.testing.assert_close(exact_lat[0], base_lat[0], rtol=1e-4, atol=1e-4)
    assert np.abs(exact.frames.astype(int) - base.frames.astype(int)).max() <= 1


def test_cfg_batch_equals_two_forwards(cached):
    two, two_lat, two_batches = cached("exact-cfg-off")
    one, one_lat, _ = cached("exact")
    assert (two.engine["cfg_batched"], one.engine["cfg_batched"]) == (False, True) and two_batches == [1, 1, 1, 1]
    torch.testing.assert_close(one_lat[0], two_lat[0], rtol=1e-4, atol=1e-4)


def test_no_guidance_runs_one_forward_per_step(engine):
    r, _, batches = _run(engine, EXACT, _req(0.5, guidance=1.0))
    assert batches == [1, 1] and r.engine["cfg_batched"] is False


def test_cfg_batch_out_of_memory_falls_back_to_two_forwards(engine, cached, monkeypatch):
    ref, ref_lat, _ = cached("exact-cfg-off")
    real_forward = type(engine.transformer).forward

    def forward(self, x, *args, **kwargs):
        if len(x) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(type(engine.transformer), "forward", forward)
    got, got_lat, _ = _run(engine, replace(EXACT, cfg_batch="on"), _req(FULL_CLIP_S))
    assert got.engine["cfg_batched"] is False and got.engine["cfg_batched_clips"] == 0
    assert got.engine["notes"] == ["clip 0: CFG batch ran out of memory, two forwards used"]
    torch.testing.assert_close(got_lat[0], ref_lat[0])


def test_wan_s2v_attention_calls_are_dense_on_the_exact_path(engine, monkeypatch):
    # Self-attention passes k_lens = the full lengths (also for the CFG batch of 2) and
    # cross-attention passes none: every call must take the fast unmasked kernel.
    calls = []
    real = attention.dense_attention
    monkeypatch.setattr(attention, "dense_attention", lambda b, *a, **k: calls.append(b) or real(b, *a, **k))

    def refuse(*a, **k):
        raise AssertionError("masked path used")

    monkeypatch.setattr(attention, "masked_sdpa", refuse)
    r, _, _ = _run(engine, EXACT, _req(0.5, steps=1))
    assert calls and set(calls) == {engine.attention.backend} == {r.engine["attention"]}


# ------------------------------------------------------------------ only the frames the audio needs
def test_one_second_generates_one_short_clip_yet_returns_exactly_16_frames(engine):
    req = _req(1.0, infer_frames=80)
    exact, exact_lat, _ = _run(engine, EXACT, req)
    assert exact.frames.shape[0] == round(1.0 * 16) == 16
    assert exact.engine["clip_frames"] == [20]
    assert exact_lat[0].shape[1] == 5  # 20 frames = 5 latent frames, not 80 / 4 = 20
    engine.options = BASELINE
    assert engine._plan(req).clip_frames == [80]  # what the baseline generates for the same request
    # The short clip is the official computation with infer_frames=20, nothing else.
    same, same_lat, _ = _run(engine, BASELINE, _req(1.0, infer_frames=20))
    assert same.frames.shape == exact.frames.shape
    torch.testing.assert_close(exact_lat[0], same_lat[0], rtol=1e-4, atol=1e-4)
    assert np.abs(exact.frames.astype(int) - same.frames.astype(int)).max() <= 1


def test_short_last_clip_keeps_the_full_clip_identical(engine):
    # 20 frames + 3 dropped: a full 16-frame clip, then 8 frames instead of another 16.
    req = _req(20 / 16, steps=1)
    exact, exact_lat, _ = _run(engine, EXACT, req)
    base, base_lat, _ = _run(engine, BASELINE, req)
    assert exact.frames.shape[0] == base.frames.shape[0] == 20
    assert base.engine["clip_frames"] == [16, 16] and exact.engine["clip_frames"] == [16, 8]
    torch.testing.assert_close(exact_lat[0], base_lat[0], rtol=1e-4, atol=1e-4)
    assert exact_lat[1].shape[1] == 2 and base_lat[1].shape[1] == 4
    full = 16 - 3  # frames coming from the full clip
    assert np.abs(exact.frames[:full].astype(int) - base.frames[:full].astype(int)).max() <= 1


def test_short_clip_with_pose_takes_the_first_pose_latents(engine):
    pose = (np.random.RandomState(3).rand(40, 50, 40, 3) * 255).astype(np.uint8)
    # 0.5 s: 8 + 3 frames -> a 12-frame clip where the baseline makes 16 (pose encoded for 16).
    r, lat, _ = _run(engine, EXACT, _req(0.5, pose_frames=pose, steps=1))
    same, same_lat, _ = _run(engine, BASELINE, _req(0.5, infer_frames=12, pose_frames=pose, steps=1))
    assert r.engine["clip_frames"] == [12] and r.frames.shape[0] == 8
    torch.testing.assert_close(lat[0], same_lat[0], rtol=1e-4, atol=1e-4)


def test_one_latent_frame_tail_is_merged_into_the_clip_before(engine):
    # 14 frames + 3 dropped = 17: [16, 4] by the short-clip rule alone; merged: one 20-frame clip,
    # which is the official computation with infer_frames=20, pose included.
    pose = (np.random.RandomState(3).rand(40, 50, 40, 3) * 255).astype(np.uint8)
    req = _req(14 / 16, pose_frames=pose, steps=1)
    merged, merged_lat, _ = _run(engine, EXACT, req)
    same, same_lat, _ = _run(engine, BASELINE, _req(14 / 16, pose_frames=pose, steps=1, infer_frames=20))
    assert merged.engine["clip_frames"] == [20] and merged.frames.shape[0] == same.frames.shape[0] == 14
    torch.testing.assert_close(merged_lat[0], same_lat[0], rtol=1e-4, atol=1e-4)
    assert np.abs(merged.frames.astype(int) - same.frames.astype(int)).max() <= 1


def test_merged_later_clip_reads_its_own_audio_window(engine, monkeypatch):
    # 30 frames + 3 = 33: [16, 16, 4] -> [16, 20]; the second clip's audio starts where the first
    # ended (frame 16) and runs 20 frames, the baseline's second clip covers frames 16-31.
    windows: dict[str, list[torch.Tensor]] = {}
    real = engine._clip_inputs

    def recording(r, frames, plan, *args, **kwargs):
        clip = real(r, frames, plan, *args, **kwargs)
        windows.setdefault(engine.options.name, []).append(clip.cond["audio_input"].clone())
        return clip

    monkeypatch.setattr(engine, "_clip_inputs", recording)
    req = _req(30 / 16, steps=1)
    exact, exact_lat, _ = _run(engine, EXACT, req)
    base, base_lat, _ = _run(engine, BASELINE, req)
    assert exact.engine["clip_frames"] == [16, 20] and base.engine["clip_frames"] == [16, 16, 16]
    assert exact.frames.shape[0] == base.frames.shape[0] == 30
    ex, bl = windows["exact"], windows["baseline"]
    assert ex[1].shape[-1] == 20 and bl[1].shape[-1] == 16
    torch.testing.assert_close(ex[0], bl[0])
    torch.testing.assert_close(ex[1][..., :16], bl[1])  # the same audio frames, 16 on
    torch.testing.assert_close(ex[1][..., 16:], bl[2][..., :4])  # then the frames of the baseline's third clip
    torch.testing.assert_close(exact_lat[0], base_lat[0], rtol=1e-4, atol=1e-4)  # the first clip is untouched


# ------------------------------------------------------------------ regional compile
def test_compiled_blocks_follow_parked_and_restored_weights(tiny_models):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.compiler.reset()
    engine = WanS2VGenerator.from_pretrained(tiny_models[1], device="cpu")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = replace(EXACT, compile="on", compile_backend=counter)
    eager = replace(EXACT, compile="off")
    req = _req(FULL_CLIP_S, steps=1)  # one full clip: compiled

    want, want_lat, _ = _run(engine, eager, req)
    got, got_lat, _ = _run(engine, compiled, req)
    assert got.engine["compiled"] and got.engine["compiled_clips"] == 1 and not want.engine["compiled"]
    # One graph for the clip's shape shared by every block, one for the audio injection's.
    assert counter.frame_count == 2
    torch.testing.assert_close(got_lat[0], want_lat[0], rtol=1e-4, atol=1e-4)
    assert all("forward" not in vars(b) for b in engine.transformer.blocks)  # eager again outside the clip
    assert "after_transformer_block" not in vars(engine.transformer)

    # Park and restore through the ModelManager (param.data re-pointed twice), changing a
    # weight while parked: the compiled graph must read the new storage without recompiling.
    manager = ModelManager("cpu")
    manager.register("video", lambda device: engine)
    manager.ensure("video")
    manager.park("video")
    weight = engine.transformer.blocks[0].ffn[0].weight
    parked_ptr = weight.data.data_ptr()
    weight.data.mul_(1.5)
    manager.ensure("video")
    assert weight.data.data_ptr() != parked_ptr and manager.component_residency()["video.transformer"]

    got2, got2_lat, _ = _run(engine, compiled, req)
    assert counter.frame_count == 2  # no recompilation
    want2, want2_lat, _ = _run(engine, eager, req)
    torch.testing.assert_close(got2_lat[0], want2_lat[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got2_lat[0], got_lat[0], rtol=1e-3, atol=1e-3)  # the new weight mattered


def test_compiler_failure_falls_back_to_eager(engine, cached):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("inductor exploded")

    want, want_lat, _ = cached("exact")
    try:
        got, got_lat, _ = _run(engine, replace(EXACT, compile="on", compile_backend=broken_backend),
                               _req(FULL_CLIP_S))
        again, other = engine._clip_compiled(16, 16), engine._clip_compiled(8, 16)
    finally:
        errors = dict(engine._compile_errors)
        engine._compile_errors.clear()
        engine._compilers.clear()
        torch.compiler.reset()
    assert list(errors) == [True] and "inductor exploded" in errors[True]
    assert again is False and other is True  # full-length clips eager from now on; other lengths still compile
    assert got.engine["compiled"] is False and got.engine["notes"][0].startswith("clip 0: compile failed, ran eager")
    torch.testing.assert_close(got_lat[0], want_lat[0])


def _lengths_run(engine, options, frames_list, eager_too=True):
    """Generate one clip per length in ``frames_list`` (1 step); returns [(result, latents, eager latents)]."""
    out = []
    for frames in frames_list:
        req = _req((frames - 3) / 16, steps=1)
        got, got_lat, _ = _run(engine, options, req)
        want_lat = _run(engine, replace(EXACT, compile="off"), req)[1] if eager_too else None
        out.append((got, got_lat, want_lat))
    return out


def test_other_clip_lengths_share_one_compiled_graph(engine):
    """Full-length clips on their static graph; every other length (short scenes, last clips,
    merged tails) on one automatic-dynamic graph instead of a cold compile per length."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.compiler.reset()
    counter = CompileCounterWithBackend("aot_eager")
    options = replace(EXACT, compile="on", compile_backend=counter)
    try:
        runs = _lengths_run(engine, options, [16])
        assert counter.frame_count == 2  # the full clip's blocks and audio injection
        runs += _lengths_run(engine, options, [8])
        assert counter.frame_count == 4  # the other-length graphs, symbolic in the clip's length
        runs += _lengths_run(engine, options, [12, 20, 16])
        # No compile for any further length, nor for the full clip. (A 4-frame clip, one latent
        # frame, would get a graph of its own: dynamo specializes sizes of 1; a one-latent tail is
        # merged, so such a clip only happens for audio of at most one frame or after a 160-frame clip.)
        assert counter.frame_count == 4
    finally:
        engine._compilers.clear()
        torch.compiler.reset()
    assert [r.engine["clip_frames"] for r, _, _ in runs] == [[16], [8], [12], [20], [16]]
    assert all(r.engine["compiled_clips"] == 1 and r.engine["notes"] == [] for r, _, _ in runs)
    for _, got, want in runs:
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_compiled_warmup_compiles_both_kinds_of_graph(engine, monkeypatch):
    """With compiled blocks the warm-up runs a full clip and the merged clip of a one-clip line, so a
    first job of another length compiles nothing; eager, one clip is enough."""
    from torch._dynamo.testing import CompileCounterWithBackend

    clips = []
    real = engine.generate

    def recording(req, *args, **kwargs):
        result = real(req, *args, **kwargs)
        clips.append(result.engine)
        return result

    monkeypatch.setattr(engine, "generate", recording)
    torch.compiler.reset()
    counter = CompileCounterWithBackend("aot_eager")
    try:
        engine.options = replace(EXACT, compile="on", compile_backend=counter)
        engine.warmup(width=64, height=64, infer_frames=16)
        warm_graphs = counter.frame_count
        _lengths_run(engine, engine.options, [12], eager_too=False)  # a first real job: a 0.56 s line
        after_job = counter.frame_count
        engine.options = replace(EXACT, compile="off")
        engine.warmup(width=64, height=64, infer_frames=16)
    finally:
        engine._compilers.clear()
        torch.compiler.reset()
    assert [c["clip_frames"] for c in clips] == [[16], [20], [12], [16]]
    assert [c["compiled_clips"] for c in clips] == [1, 1, 1, 0]
    assert warm_graphs == 4 and after_job == 4  # full-length and other-length graphs, nothing after


def test_failing_other_length_compile_leaves_full_clips_compiled(engine):
    def no_symbolic_shapes(gm, example_inputs):
        if any(isinstance(i, torch.SymInt) or (isinstance(i, torch.Tensor) and
               any(isinstance(d, torch.SymInt) for d in i.shape)) for i in example_inputs):
            raise RuntimeError("dynamic shapes unsupported here")
        return gm.forward

    torch.compiler.reset()
    options = replace(EXACT, compile="on", compile_backend=no_symbolic_shapes)
    try:
        runs = _lengths_run(engine, options, [16, 8, 12, 16], eager_too=False)
        errors = dict(engine._compile_errors)
    finally:
        engine._compile_errors.clear()
        engine._compilers.clear()
        torch.compiler.reset()
    assert list(errors) == [False] and "dynamic shapes unsupported here" in errors[False]
    (full, _, _), (first_other, _, _), (second_other, _, _), (full_again, _, _) = runs
    assert first_other.engine["notes"][0].startswith("clip 0: compile failed, ran eager")
    assert first_other.engine["compiled_clips"] == second_other.engine["compiled_clips"] == 0
    assert second_other.engine["notes"] == []  # not tried again
    assert full.engine["compiled_clips"] == full_again.engine["compiled_clips"] == 1


def test_compile_switch(engine):
    counter_calls = []
    engine.options = replace(EXACT, compile="on", compile_backend="eager")
    assert engine._clip_compiled(16, 16) and engine._clip_compiled(4, 16)
    engine.options = replace(EXACT, compile="auto")
    assert not engine._clip_compiled(16, 16)  # auto = off on CPU
    engine.options = replace(EXACT, compile="off")
    assert not engine._clip_compiled(16, 16) and counter_calls == []


def test_block_compiler_refuses_mixed_blocks():
    with pytest.raises(ValueError, match="share one forward"):
        BlockCompiler(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()]))


def test_compile_cache_goes_to_the_models_volume(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = configure_cache(tmp_path / ".torch-compile-cache", torch.device("cpu"))
    assert folder == cache_dir_for(tmp_path / ".torch-compile-cache", torch.device("cpu"))
    assert folder.is_dir() and folder.name == f"{torch.__version__.lower().replace('+', '-')}-cpu"
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
    # An operator's own setting wins.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert configure_cache(tmp_path / "other", torch.device("cpu")) == tmp_path / "mine"


def test_unwritable_compile_cache_is_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert configure_cache(blocker, torch.device("cpu")) is None
    assert "not writable" in caplog.text
    import os

    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


# ------------------------------------------------------------------ options
def test_options_from_env():
    assert VideoPathOptions.from_env({}) == VideoPathOptions()
    assert VideoPathOptions.from_env({"STORYSTUDIO_VIDEO_PATH": "baseline"}) == BASELINE
    opts = VideoPathOptions.from_env({"STORYSTUDIO_VIDEO_PATH": "Baseline", "STORYSTUDIO_ATTENTION": "cudnn",
                                      "STORYSTUDIO_COMPILE": "on", "STORYSTUDIO_CFG_BATCH": "off"})
    assert (opts.name, opts.attention, opts.compile, opts.cfg_batch, opts.trim_last_clip, opts.rope) == (
        "baseline", "cudnn", "on", "off", False, "official")
    assert VideoPathOptions.from_env({"STORYSTUDIO_ROPE": "official"}).rope == "official"


@pytest.mark.parametrize("var,value", [("STORYSTUDIO_VIDEO_PATH", "fast"), ("STORYSTUDIO_ATTENTION", "sage"),
                                       ("STORYSTUDIO_COMPILE", "yes"), ("STORYSTUDIO_CFG_BATCH", "2"),
                                       ("STORYSTUDIO_ROPE", "complex")])
def test_bad_option_values_are_config_errors(var, value):
    with pytest.raises(InvalidInput, match=var) as err:
        VideoPathOptions.from_env({var: value})
    assert err.value.code == "invalid_config"


def test_attention_choice_follows_the_options(engine, cached):
    r, _, _ = _run(engine, replace(EXACT, attention="math"), _req(0.5, steps=1))
    assert r.engine["attention"] == "math" and engine.attention.backend == "math"
    base, _, _ = cached("baseline")
    assert base.engine == {"path": "baseline", "attention": "default", "rope": "official", "cfg_batched": False,
                           "compiled": False,
                           "clip_frames": [16], "cfg_batched_clips": 0, "compiled_clips": 0, "notes": []}


def _fake_cuda_memory(monkeypatch, engine, free_bytes) -> None:
    """The engine on a pretend CUDA device (auto CFG batch) whose free memory is ``free_bytes()``,
    nothing allocated or cached: what ``_cfg_batch`` reads."""
    monkeypatch.setattr(engine, "device", torch.device("cuda", 0))
    monkeypatch.setattr(engine, "options", replace(EXACT, cfg_batch="auto"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_bytes()), 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)


def test_cfg_batch_plans_with_the_memory_of_the_blocks_that_will_run(engine, monkeypatch):
    """At 480p, 80 frames, 15 GiB free: compiled blocks batch the two branches, eager ones do not
    (the eager estimate of a batch of two is 22 GiB, the compiled one 15.5 GiB with margins)."""
    area = 448 * 832
    assert video_working_bytes(area, 80, batch=2, compiled=True) < 15.6 * GiB < video_working_bytes(area, 80, batch=2)
    _fake_cuda_memory(monkeypatch, engine, lambda: 15.6 * GiB + engine.memory_headroom_bytes)
    assert engine._cfg_batch(area, 80, compiled=True) is True
    assert engine._cfg_batch(area, 80, compiled=False) is False
    assert engine._cfg_batch(area, 40, compiled=False) is True  # a shorter clip fits eager too


def test_inductor_keeps_its_compile_workers_unless_the_operator_says_otherwise(monkeypatch):
    import torch._inductor.config as inductor_config

    from storystudio.models.compile import configure_inductor

    monkeypatch.setattr(inductor_config, "quiesce_async_compile_pool", True)
    monkeypatch.delenv("TORCHINDUCTOR_QUIESCE_ASYNC_COMPILE_POOL", raising=False)
    assert configure_inductor() == {"quiesce_async_compile_pool": False}
    assert inductor_config.quiesce_async_compile_pool is False
    monkeypatch.setattr(inductor_config, "quiesce_async_compile_pool", True)
    monkeypatch.setenv("TORCHINDUCTOR_QUIESCE_ASYNC_COMPILE_POOL", "1")
    assert configure_inductor() == {"quiesce_async_compile_pool": True}  # the operator's variable wins


def test_cfg_batch_parks_the_jobs_idle_weights_when_that_makes_room(engine, monkeypatch):
    """An exact job after a fast one: the idle FP8 copy leaves the device so the batch of two fits."""
    area = 448 * 832
    free = [14 * GiB + engine.memory_headroom_bytes]  # short of the compiled estimate (15.5 GiB)
    asked = []

    def make_room(nbytes: int) -> int:
        asked.append(nbytes)
        free[0] += 13 * GiB  # the FP8 copy parked
        return 13 * GiB

    _fake_cuda_memory(monkeypatch, engine, lambda: free[0])
    monkeypatch.setattr(engine, "make_room", make_room)
    assert engine._cfg_batch(area, 80, compiled=True) is True
    assert len(asked) == 1 and 1 * GiB < asked[0] < 2 * GiB  # only the shortfall is asked for
    assert engine._cfg_batch(area, 80, compiled=True) is True and len(asked) == 1  # fits now: no more parking
    # Nothing idle to park: two forwards, as before.
    free[0] = 14 * GiB + engine.memory_headroom_bytes
    monkeypatch.setattr(engine, "make_room", lambda nbytes: asked.append(nbytes) or 0)
    assert engine._cfg_batch(area, 80, compiled=True) is False and len(asked) == 2
