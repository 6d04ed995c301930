"""Z-Image-Turbo checkpoint in the official diffusers layout: synthetic writer + validator.

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

The synthetic writer builds tensor *specs* (names, shapes) by instantiating the
official classes on the ``meta`` device, then streams random tensors generated on
``device`` straight into safetensors files one tensor at a time, so the full profile
(6.15B-parameter transformer, Qwen3-4B encoder) never lives in host memory.

Measured on a lent H100 (torch 2.11, diffusers 0.42.1, transformers 5.23): the full bf16
profile (20.5 GB) writes in 23 s with ``device="cuda"``, validates in 0.2 s; its index
files are byte-identical in size to the release's (48,969 and 32,819 bytes) and the
text-encoder shards 1-2 have exactly the release's byte sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from storystudio.errors import CheckpointError
from storystudio.models.checkpoints.common import PROFILES, Problems, read_json, read_safetensors_header

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

# Shard limits (bytes of tensor data). The release used diffusers' 10 GB default for
# the float32 transformer and 4 GB for the bf16 text encoder. We scale the transformer
# limit with the element size so a bf16 transformer gets the *same* three shards and
# the same weight_map as the official float32 one.
TRANSFORMER_SHARD_BYTES_FP32 = 10_000_000_000
TEXT_ENCODER_SHARD_BYTES = 4_000_000_000

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EXTRA_TOKENS = ("<think>", "</think>")

# A Qwen3-compatible chat template: for one user message with add_generation_prompt and
# enable_thinking=True (what ZImagePipeline asks for) it renders exactly what Qwen3's
# official template renders: "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# --------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------

TINY_TOKENIZER_VOCAB = 384  # BPE vocab incl. the 256 byte symbols; specials are appended


@dataclass(frozen=True)
class ProfileSpec:
    transformer: dict
    vae: dict
    text_encoder: dict
    tokenizer_vocab: int
    transformer_shard_bytes_fp32: int
    text_encoder_shard_bytes: int


def _tiny_text_vocab() -> int:
    # Room for the BPE vocab + special/added tokens, rounded up like real embeddings.
    n = TINY_TOKENIZER_VOCAB + len(SPECIAL_TOKENS) + len(EXTRA_TOKENS)
    return int(math.ceil(n / 64) * 64)


def profile_spec(profile: str) -> ProfileSpec:
    if profile == "full":
        return ProfileSpec(
            transformer=dict(TRANSFORMER_CONFIG),
            vae=dict(VAE_CONFIG),
            text_encoder=dict(TEXT_ENCODER_CONFIG),
            tokenizer_vocab=4096,
            transformer_shard_bytes_fp32=TRANSFORMER_SHARD_BYTES_FP32,
            text_encoder_shard_bytes=TEXT_ENCODER_SHARD_BYTES,
        )
    if profile == "tiny":
        transformer = dict(TRANSFORMER_CONFIG)
        # head_dim = dim / n_heads must equal sum(axes_dims) (asserted by the class).
        transformer.update(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                           cap_feat_dim=32, axes_dims=[4, 6, 6])
        vae = dict(VAE_CONFIG)
        # Four blocks keep vae_scale_factor = 8 (so sizes stay multiples of 16);
        # 32 channels is the smallest width GroupNorm(32) allows.
        vae.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
        text = dict(TEXT_ENCODER_CONFIG)
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_window_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                    max_position_embeddings=1024, vocab_size=_tiny_text_vocab())
        return ProfileSpec(
            transformer=transformer,
            vae=vae,
            text_encoder=text,
            tokenizer_vocab=TINY_TOKENIZER_VOCAB,
            # Small limits so the tiny checkpoint is sharded like the full one
            # (exercises the index + shard code paths).
            transformer_shard_bytes_fp32=600_000,
            text_encoder_shard_bytes=30_000,
        )
    raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")


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
# Streaming safetensors writer
# --------------------------------------------------------------------------------------

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _init_tensor(spec: TensorSpec, dtype, device, gen):
    """Synthetic weights with a sane scale: norms 1, biases 0, matrices N(0, 1/fan_in)."""
    import torch

    if len(spec.shape) <= 1:
        if spec.name.endswith("bias"):
            return torch.zeros(spec.shape, dtype=dtype, device=device)
        return torch.ones(spec.shape, dtype=dtype, device=device)
    fan_in = math.prod(spec.shape[1:])
    t = torch.randn(spec.shape, generator=gen, dtype=dtype, device=device)
    return t.mul_(1.0 / math.sqrt(fan_in))


def write_safetensors_streaming(
    path: Path,
    specs: list[TensorSpec],
    make: Callable[[TensorSpec], "object"],
    dtype,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor; returns the data size in bytes.

    The header is computed from the specs up front, then each tensor is produced by
    ``make`` (on any device), copied to host memory and written while the next one is
    being produced, so peak host memory is about two tensors.
    """
    import torch

    itemsize = _itemsize(dtype)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        n = s.numel * itemsize
        header[s.name] = {"dtype": _ST_DTYPES[_dtype_name(dtype)], "shape": list(s.shape),
                          "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    tmp = path.with_name(path.name + ".partial")
    q: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with tmp.open("wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                while True:
                    item = q.get()
                    if item is None:
                        break
                    f.write(memoryview(item.view(torch.uint8).numpy()))
        except BaseException as exc:  # surfaced in the producer below
            errors.append(exc)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    th = threading.Thread(target=writer, name=f"st-writer-{path.name}", daemon=True)
    th.start()
    try:
        for s in specs:
            if errors:
                break
            t = make(s)
            if t.dtype != dtype or tuple(t.shape) != s.shape:
                raise RuntimeError(f"tensor {s.name}: got {t.dtype} {tuple(t.shape)}, want {dtype} {s.shape}")
            q.put(t.detach().contiguous().to("cpu").reshape(-1))
    finally:
        q.put(None)
        th.join()
    if errors:
        tmp.unlink(missing_ok=True)
        raise errors[0]
    os.replace(tmp, path)
    return offset


def plan_shards(specs: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy sharding in state-dict order, as transformers/diffusers ``save_pretrained`` do."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = s.numel * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """The index file exactly as transformers/diffusers 4.x/0.3x write it."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def write_sharded(
    folder: Path,
    stem: str,
    specs: list[TensorSpec],
    *,
    dtype,
    device,
    seed: int,
    max_shard_bytes: int,
) -> list[Path]:
    """Write ``{stem}-0000N-of-0000M.safetensors`` + ``{stem}.safetensors.index.json``.

    With a single shard, writes ``{stem}.safetensors`` and no index (the library convention).
    """
    import torch

    itemsize = _itemsize(dtype)
    shards = plan_shards(specs, itemsize, max_shard_bytes)
    gen = torch.Generator(device=device).manual_seed(seed)

    def make(s: TensorSpec):
        return _init_tensor(s, dtype, device, gen)

    written: list[Path] = []
    if len(shards) == 1:
        p = folder / f"{stem}.safetensors"
        write_safetensors_streaming(p, shards[0], make, dtype)
        return [p]
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors_streaming(folder / name, shard, make, dtype)
        weight_map.update({s.name: name for s in shard})
        written.append(folder / name)
    idx = folder / f"{stem}.safetensors.index.json"
    idx.write_text(index_json(weight_map, total))
    written.append(idx)
    return written


# --------------------------------------------------------------------------------------
# Tokenizer (trained locally: no hub access at run time)
# --------------------------------------------------------------------------------------

_WORDS = (
    "a the of and in on with under over near by at from to for is are was were be "
    "cat dog fox bird horse dragon robot child girl boy woman man old young king queen "
    "red green blue yellow orange purple black white golden silver bright dark soft "
    "forest river mountain city castle village sea sky sun moon star night morning rain "
    "snow garden house room window door road bridge tower ship train lamp book story "
    "walks runs flies sits sleeps sings reads looks smiles waves plays watches holds "
    "photo painting illustration portrait cinematic detailed watercolor lighting style "
    "\u4e00\u5e45 \u753b\u9762 \u5c0f\u732b \u68ee\u6797 \u6625\u5929 \u706b\u8f66"
).split()


def _corpus(n: int = 3000) -> list[str]:
    import random

    rng = random.Random(1234)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 2048)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ""]))
    return lines


