"""The exact path's compiled DiT blocks and audio injection through real inductor on CUDA (``gpu`` marker).

On CPU the tests compile through ``aot_eager``/``eager`` backends (no C++/Triton code generation);
this is where the Triton kernels inductor generates for the tiny Wan2.2-S2V checkpoint actually run,
and where a compile failure would show as the engine's eager fallback note.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from storystudio.models.video_generator import VideoRequest, WanS2VGenerator
from storystudio.models.video_path import VideoPathOptions

pytestmark = pytest.mark.gpu

FULL_CLIP_S = 13 / 16  # one full 16-frame clip of the tiny model (the first clip drops 3 frames)


def _request(seconds: float = FULL_CLIP_S) -> VideoRequest:
    rng = np.random.RandomState(0)
    return VideoRequest(image=Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8)),
                        audio=(np.random.RandomState(1).randn(int(16000 * seconds)) * 0.1).astype(np.float32),
                        prompt="a person talking", max_area=64 * 64, steps=2, seed=7, infer_frames=16)


def test_inductor_compiles_blocks_and_injection_and_matches_eager(tiny_models, tmp_path, monkeypatch):
    torch.compiler.reset()
    cache = tmp_path / "compile-cache"
    # configure_cache sets TORCHINDUCTOR_CACHE_DIR for the process: set-then-delete makes monkeypatch
    # put back whatever was there before (undo runs in reverse).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset-by-the-test")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # restored afterwards; configure_cache keeps it
    options = VideoPathOptions(compile="on", cfg_batch="on")
    engine = WanS2VGenerator.from_pretrained(tiny_models[1], device="cuda", options=options, compile_cache_dir=cache)
    latents: list[torch.Tensor] = []
    real = engine._denoise
    engine._denoise = lambda *a, **k: latents.append(real(*a, **k).clone()) or latents[-1]
    installed: list[bool] = []  # per DiT call: is the compiled audio injection in place?
    engine.transformer.register_forward_pre_hook(
        lambda m, a, kw: installed.append("after_transformer_block" in vars(m)), with_kwargs=True)
    compiled = engine.generate(_request())
    calls = len(installed)
    engine.options = replace(options, compile="off")
    eager = engine.generate(_request())

    assert compiled.engine["compiled_clips"] == 1 and compiled.engine["notes"] == []  # no eager fallback
    assert calls == 2 and all(installed[:calls])  # two steps, CFG batched, each through the compiled injection
    assert eager.engine["compiled_clips"] == 0 and not any(installed[calls:])
    assert not {"after_transformer_block"} & set(vars(engine.transformer))
    rel = ((latents[0].float() - latents[1].float()).norm() / latents[1].float().norm()).item()
    assert rel < 2e-2, rel  # bf16 on CUDA: fused kernels round differently, nothing more
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(cache))  # set by configure_cache
    assert any(cache.rglob("*")), "the compile cache was not written to the models volume"


def test_inductor_compiles_other_clip_lengths_on_one_dynamic_graph(tiny_models, tmp_path, monkeypatch):
    """Short clips, a merged tail and a long scene's last clip: compiled (no eager fallback) and
    equal to eager; after the first other length, further lengths compile nothing new."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    options = VideoPathOptions(compile="on", cfg_batch="on")
    engine = WanS2VGenerator.from_pretrained(tiny_models[1], device="cuda", options=options)
    latents: list[torch.Tensor] = []
    real = engine._denoise
    engine._denoise = lambda *a, **k: latents.append(real(*a, **k).clone()) or latents[-1]
    graphs = []
    results = []
    # 13 frames: one full clip; 5: an 8-frame clip; 14: a 20-frame clip (merged tail); 9: 12 frames;
    # 30: [16, 20] (a later full clip, then a merged later clip).
    for frames in (13, 5, 14, 9, 30):
        engine.options = options
        got = engine.generate(_request(frames / 16))
        graphs.append(counters["stats"]["unique_graphs"])
        engine.options = replace(options, compile="off")
        want = engine.generate(_request(frames / 16))
        results.append((got, want))
    for got, want in results:
        assert got.engine["compiled_clips"] == got.engine["clip_frames"].__len__() and got.engine["notes"] == []
        assert want.engine["compiled_clips"] == 0 and got.frames.shape == want.frames.shape
    assert [r[0].engine["clip_frames"] for r in results] == [[16], [8], [20], [12], [16, 20]]
    assert graphs[2] == graphs[3] == graphs[1]  # 20 and 12 frames: the 8-frame clip's dynamic graph
    # The clips' final latents, compiled vs eager, pairwise (bf16 rounding only).
    pairs = []
    i = 0
    for got, _ in results:
        k = len(got.engine["clip_frames"])
        pairs += list(zip(latents[i:i + k], latents[i + k:i + 2 * k]))
        i += 2 * k
    for a, b in pairs:
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 2e-2, rel
