"""ZImageGenerator on a tiny synthetic checkpoint in the official layout (CPU)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from storystudio.errors import CheckpointError, GenerationError, InvalidInput
from storystudio.models.image_generator import ImageRequest, ImageResult, ZImageGenerator


@pytest.fixture(scope="module")
def ckpt(tiny_models):
    return tiny_models[0]  # the session's tiny Z-Image-Turbo folder (read-only here; copied before damage)


@pytest.fixture(scope="module")
def gen(ckpt) -> ZImageGenerator:
    return ZImageGenerator.from_pretrained(ckpt, device="cpu")


def _req(**kw) -> ImageRequest:
    base = dict(prompt="a red fox in a snowy forest", width=256, height=256, steps=2, seed=7)
    base.update(kw)
    return ImageRequest(**base)


def _arr(result: ImageResult) -> np.ndarray:
    return np.asarray(result.image)


def test_loads_official_components(gen):
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Model

    comps = gen.components()
    assert set(comps) == {"transformer", "text_encoder", "vae"}
    assert isinstance(comps["transformer"], ZImageTransformer2DModel)
    assert isinstance(comps["text_encoder"], Qwen3Model)
    assert isinstance(comps["vae"], AutoencoderKL)
    assert gen.device == torch.device("cpu") and gen.dtype == torch.float32
    assert all(p.dtype == torch.float32 and not p.requires_grad for m in comps.values() for p in m.parameters())
    assert gen.vae_scale == 16


def test_image_matches_request_size(gen):
    r = gen.generate(_req(width=320, height=256))
    assert r.image.size == (320, 256) and (r.width, r.height) == (320, 256)
    assert r.image.mode == "RGB" and r.seed == 7 and r.seconds > 0


def test_deterministic_for_a_seed_and_different_for_another(gen):
    a, b, c = gen.generate(_req(seed=11)), gen.generate(_req(seed=11)), gen.generate(_req(seed=12))
    assert np.array_equal(_arr(a), _arr(b))
    assert not np.array_equal(_arr(a), _arr(c))


def test_random_seed_is_reported_and_reproducible(gen):
    r = gen.generate(_req(seed=None))
    assert isinstance(r.seed, int) and r.seed >= 0
    again = gen.generate(_req(seed=r.seed))
    assert np.array_equal(_arr(r), _arr(again))


def test_progress_called_once_per_step(gen):
    calls = []
    gen.generate(_req(steps=3), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_guidance_and_negative_prompt(gen):
    plain = gen.generate(_req())
    cfg = gen.generate(_req(guidance=4.0, negative_prompt="blurry"))
    assert cfg.image.size == (256, 256)
    assert not np.array_equal(_arr(plain), _arr(cfg))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(width=250), "width"),  # not a multiple of 16
        (dict(height=264), "height"),
        (dict(width=4096), "width"),  # too large
        (dict(height=128), "height"),  # too small
        (dict(width=256.0), "width"),
        (dict(steps=0), "steps"),
        (dict(guidance=-1.0), "guidance"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(prompt="   "), "prompt"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_requests(gen, kw, field):
    with pytest.raises(InvalidInput) as ei:
        gen.generate(_req(**kw))
    assert field in ei.value.message and ei.value.code == "invalid_input"


def test_weights_swapped_in_place_are_used(gen):
    """ModelManager contract: weights reassigned through param.data (park + restore)."""
    before = _arr(gen.generate(_req(seed=3)))
    for module in gen.components().values():
        for p in module.parameters():
            p.data = p.data.clone()  # new storage, as after a round trip through pinned memory
    assert np.array_equal(before, _arr(gen.generate(_req(seed=3))))
    vae = gen.components()["vae"]
    w = vae.decoder.conv_out.weight
    saved = w.data
    w.data = torch.zeros_like(saved)
    try:
        changed = _arr(gen.generate(_req(seed=3)))
    finally:
        w.data = saved
    assert not np.array_equal(before, changed)  # the engine reads the live weights
    assert np.array_equal(before, _arr(gen.generate(_req(seed=3))))


def test_parked_weights_are_refused(gen, monkeypatch):
    """Weights left in host memory while the engine runs on the GPU -> clear error, no silent CPU run."""
    monkeypatch.setattr(gen, "device", torch.device("cuda", 0))  # weights stay on the CPU ("parked")
    with pytest.raises(GenerationError) as ei:
        gen.generate(_req())
    assert "not resident" in ei.value.message and "cuda:0" in ei.value.message


def test_broken_checkpoint_is_refused(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError) as ei:
        ZImageGenerator.from_pretrained(bad)
    assert ei.value.code == "checkpoint_missing" and "vae/diffusion_pytorch_model.safetensors" in ei.value.message


def test_out_of_memory_reaches_the_model_manager(gen, monkeypatch):
    """OOM must not be turned into a job error here: the manager parks the other set and retries."""

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(gen._pipe.transformer, "forward", oom)
    with pytest.raises(torch.OutOfMemoryError):
        gen.generate(_req(steps=1))