def write_tokenizer(folder: Path, vocab_size: int) -> dict[str, int]:
    """Train a small byte-level BPE with Qwen2's pre-tokenizer and write the official files.

    Returns the ids of the special tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    # Same pipeline as transformers' Qwen2Tokenizer.
    pretokenize = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pretokenize), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])

    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder), None)  # vocab.json + merges.txt

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + EXTRA_TOKENS}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t in SPECIAL_TOKENS}
        for t in SPECIAL_TOKENS + EXTRA_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(folder / "tokenizer_config.json", config)
    return ids


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _resolve_dtype(dtype):
    import torch

    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, str):
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]
    return dtype


def write_zimage_checkpoint(
    out_dir: str | os.PathLike,
    profile: str = "tiny",
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype=None,
    transformer_dtype=None,
) -> Path:
    """Write a synthetic Z-Image-Turbo checkpoint in the official diffusers layout.

    ``profile="tiny"`` is a few hundred KB and runs on CPU in seconds; ``"full"`` has the
    real sizes (6.15B transformer, Qwen3-4B text encoder, FLUX VAE) and should be written
    with ``device="cuda"``. ``dtype`` (default bf16) is used for every weight file;
    ``transformer_dtype`` overrides it for the transformer (the release itself stores
    the transformer in float32 -- pass ``torch.float32`` to reproduce its 24.6 GB).
    ``model_index.json`` is written last, so an interrupted write is never mistaken for
    a complete checkpoint.
    """
    import torch

    spec = profile_spec(profile)
    dtype = _resolve_dtype(dtype)
    tdtype = _resolve_dtype(transformer_dtype) if transformer_dtype is not None else dtype
    device = torch.device(device)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").unlink(missing_ok=True)
    t0 = time.perf_counter()

    # tokenizer first: the tiny text encoder's vocab must cover it
    ids = write_tokenizer(root / "tokenizer", spec.tokenizer_vocab)
    if max(ids.values()) >= spec.text_encoder["vocab_size"]:
        raise RuntimeError("tokenizer larger than the text encoder vocabulary")

    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    # transformer
    tdir = root / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    _write_json(tdir / "config.json", spec.transformer)
    shard = spec.transformer_shard_bytes_fp32 * _itemsize(tdtype) // 4
    write_sharded(tdir, "diffusion_pytorch_model", transformer_specs(spec.transformer), dtype=tdtype,
                  device=device, seed=seed, max_shard_bytes=shard)
    log.info("transformer written (%.1fs)", time.perf_counter() - t0)

    # text encoder
    edir = root / "text_encoder"
    edir.mkdir(parents=True, exist_ok=True)
    text_cfg = dict(spec.text_encoder, torch_dtype=_dtype_name(dtype))
    if profile != "full":  # the tiny vocab cannot hold Qwen's ids: point at our tokenizer's
        text_cfg.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    _write_json(edir / "config.json", text_cfg)
    _write_json(edir / "generation_config.json", {
        "bos_token_id": text_cfg["bos_token_id"], "do_sample": True,
        "eos_token_id": [text_cfg["eos_token_id"], text_cfg["bos_token_id"]],
        "pad_token_id": text_cfg["bos_token_id"], "temperature": 0.6, "top_k": 20, "top_p": 0.95,
        "transformers_version": text_cfg["transformers_version"],
    })
    write_sharded(edir, "model", text_encoder_specs(spec.text_encoder), dtype=dtype, device=device,
                  seed=seed + 1, max_shard_bytes=spec.text_encoder_shard_bytes)
    log.info("text encoder written (%.1fs)", time.perf_counter() - t0)

    # vae: one file, as released
    vdir = root / "vae"
    vdir.mkdir(parents=True, exist_ok=True)
    _write_json(vdir / "config.json", spec.vae)
    write_sharded(vdir, "diffusion_pytorch_model", vae_specs(spec.vae), dtype=dtype, device=device,
                  seed=seed + 2, max_shard_bytes=1 << 62)
    log.info("vae written (%.1fs)", time.perf_counter() - t0)

    _write_json(root / "model_index.json", MODEL_INDEX)
    log.info("Z-Image-Turbo %s checkpoint written to %s in %.1fs", profile, root, time.perf_counter() - t0)
    return root


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


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a synthetic Z-Image-Turbo checkpoint (official diffusers layout).")
    ap.add_argument("--profile", choices=PROFILES, required=True)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", default="cpu", help="where tensors are generated (use cuda for --profile full)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--transformer-dtype", default=None, choices=["bf16", "fp32", "fp16"],
                    help="override for the transformer (the release stores it in fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validate-only", action="store_true", help="only validate --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.validate_only:
        try:
            validate_zimage(args.out)
        except CheckpointError as exc:
            log.error("%s: %s", exc.code, exc.message)
            return 1
        log.info("%s is a valid Z-Image-Turbo checkpoint", args.out)
        return 0
    t0 = time.perf_counter()
    write_zimage_checkpoint(args.out, args.profile, seed=args.seed, device=args.device, dtype=args.dtype,
                            transformer_dtype=args.transformer_dtype)
    validate_zimage(args.out)
    log.info("done: wrote and validated %s in %.1fs", args.out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
