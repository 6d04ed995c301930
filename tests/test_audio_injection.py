"""The audio injection split for compiling (storystudio/models/audio_injection.py) against the official
``WanModel_S2V.after_transformer_block``, eager and compiled, on the tiny Wan2.2-S2V checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from storystudio.models.audio_injection import frame_residual, inject_audio, model_injection
from storystudio.models.compile import DiTCompiler
from storystudio.models.video_generator import VideoRequest, WanS2VGenerator
from storystudio.models.video_path import VideoPathOptions


@pytest.fixture(scope="module")
def captured(tiny_models):
    """The tiny engine and the kwargs of the DiT's first call in a 1-step generation (CFG batched)."""
    engine = WanS2VGenerator.from_pretrained(tiny_models[1], device="cpu", options=VideoPathOptions(compile="off"))
    model = engine.transformer
    calls: list[dict] = []
    official = model.forward

    def record(x, **kwargs):
        calls.append({"x": x, **kwargs})
        return official(x, **kwargs)

    model.forward = record
    try:
        rng = np.random.RandomState(0)
        engine.generate(VideoRequest(image=Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8)),
                                     audio=(rng.randn(12000) * 0.1).astype(np.float32), prompt="hi",
                                     max_area=64 * 64, steps=1, seed=3, infer_frames=16))
    finally:
        del model.forward
    return model, calls[0]


def _forward(model, call, after=None) -> torch.Tensor:
    if after is not None:
        model.after_transformer_block = after
    try:
        with torch.no_grad():
            return torch.stack(model(**call))
    finally:
        vars(model).pop("after_transformer_block", None)


def test_split_injection_equals_the_official_method(captured):
    model, call = captured
    assert model.enbale_adain and model.adain_mode == "attn_norm"
    seen: list[tuple[int, int]] = []

    def counting(norm, injector, frames, audio, audio_global):
        seen.append((frames.shape[1], audio.shape[1]))
        return frame_residual(norm, injector, frames, audio, audio_global)

    want = _forward(model, call)
    got = _forward(model, call, model_injection(model, counting))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Both tiny blocks inject, over the whole video in whole frames (no padded copy on one GPU).
    assert len(seen) == len(model.audio_injector.injected_block_id) == 2
    assert all(tokens == model.original_seq_len and tokens % frames == 0 for tokens, frames in seen)
    # The injection matters: without it the output is another one.
    skipped = _forward(model, call, lambda idx, h: h)
    assert not torch.allclose(skipped, want, rtol=1e-3, atol=1e-3)


def test_compiled_injection_is_one_graph_for_every_injected_block(captured):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, call = captured
    torch.compiler.reset()
    counter = CompileCounterWithBackend("aot_eager")
    residual = torch.compile(frame_residual, dynamic=False, backend=counter)
    want = _forward(model, call)
    got = _forward(model, call, model_injection(model, residual))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # the two injected blocks share the graph (modules are inputs)
    _forward(model, call, model_injection(model, residual))
    assert counter.frame_count == 1  # and the next forward reuses it


def test_dit_compiler_installs_blocks_and_injection_and_removes_both(captured):
    model, call = captured
    compiler = DiTCompiler(model, backend="eager")
    want = _forward(model, call)
    with compiler.installed():
        assert "after_transformer_block" in vars(model) and all("forward" in vars(b) for b in model.blocks)
        with torch.no_grad():
            got = torch.stack(model(**call))
        with pytest.raises(RuntimeError, match="already replaced"), compiler.installed():
            pass
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "after_transformer_block" not in vars(model) and not any("forward" in vars(b) for b in model.blocks)


def test_a_slice_off_the_frame_edges_is_padded_to_whole_frames(captured):
    """The sequence-parallel case: tokens [start, stop) that cut frames get the same per-token result."""
    model, _ = captured
    torch.manual_seed(0)
    frames, per_frame, dim = 3, 8, model.dim
    video_len = frames * per_frame
    audio = torch.randn(1, frames, 5, dim)
    glob = torch.randn(1, frames, 1, dim)
    whole = torch.randn(1, video_len + 6, dim)  # 6 reference tokens after the video
    want = inject_audio(model, 0, whole.clone(), 0, video_len, audio, glob)
    for start, stop in [(0, 11), (11, 19), (19, video_len + 6)]:
        got = inject_audio(model, 0, whole[:, start:stop].clone(), start, video_len, audio, glob)
        torch.testing.assert_close(got, want[:, start:stop], rtol=1e-5, atol=1e-5)
    # A block without injection and a slice without video tokens are returned as they came.
    x = whole.clone()
    assert inject_audio(model, 3, x, 0, video_len, audio, glob) is x and torch.equal(x, whole)
    tail = whole[:, video_len:].clone()
    assert torch.equal(inject_audio(model, 0, tail, video_len, video_len, audio, glob), whole[:, video_len:])
    assert not torch.allclose(want[:, :video_len], whole[:, :video_len])  # the injection did change the video
