"""Z-Image-Turbo checkpoint: official layout, tiny writer, full-profile specs, validator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from storystudio.errors import CheckpointError
from storystudio.models.checkpoints import zimage as zi
from storystudio.synthetic import zimage as sz


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zimage") / "Z-Image-Turbo"
    assert sz.main(["--profile", "tiny", "--out", str(out)]) == 0  # the CLI writes + validates
    return out


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny, dst)
    return dst


def _error(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as ei:
        zi.validate_zimage(path)
    return ei.value


# ---------------------------------------------------------------- layout


def test_tiny_has_the_official_layout(tiny):
    files = {str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file()}
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    } <= files
    shards = sorted(f for f in files if f.startswith("transformer/diffusion_pytorch_model-"))
    assert shards == [f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert any(f == "text_encoder/model-00001-of-00003.safetensors" for f in files)
    assert not any(f.endswith(".partial") for f in files)
    assert json.loads((tiny / "model_index.json").read_text()) == zi.MODEL_INDEX
    assert json.loads((tiny / "scheduler/scheduler_config.json").read_text()) == zi.SCHEDULER_CONFIG
    zi.validate_zimage(tiny)


def test_official_components_load_the_written_weights(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from safetensors.torch import load_file
    from transformers import Qwen3Model

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler")
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting

    te = Qwen3Model.from_pretrained(tiny / "text_encoder", dtype=torch.float32)
    stored = {}
    for f in sorted((tiny / "text_encoder").glob("model-*.safetensors")):
        stored.update(load_file(f))
    assert all(k.startswith("model.") for k in stored)  # official key prefix
    for k, v in te.state_dict().items():
        assert torch.equal(v, stored["model." + k].float()), k

    tr = ZImageTransformer2DModel.from_pretrained(tiny, subfolder="transformer", dtype=torch.float32)
    stored = {}
    for f in sorted((tiny / "transformer").glob("diffusion_pytorch_model-*.safetensors")):
        stored.update(load_file(f))
    assert set(stored) == set(tr.state_dict())
    assert all(torch.equal(v, stored[k].float()) for k, v in tr.state_dict().items())


def test_tokenizer_is_qwen2_with_the_qwen3_chat_format(tiny):
    from transformers import AutoTokenizer, Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(tiny / "tokenizer")
    assert type(AutoTokenizer.from_pretrained(tiny / "tokenizer")).__name__ == "Qwen2Tokenizer"
    text = tok.apply_chat_template([{"role": "user", "content": "a red fox"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    assert tok.decode(ids) == text  # byte-level: lossless, no unknown tokens
    assert tok.pad_token == "<|endoftext|>"
    te_vocab = json.loads((tiny / "text_encoder/config.json").read_text())["vocab_size"]
    assert len(tok) <= te_vocab


def test_writer_is_deterministic_per_seed(tmp_path):
    from safetensors.torch import load_file

    a = sz.write_zimage_checkpoint(tmp_path / "a", "tiny", seed=3)
    b = sz.write_zimage_checkpoint(tmp_path / "b", "tiny", seed=3)
    c = sz.write_zimage_checkpoint(tmp_path / "c", "tiny", seed=4)
    rel = "vae/diffusion_pytorch_model.safetensors"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    va, vc = load_file(a / rel), load_file(c / rel)
    key = "decoder.conv_in.weight"
    assert va[key].dtype == torch.bfloat16
    assert not torch.equal(va[key], vc[key])


def test_streaming_writer_round_trips(tmp_path):
    from safetensors.torch import load_file

    specs = [zi.TensorSpec("a.weight", (3, 5)), zi.TensorSpec("a.bias", (3,)), zi.TensorSpec("n.weight", (7,))]
    tensors = {"a.weight": torch.randn(3, 5), "a.bias": torch.randn(3), "n.weight": torch.randn(7)}
    n = sz.write_safetensors_streaming(tmp_path / "x.safetensors", specs, lambda s: tensors[s.name], torch.float32)
    assert n == (15 + 3 + 7) * 4
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(RuntimeError):
        sz.write_safetensors_streaming(tmp_path / "y.safetensors", specs, lambda s: torch.zeros(1), torch.float32)
    assert not (tmp_path / "y.safetensors").exists()


# ---------------------------------------------------------------- full profile by construction


def test_full_profile_specs_match_the_release():
    spec = sz.profile_spec("full")
    t = zi.transformer_specs(spec.transformer)  # meta tensors: no allocation
    n = zi.count_params(t)
    assert abs(n - 6.15e9) / 6.15e9 < 0.01
    assert n == zi.OFFICIAL_FILE_FACTS["transformer_params"]
    te = zi.text_encoder_specs(spec.text_encoder)
    assert zi.count_params(te) == zi.OFFICIAL_FILE_FACTS["text_encoder_params"]
    assert all(s.name.startswith("model.") for s in te)
    assert zi.count_params(zi.vae_specs(spec.vae)) == zi.OFFICIAL_FILE_FACTS["vae_params"]
    assert spec.transformer["axes_lens"] == [1536, 512, 512]
    assert spec.text_encoder["vocab_size"] == 151936


def test_full_profile_shards_reproduce_the_official_indexes():
    spec = sz.profile_spec("full")
    facts = zi.OFFICIAL_FILE_FACTS
    t = zi.transformer_specs(spec.transformer)
    # float32 (as released) and bf16 (our default, shard limit scaled) give the same shards
    fp32 = sz.plan_shards(t, 4, spec.transformer_shard_bytes_fp32)
    bf16 = sz.plan_shards(t, 2, spec.transformer_shard_bytes_fp32 // 2)
    assert len(fp32) == 3 and [[s.name for s in x] for x in fp32] == [[s.name for s in x] for x in bf16]
    wm = {s.name: f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i, sh in enumerate(fp32, 1) for s in sh}
    idx = sz.index_json(wm, facts["transformer_total_size_fp32"])
    assert len(idx.encode()) == facts["transformer_index_bytes"]

    te = zi.text_encoder_specs(spec.text_encoder)
    shards = sz.plan_shards(te, 2, spec.text_encoder_shard_bytes)
    assert len(shards) == 3
    data = [sum(s.numel * 2 for s in sh) for sh in shards]
    assert sum(data) == facts["text_encoder_total_size_bf16"]
    # official shard files = data + a small JSON header
    for got, official in zip(data, facts["text_encoder_shard_bytes"]):
        assert 0 < official - got < 64_000
    wm = {s.name: f"model-0000{i}-of-00003.safetensors" for i, sh in enumerate(shards, 1) for s in sh}
    assert len(sz.index_json(wm, sum(data)).encode()) == facts["text_encoder_index_bytes"]


# ---------------------------------------------------------------- validator


def test_missing_folder(tmp_path):
    err = _error(tmp_path / "nope")
    assert err.code == "checkpoint_missing" and "nope" in err.message


def test_index_pointing_at_missing_shard(copy):
    (copy / "transformer/diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    err = _error(copy)
    assert err.code == "checkpoint_missing"
    assert "transformer/diffusion_pytorch_model-00002-of-00003.safetensors" in err.message


def test_truncated_safetensors(copy):
    f = copy / "text_encoder/model-00001-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    err = _error(copy)
    assert err.code == "checkpoint_corrupt"
    assert "text_encoder/model-00001-of-00003.safetensors" in err.message and "truncated" in err.message


def test_garbage_vae(copy):
    (copy / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file at all")
    err = _error(copy)
    assert err.code == "checkpoint_corrupt" and "vae/diffusion_pytorch_model.safetensors" in err.message


def test_missing_tokenizer(copy):
    shutil.rmtree(copy / "tokenizer")
    err = _error(copy)
    assert err.code == "checkpoint_missing"
    for name in zi.TOKENIZER_FILES:
        assert f"tokenizer/{name}" in err.message


def test_tokenizer_without_chat_template(copy):
    f = copy / "tokenizer/tokenizer_config.json"
    cfg = json.loads(f.read_text())
    del cfg["chat_template"]
    f.write_text(json.dumps(cfg))
    err = _error(copy)
    assert err.code == "checkpoint_mismatch" and "chat_template" in err.message


def test_bad_model_index(copy):
    (copy / "model_index.json").write_text("{not json")
    err = _error(copy)
    assert err.code == "checkpoint_corrupt" and "model_index.json" in err.message


def test_model_index_naming_other_classes(copy):
    mi = dict(zi.MODEL_INDEX, text_encoder=["transformers", "T5EncoderModel"])
    (copy / "model_index.json").write_text(json.dumps(mi))
    err = _error(copy)
    assert err.code == "checkpoint_mismatch" and "text_encoder" in err.message


def test_missing_subfolder_config(copy):
    (copy / "vae/config.json").unlink()
    err = _error(copy)
    assert err.code == "checkpoint_missing" and "vae/config.json" in err.message


def test_config_that_does_not_match_the_weights(copy):
    f = copy / "transformer/config.json"
    cfg = json.loads(f.read_text())
    cfg["n_layers"] += 1
    f.write_text(json.dumps(cfg))
    err = _error(copy)
    assert err.code == "checkpoint_mismatch" and "layers.2." in err.message


def test_every_problem_is_reported_at_once(copy):
    (copy / "transformer/diffusion_pytorch_model-00003-of-00003.safetensors").unlink()
    (copy / "scheduler/scheduler_config.json").write_text("[")
    (copy / "tokenizer/merges.txt").unlink()
    f = copy / "text_encoder/model-00002-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    err = _error(copy)
    assert err.code == "checkpoint_missing"  # the most actionable code wins
    for rel in ("transformer/diffusion_pytorch_model-00003-of-00003.safetensors", "scheduler/scheduler_config.json",
                "tokenizer/merges.txt", "text_encoder/model-00002-of-00003.safetensors"):
        assert rel in err.message, rel


def test_cli_validate_only(copy):
    assert sz.main(["--profile", "tiny", "--out", str(copy), "--validate-only"]) == 0
    (copy / "model_index.json").unlink()
    assert sz.main(["--profile", "tiny", "--out", str(copy), "--validate-only"]) == 1
