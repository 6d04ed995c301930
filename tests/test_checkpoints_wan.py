"""Wan2.2-S2V checkpoint: official layout, tiny writer, full-profile architecture, validator."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from storystudio.errors import CheckpointError
from storystudio.models.checkpoints import wan_s2v as ws
from storystudio.synthetic import wan_s2v as sw


@pytest.fixture(scope="session")
def wan_tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wan") / "Wan2.2-S2V-14B"
    assert sw.main(["--profile", "tiny", "--out", str(out)]) == 0  # the CLI writes + validates
    return out


@pytest.fixture
def copy(wan_tiny, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(wan_tiny, dst)
    return dst


def _error(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as ei:
        ws.validate_wan_s2v(path)
    return ei.value


# ---------------------------------------------------------------- layout


def test_tiny_has_the_official_layout(wan_tiny):
    files = {str(p.relative_to(wan_tiny)) for p in wan_tiny.rglob("*") if p.is_file()}
    assert {
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
        "google/umt5-xxl/tokenizer.json",
        "google/umt5-xxl/tokenizer_config.json",
        "google/umt5-xxl/special_tokens_map.json",
        "wav2vec2-large-xlsr-53-english/config.json",
        "wav2vec2-large-xlsr-53-english/model.safetensors",
        "wav2vec2-large-xlsr-53-english/preprocessor_config.json",
        "wav2vec2-large-xlsr-53-english/vocab.json",
        "wav2vec2-large-xlsr-53-english/tokenizer_config.json",
        "wav2vec2-large-xlsr-53-english/special_tokens_map.json",
    } <= files
    shards = sorted(f for f in files if f.startswith("diffusion_pytorch_model-"))
    assert len(shards) >= 2 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert not any(f.endswith(".part") for f in files)
    index = json.loads((wan_tiny / ws.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    cfg = json.loads((wan_tiny / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel_S2V" and set(ws.REQUIRED_CONFIG_KEYS) <= set(cfg)


def test_files_load_with_the_official_readers_and_dtypes(wan_tiny):
    from safetensors import safe_open

    index = json.loads((wan_tiny / ws.INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    with safe_open(str(wan_tiny / shard), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    t5 = torch.load(wan_tiny / ws.T5_FILE, map_location="cpu", weights_only=True)  # as T5EncoderModel does
    assert t5["token_embedding.weight"].dtype == torch.bfloat16
    vae = torch.load(wan_tiny / ws.VAE_FILE, map_location="cpu", weights_only=True)  # as _video_vae does
    assert all(v.dtype == torch.float32 for v in vae.values())
    for name in (ws.T5_FILE, ws.VAE_FILE):
        with zipfile.ZipFile(wan_tiny / name) as zf:
            assert zf.testzip() is None  # real CRCs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(wan_tiny / ws.TOKENIZER_DIR)
    assert len(tok) <= t5["token_embedding.weight"].shape[0]
    ids = tok(["hello 画面"], add_special_tokens=True).input_ids[0]
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_writer_is_deterministic_per_seed(tmp_path):
    a = sw.write_wan_s2v_checkpoint(tmp_path / "a", "tiny", seed=1)
    b = sw.write_wan_s2v_checkpoint(tmp_path / "b", "tiny", seed=1)
    c = sw.write_wan_s2v_checkpoint(tmp_path / "c", "tiny", seed=2)
    name = sorted(p.name for p in a.glob("diffusion_pytorch_model-*.safetensors"))[0]
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()


def test_full_profile_is_the_release_architecture_on_meta():
    cfg = sw.transformer_config("full")
    model = ws.meta_transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert 16.2e9 < n < 16.4e9, n  # 16.3B params, 32.6 GB in bf16 (the release's 4 shards)
    sd = model.state_dict()
    assert len(sd) == 1260  # tensors in the release's index
    assert not any(k.startswith(("motioner.", "zip_motion_out.")) for k in sd)
    assert len(model.audio_injector.injector) == 12
    assert sd["casual_audio_encoder.weights"].shape == (1, 25, 1, 1)
    specs = sw.specs_of(model, torch.bfloat16)
    shards = sw.plan_shards(specs, 10_000_000_000)
    assert len(shards) == 4 and abs(sum(s.nbytes for s in specs) - 32.59e9) < 0.05e9

    t5 = ws.meta_t5(sw.t5_arch("full"))
    assert 5.6e9 < sum(p.numel() for p in t5.parameters()) < 5.8e9  # 11.4 GB in bf16
    assert ws.t5_arch_from_state({k: tuple(v.shape) for k, v in t5.state_dict().items()}) == sw.t5_arch("full")
    vae = ws.meta_vae(96)
    assert 1.2e8 < sum(p.numel() for p in vae.parameters()) < 1.3e8  # 508 MB in fp32
    w2v = ws.meta_wav2vec(sw.wav2vec_config("full"))
    assert 3.1e8 < sum(p.numel() for p in w2v.parameters()) < 3.2e8  # wav2vec2-large
    assert sw.wav2vec_config("full")["hidden_size"] == cfg["audio_dim"]


def test_tiny_profile_keeps_the_required_official_values():
    tiny, full = sw.transformer_config("tiny"), sw.transformer_config("full")
    for key in ("in_dim", "out_dim", "cond_dim", "enable_framepack", "framepack_drop_mode", "zero_timestep",
                "enable_adain", "adain_mode", "num_audio_token", "text_len"):
        assert tiny[key] == full[key], key
    assert sw.t5_arch("tiny")["dim"] == 4096  # WanModel_S2V's text_dim is not read from config.json
    assert sw.wav2vec_config("tiny")["num_hidden_layers"] == 24  # 25 hidden states
    assert sw.wav2vec_config("tiny")["hidden_size"] == tiny["audio_dim"]


# ---------------------------------------------------------------- validator


def test_valid_folder_passes(wan_tiny):
    assert ws.validate_wan_s2v(wan_tiny) is None


def test_missing_shard_is_named(copy):
    shard = sorted(copy.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    err = _error(copy)
    assert err.code == "checkpoint_missing"
    assert shard.name in err.message


def test_truncated_safetensors_is_named(copy):
    shard = sorted(copy.glob("diffusion_pytorch_model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    err = _error(copy)
    assert err.code == "checkpoint_corrupt"
    assert shard.name in err.message and "truncated" in err.message


def test_missing_vae_is_named(copy):
    (copy / ws.VAE_FILE).unlink()
    err = _error(copy)
    assert err.code == "checkpoint_missing"
    assert ws.VAE_FILE in err.message


@pytest.mark.parametrize("name", [ws.T5_FILE, ws.VAE_FILE])
def test_corrupt_pth_is_named(copy, name):
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 3])
    err = _error(copy)
    assert err.code == "checkpoint_corrupt"
    assert name in err.message


def test_garbage_pth_is_named(copy):
    (copy / ws.T5_FILE).write_bytes(b"\x00not a checkpoint" * 100)
    err = _error(copy)
    assert err.code == "checkpoint_corrupt" and ws.T5_FILE in err.message


def test_config_missing_keys_is_named(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["dim"], cfg["audio_dim"]
    (copy / "config.json").write_text(json.dumps(cfg))
    err = _error(copy)
    assert err.code == "checkpoint_mismatch"
    assert "config.json" in err.message and "dim" in err.message and "audio_dim" in err.message


def test_config_that_does_not_match_the_weights_is_a_mismatch(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["ffn_dim"] = cfg["ffn_dim"] * 2
    (copy / "config.json").write_text(json.dumps(cfg))
    err = _error(copy)
    assert err.code == "checkpoint_mismatch" and "wrong shape" in err.message


def test_every_problem_is_listed_at_once(copy):
    shard = sorted(copy.glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.unlink()
    (copy / ws.VAE_FILE).write_bytes(b"garbage")
    (copy / ws.WAV2VEC_DIR / "preprocessor_config.json").unlink()
    shutil.rmtree(copy / "google")
    err = _error(copy)
    assert err.code == "checkpoint_missing"  # the most actionable code wins
    for part in (shard.name, ws.VAE_FILE, "preprocessor_config.json", "google/umt5-xxl"):
        assert part in err.message, part


def test_missing_folder(tmp_path):
    err = _error(tmp_path / "nope")
    assert err.code == "checkpoint_missing"


def test_legacy_torch_file_is_accepted(copy):
    # A pre-zip torch.save file (official checkpoints may be either) still validates.
    sd = torch.load(copy / ws.VAE_FILE, map_location="cpu", weights_only=True)
    torch.save(sd, copy / ws.VAE_FILE, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(copy / ws.VAE_FILE)
    ws.validate_wan_s2v(copy)
    assert set(ws.load_torch_state(copy / ws.VAE_FILE)) == set(sd)


def test_config_without_optional_keys_is_accepted(copy):
    cfg = json.loads((copy / "config.json").read_text())
    for key in ("_class_name", "_diffusers_version", "in_dim", "out_dim", "text_len", "model_type"):
        cfg.pop(key)
    (copy / "config.json").write_text(json.dumps(cfg))
    ws.validate_wan_s2v(copy)


def test_wav2vec_tokenizer_extras_are_optional(wan_tiny, tmp_path):
    """Wav2Vec2Processor loads without tokenizer_config.json / special_tokens_map.json; so does the validator."""
    import shutil

    copy = tmp_path / "wan"
    shutil.copytree(wan_tiny, copy)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (copy / ws.WAV2VEC_DIR / name).unlink()
    ws.validate_wan_s2v(copy)
    from transformers import Wav2Vec2Processor

    proc = Wav2Vec2Processor.from_pretrained(copy / ws.WAV2VEC_DIR)
    assert proc.feature_extractor.sampling_rate == 16000
