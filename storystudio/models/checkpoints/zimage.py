"""Z-Image-Turbo checkpoint in the official diffusers layout: official values, specs, validator.

The official release (Hugging Face repo ``Tongyi-MAI/Z-Image-Turbo``) is a diffusers
pipeline folder::

    model_index.json
    scheduler/scheduler_config.json
    transformer/config.json
    transformer/diffusion_pytorch_model-0000{1,2,3}-of-00003.safetensors
    transformer/diffusion_pytorch_model.safetensors.index.json
    text_encoder/config.json
    text_encoder/generation_config.json
    text_encoder/model-0000{1,2,3}-of-00003.safetensors
    text_encoder/model.safetensors.index.json
    tokenizer/{tokenizer_config.json,tokenizer.json,vocab.json,merges.txt}
    vae/config.json
    vae/diffusion_pytorch_model.safetensors

Where the official values come from (found with the search tool, then cross-checked
by arithmetic against the published file sizes, see ``OFFICIAL_FILE_FACTS``):

* ``model_index.json`` -- ZImagePipeline; text encoder ``transformers.Qwen3Model``,
  tokenizer ``transformers.Qwen2Tokenizer`` (upstream repo listing, quoted by
  zhutao100/Z-Image.swift docs/z-image-turbo.md).
* transformer config -- dim 3840, 30 layers, 2 refiner layers, 30 heads, cap_feat_dim
  2560, axes_dims [32, 48, 48], axes_lens [1536, 512, 512], rope_theta 256
  (several independent copies of ``transformer/config.json``; the diffusers class
  default axes_lens [1024, 512, 512] is NOT what the release uses).
* VAE -- the 16-channel FLUX autoencoder: block_out_channels [128, 256, 512, 512],
  scaling_factor 0.3611, shift_factor 0.1159, no quant convs.
* text encoder -- Qwen3-4B (hidden 2560, 36 layers, 32 heads / 8 KV heads, head_dim
  128, vocab 151936, tied embeddings), stored with ``model.``-prefixed keys (as saved
  from Qwen3ForCausalLM; Qwen3Model strips the prefix when loading).
* scheduler -- FlowMatchEulerDiscreteScheduler, num_train_timesteps 1000, shift 3.0,
  use_dynamic_shifting false.

The ``*_specs`` helpers build tensor specs (names, shapes) by instantiating the official
classes on the ``meta`` device; ``validate_zimage`` compares a folder with them and raises
one ``CheckpointError`` naming every missing, corrupt or mismatched file. The synthetic
writer of this layout is :mod:`storystudio.synthetic.zimage` (tests, demo, benches only).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from storystudio.models.checkpoints.common import Problems, read_json, read_safetensors_header

log = logging.getLogger(__name__)

WHAT = "Z-Image-Turbo"

# --------------------------------------------------------------------------------------
# Official values (Tongyi-MAI/Z-Image-Turbo)
# --------------------------------------------------------------------------------------

OFFICIAL_DIFFUSERS_VERSION = "0.36.0.dev0"

MODEL_INDEX: dict = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "shift": 3.0,
}

TRANSFORMER_CONFIG: dict = {
    "_class_name": "ZImageTransformer2DModel",
    "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}

VAE_CONFIG: dict = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

# Qwen3-4B, as shipped in text_encoder/config.json.
TEXT_ENCODER_CONFIG: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Key prefix of the text encoder weights in the official shards.
TEXT_ENCODER_KEY_PREFIX = "model."

# Facts about the official files, used to check the writer reproduces the layout.
# The index sizes are reproduced byte-for-byte by this writer's index JSON (tested).
OFFICIAL_FILE_FACTS: dict = {
    "transformer_params": 6_154_908_736,
    # The release stores the transformer in float32: 3 shards of <= 10 GB.
    "transformer_total_size_fp32": 24_619_634_944,
    "transformer_index_bytes": 48_969,
    "text_encoder_params": 4_022_468_096,
    "text_encoder_total_size_bf16": 8_044_936_192,
    "text_encoder_index_bytes": 32_819,
    "text_encoder_shard_bytes": (3_957_900_840, 3_987_450_520, 99_630_640),
    "vae_params": 83_819_683,
    "vae_file_bytes_bf16": 167_666_902,
}

# --------------------------------------------------------------------------------------
# Tensor specs from the official classes on the meta device
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _strip_meta(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _meta_state_specs(module) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def transformer_specs(config: dict) -> list[TensorSpec]:
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(_strip_meta(config))
    return _meta_state_specs(model)


def vae_specs(config: dict) -> list[TensorSpec]:
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL.from_config(_strip_meta(config))
    return _meta_state_specs(model)


def text_encoder_specs(config: dict, *, prefix: str = TEXT_ENCODER_KEY_PREFIX) -> list[TensorSpec]:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    skip = ("architectures", "model_type", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id")
    kwargs = {k: v for k, v in config.items() if k not in skip}
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**kwargs))
    return [TensorSpec(prefix + s.name, s.shape) for s in _meta_state_specs(model)]


def count_params(specs: Iterable[TensorSpec]) -> int:
    return sum(s.numel for s in specs)


# --------------------------------------------------------------------------------------
# Validator
# --------------------------------------------------------------------------------------

# component -> (config keys that must be present, weight file stem)
_REQUIRED_KEYS = {
    "transformer": ("dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "in_channels",
                    "cap_feat_dim", "axes_dims", "axes_lens", "all_patch_size", "all_f_patch_size"),
    "vae": ("block_out_channels", "latent_channels", "layers_per_block", "down_block_types",
            "up_block_types", "scaling_factor", "shift_factor"),
    "text_encoder": ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size"),
}
_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt")


def _check_config(p: Problems, comp: str, expected_class: str | None) -> dict | None:
    rel = f"{comp}/config.json"
    path = p.root / rel
    if not path.is_file():
        p.missing(rel, f"{comp} config")
        return None
    try:
        cfg = read_json(path)
    except ValueError as exc:
        p.corrupt(rel, str(exc))
        return None
    if not isinstance(cfg, dict):
        p.corrupt(rel, "not a JSON object")
        return None
    missing = [k for k in _REQUIRED_KEYS[comp] if k not in cfg]
    if missing:
        p.mismatch(rel, f"missing keys {missing}")
        return None
    if comp == "text_encoder":
        if cfg.get("model_type") != "qwen3":
            p.mismatch(rel, f"model_type is {cfg.get('model_type')!r}, expected 'qwen3'")
            return None
    elif expected_class and cfg.get("_class_name") not in (None, expected_class):
        p.mismatch(rel, f"_class_name is {cfg.get('_class_name')!r}, expected {expected_class!r}")
        return None
    return cfg


def _expected_specs(p: Problems, comp: str, cfg: dict) -> dict[str, tuple[int, ...]] | None:
    try:
        if comp == "transformer":
            specs = transformer_specs(cfg)
        elif comp == "vae":
            specs = vae_specs(cfg)
        else:
            specs = text_encoder_specs(cfg, prefix="")
    except Exception as exc:  # a config the official class rejects
        p.mismatch(f"{comp}/config.json", f"official class rejects it ({type(exc).__name__}: {exc})")
        return None
    return {s.name: s.shape for s in specs}


def _check_weights(p: Problems, comp: str, expected: dict[str, tuple[int, ...]] | None) -> None:
    stem = _STEMS[comp]
    folder = p.root / comp
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    found: dict[str, tuple[str, tuple[int, ...]]] = {}  # tensor -> (rel file, shape)
    complete = True
    if index.is_file():
        rel_idx = f"{comp}/{index.name}"
        try:
            idx = read_json(index)
            weight_map = idx["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
        except (ValueError, KeyError, TypeError) as exc:
            p.corrupt(rel_idx, f"unreadable index ({exc})")
            return
        shards: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            shards.setdefault(str(fname), []).append(tensor)
        for fname, tensors in sorted(shards.items()):
            rel = f"{comp}/{fname}"
            path = folder / fname
            if not path.is_file():
                p.missing(rel, f"listed in {rel_idx}")
                complete = False
                continue
            try:
                header = read_safetensors_header(path)
            except (ValueError, OSError) as exc:
                p.corrupt(rel, str(exc))
                complete = False
                continue
            absent = [t for t in tensors if t not in header]
            if absent:
                p.mismatch(rel, f"{len(absent)} tensors listed in {rel_idx} are not in it (e.g. {absent[0]})")
                complete = False
            for t in tensors:
                if t in header:
                    found[t] = (rel, tuple(header[t]["shape"]))
    elif single.is_file():
        rel = f"{comp}/{single.name}"
        try:
            header = read_safetensors_header(single)
        except (ValueError, OSError) as exc:
            p.corrupt(rel, str(exc))
            return
        found = {t: (rel, tuple(v["shape"])) for t, v in header.items()}
    else:
        p.missing(f"{comp}/{index.name}", f"or {comp}/{single.name}: no {comp} weights")
        return
    if expected is None:
        return
    # Text encoder keys may carry the "model." prefix (official) or not.
    def canon(name: str) -> str:
        if comp == "text_encoder" and name.startswith(TEXT_ENCODER_KEY_PREFIX):
            return name[len(TEXT_ENCODER_KEY_PREFIX):]
        return name

    have = {canon(k): v for k, v in found.items() if not (comp == "text_encoder" and canon(k) == "lm_head.weight")}
    if complete:
        lacking = sorted(set(expected) - set(have))
        if lacking:
            where = sorted({f for f, _ in found.values()}) or [f"{comp}/"]
            p.mismatch(where[0] if len(where) == 1 else f"{comp}/",
                       f"{len(lacking)} {comp} tensors missing from the weights (e.g. {lacking[0]})")
    for name, (rel, shape) in sorted(have.items()):
        want = expected.get(name)
        if want is not None and want != shape:
            p.mismatch(rel, f"tensor {name} has shape {list(shape)}, config.json implies {list(want)}")
            break


def _check_tokenizer(p: Problems, text_cfg: dict | None) -> None:
    ok = True
    for name in TOKENIZER_FILES:
        rel = f"tokenizer/{name}"
        if not (p.root / rel).is_file():
            p.missing(rel, "tokenizer")
            ok = False
    if not ok:
        return
    try:
        tcfg = read_json(p.root / "tokenizer/tokenizer_config.json")
    except ValueError as exc:
        p.corrupt("tokenizer/tokenizer_config.json", str(exc))
        return
    has_template = bool(tcfg.get("chat_template")) or (p.root / "tokenizer/chat_template.jinja").is_file()
    if not has_template:
        p.mismatch("tokenizer/tokenizer_config.json", "no chat_template (ZImagePipeline uses apply_chat_template)")
    try:
        tj = read_json(p.root / "tokenizer/tokenizer.json")
        vocab = tj["model"]["vocab"]
        ids = list(vocab.values()) + [int(a["id"]) for a in tj.get("added_tokens", [])]
    except (ValueError, KeyError, TypeError) as exc:
        p.corrupt("tokenizer/tokenizer.json", f"not a tokenizers BPE file ({exc})")
        return
    try:
        read_json(p.root / "tokenizer/vocab.json")
    except ValueError as exc:
        p.corrupt("tokenizer/vocab.json", str(exc))
    if text_cfg and ids and max(ids) >= int(text_cfg["vocab_size"]):
        p.mismatch("tokenizer/tokenizer.json",
                   f"token id {max(ids)} does not fit the text encoder vocab_size {text_cfg['vocab_size']}")


def validate_zimage(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` listing every missing/corrupt/mismatched file."""
    root = Path(path)
    p = Problems(root=root, what=WHAT)
    if not root.is_dir():
        p.missing("", "checkpoint folder does not exist")
        p.raise_if_any()

    # model_index.json
    if not (root / "model_index.json").is_file():
        p.missing("model_index.json", "pipeline index")
    else:
        try:
            mi = read_json(root / "model_index.json")
            if not isinstance(mi, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            p.corrupt("model_index.json", str(exc))
        else:
            if mi.get("_class_name") != MODEL_INDEX["_class_name"]:
                p.mismatch("model_index.json", f"_class_name is {mi.get('_class_name')!r}, expected 'ZImagePipeline'")
            for comp in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
                entry = mi.get(comp)
                if not (isinstance(entry, list) and len(entry) == 2):
                    p.mismatch("model_index.json", f"component {comp!r} missing or malformed ({entry!r})")
                elif entry[1] != MODEL_INDEX[comp][1] and not (comp == "tokenizer" and "Qwen2Tokenizer" in entry[1]):
                    p.mismatch("model_index.json", f"component {comp!r} is {entry!r}, expected {MODEL_INDEX[comp]!r}")

    # scheduler
    rel = "scheduler/scheduler_config.json"
    if not (root / rel).is_file():
        p.missing(rel, "scheduler config")
    else:
        try:
            sc = read_json(root / rel)
            if sc.get("_class_name") != SCHEDULER_CONFIG["_class_name"]:
                p.mismatch(rel, f"_class_name is {sc.get('_class_name')!r}, expected 'FlowMatchEulerDiscreteScheduler'")
        except (ValueError, AttributeError) as exc:
            p.corrupt(rel, str(exc))

    cfgs: dict[str, dict | None] = {}
    for comp, cls in (("transformer", "ZImageTransformer2DModel"), ("vae", "AutoencoderKL"), ("text_encoder", None)):
        cfg = _check_config(p, comp, cls)
        cfgs[comp] = cfg
        expected = _expected_specs(p, comp, cfg) if cfg is not None else None
        _check_weights(p, comp, expected)

    # cross-component consistency
    t, te, v = cfgs["transformer"], cfgs["text_encoder"], cfgs["vae"]
    if t and te and t.get("cap_feat_dim") != te.get("hidden_size"):
        p.mismatch("transformer/config.json",
                   f"cap_feat_dim {t.get('cap_feat_dim')} != text encoder hidden_size {te.get('hidden_size')}")
    if t and v and t.get("in_channels") != v.get("latent_channels"):
        p.mismatch("transformer/config.json",
                   f"in_channels {t.get('in_channels')} != vae latent_channels {v.get('latent_channels')}")

    _check_tokenizer(p, te)
    p.raise_if_any()
