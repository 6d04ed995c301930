"""Both engines' staged loaders give exactly the weights the libraries' own loaders give.

Z-Image: compared with diffusers/transformers ``from_pretrained`` of each component.
Wan2.2-S2V: compared with the files read by ``safetensors``/``torch.load`` and
converted the way the official loaders do. Bit for bit, dtype for dtype, buffers
included, in float32 (CPU default) and bf16 (CUDA default).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from storystudio.models.checkpoints.common import read_json
from storystudio.models.checkpoints.wan_s2v import INDEX_FILE, T5_FILE, VAE_FILE, load_torch_state
from storystudio.models.image_generator import ZImageGenerator
from storystudio.models.model_manager import ModelManager
from storystudio.models.video_generator import WanS2VGenerator


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(list(module.named_parameters()) + list(module.named_buffers()))


def assert_same(mine: torch.nn.Module, ref: dict[str, torch.Tensor], what: str) -> None:
    got = tensors(mine)
    assert set(got) >= set(ref), (what, sorted(set(ref) - set(got))[:3])
    for k, v in ref.items():
        assert got[k].dtype == v.dtype, (what, k, got[k].dtype, v.dtype)
        assert torch.equal(got[k], v), (what, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zimage_weights_equal_the_libraries_loaders(tiny_models, dtype):
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Model

    root = tiny_models[0]
    gen = ZImageGenerator.from_pretrained(root, device="cpu", dtype=dtype)
    refs = {
        "transformer": ZImageTransformer2DModel.from_pretrained(root, subfolder="transformer", dtype=dtype),
        "text_encoder": Qwen3Model.from_pretrained(root / "text_encoder", dtype=dtype),
        "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype),
    }
    for name, ref in refs.items():
        assert set(tensors(gen.components()[name])) == set(tensors(ref)), name
        assert_same(gen.components()[name], tensors(ref), name)
    assert gen.components()["text_encoder"].config._attn_implementation == ref_attn(refs["text_encoder"])


def ref_attn(model) -> str:
    return model.config._attn_implementation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_weights_equal_the_files(tiny_models, dtype):
    root = tiny_models[1]
    gen = WanS2VGenerator.from_pretrained(root, device="cpu", dtype=dtype)
    dit = {}
    for shard in sorted(set(read_json(root / INDEX_FILE)["weight_map"].values())):
        with safe_open(str(root / shard), framework="pt") as f:
            dit.update({k: f.get_tensor(k).to(dtype) for k in f.keys()})
    assert_same(gen.transformer, dit, "transformer")
    assert_same(gen.text_encoder.model, {k: v.to(dtype) for k, v in load_torch_state(root / T5_FILE).items()}, "t5")
    assert_same(gen.vae.model, {k: v.float() for k, v in load_torch_state(root / VAE_FILE).items()}, "vae")
    assert gen.vae.mean.device.type == "cpu" and gen.vae.model.training is False


def test_the_manager_loads_the_real_engines_with_parking_buffers_and_the_same_output(tiny_models):
    """Through the ModelManager (budget forcing parking buffers), an image equals from_pretrained's."""
    from storystudio.models.image_generator import ImageRequest

    mgr = ModelManager("cpu", budget_gib=1e-3)
    mgr.register("image", lambda d: ZImageGenerator.plan(tiny_models[0], device=d))
    engine = mgr.ensure("image")
    st = mgr.stats()
    assert st.parking["host"] == ["image.transformer", "image.text_encoder", "image.vae"]
    req = ImageRequest(prompt="a lighthouse", width=256, height=256, steps=2, seed=3)
    a = engine.generate(req).image
    b = ZImageGenerator.from_pretrained(tiny_models[0], device="cpu").generate(req).image
    assert a.tobytes() == b.tobytes()
