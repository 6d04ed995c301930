"""The official Wan2.2-S2V-14B folder layout: synthetic writer (tiny/full) and validator.

Layout (as on the Hugging Face repo ``Wan-AI/Wan2.2-S2V-14B``)::

    config.json                                          WanModel_S2V (diffusers ConfigMixin)
    diffusion_pytorch_model-0000N-of-0000M.safetensors   DiT shards, bf16
    diffusion_pytorch_model.safetensors.index.json
    models_t5_umt5-xxl-enc-bf16.pth                      umt5-xxl encoder state dict, bf16
    Wan2.1_VAE.pth                                       Wan2.1 VAE state dict, fp32
    google/umt5-xxl/                                     tokenizer (config.t5_tokenizer)
    wav2vec2-large-xlsr-53-english/                      transformers Wav2Vec2ForCTC folder

``write_wan_s2v_checkpoint`` writes that layout with seeded random weights. The tensor
names and shapes come from the official module classes instantiated on the ``meta``
device, so the ``full`` profile is the real architecture (DiT 16.3B parameters) by
construction. Tensors are generated on ``device`` one at a time and streamed into
their files (safetensors shards and torch zip ``.pth`` alike), so host memory holds
at most one tensor per writer thread, never a whole model.

``validate_wan_s2v`` checks a folder (official download or synthetic) and raises one
``CheckpointError`` naming every missing, corrupt or mismatched file.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import math
import pickle
import struct
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from storystudio.errors import CheckpointError
from storystudio.models.checkpoints.common import (
    PROFILES,
    Problems,
    Profile,
    read_json,
    read_safetensors_header,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- layout

CONFIG_FILE = "config.json"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SHARD_PATTERN = "diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"  # s2v_14B.t5_checkpoint
VAE_FILE = "Wan2.1_VAE.pth"  # s2v_14B.vae_checkpoint
TOKENIZER_DIR = "google/umt5-xxl"  # s2v_14B.t5_tokenizer, relative to the folder
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"  # s2v_14B.wav2vec
# What Wav2Vec2ForCTC + Wav2Vec2Processor cannot load without. tokenizer_config.json and
# special_tokens_map.json are written by the synthetic writer but not required: the
# processor falls back to defaults, and whether the release ships them is unverified.
WAV2VEC_FILES = (
    "config.json",
    "preprocessor_config.json",
    "vocab.json",
)
WAV2VEC_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

# config.json keys the S2V architecture depends on (WanModel_S2V.__init__ arguments whose
# defaults differ from the release, so a config without them would build another model).
# Other keys may be absent: their defaults are the release's values; a wrong value is
# still caught by comparing the shards with the model the config builds.
REQUIRED_CONFIG_KEYS = (
    "dim",
    "ffn_dim",
    "num_heads",
    "num_layers",
    "cond_dim",
    "audio_dim",
    "audio_inject_layers",
    "enable_adain",
    "enable_framepack",
    "enable_motioner",
    "framepack_drop_mode",
    "zero_timestep",
)

# Official sizes of the release (wan/configs/wan_s2v_14B.py + the HF config.json).
_OFFICIAL_TRANSFORMER: dict[str, Any] = {
    "_class_name": "WanModel_S2V",
    "_diffusers_version": "0.35.0",
    "adain_mode": "attn_norm",
    "add_last_motion": True,
    "audio_dim": 1024,
    "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39],
    "cond_dim": 16,
    "dim": 5120,
    "enable_adain": True,
    "enable_framepack": True,
    "enable_motioner": False,
    "enable_tsm": False,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "framepack_drop_mode": "padd",
    "freq_dim": 256,
    "in_dim": 16,
    "model_type": "s2v",
    "motion_token_num": 1024,
    "num_audio_token": 4,
    "num_heads": 40,
    "num_layers": 40,
    "out_dim": 16,
    "text_len": 512,
    "trainable_token_pos_emb": False,
    "zero_init": True,
    "zero_timestep": True,
}

# umt5-xxl encoder (wan.modules.t5.umt5_xxl, encoder only).
_OFFICIAL_T5 = dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                    num_buckets=32, shared_pos=False)

# jonatasgrosman/wav2vec2-large-xlsr-53-english (the folder shipped in the release).
_OFFICIAL_W2V: dict[str, Any] = {
    "architectures": ["Wav2Vec2ForCTC"],
    "model_type": "wav2vec2",
    "activation_dropout": 0.05,
    "apply_spec_augment": True,
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "conv_bias": True,
    "conv_dim": [512, 512, 512, 512, 512, 512, 512],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": True,
    "do_stable_layer_norm": True,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
    "feat_extract_dropout": 0.0,
    "feat_extract_norm": "layer",
    "feat_proj_dropout": 0.05,
    "final_dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout": 0.05,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "layerdrop": 0.05,
    "mask_feature_length": 10,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_prob": 0.05,
    "num_attention_heads": 16,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 24,
    "pad_token_id": 0,
    "torch_dtype": "float32",
    "vocab_size": 33,
}
_W2V_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", "-"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]

# Tiny profile: same classes, small sizes. Kept where the architecture requires it:
# text_dim 4096 (WanModel_S2V ignores text_dim from config.json, so the T5 width stays
# 4096), 25 wav2vec2 hidden states (CausalAudioEncoder hard-codes num_layers=25, i.e.
# 24 transformer layers), the wav2vec2 conv strides (50 Hz features), z_dim 16 and
# the framepack buckets / motion_frames=73 (pipeline constants).
_TINY_TRANSFORMER = dict(_OFFICIAL_TRANSFORMER, dim=64, ffn_dim=128, num_heads=4, num_layers=2, audio_dim=32,
                         audio_inject_layers=[0, 1])
_TINY_T5 = dict(vocab=512, dim=4096, dim_attn=64, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=32,
                shared_pos=False)
_TINY_W2V = dict(_OFFICIAL_W2V, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 conv_dim=[32] * 7)

_VAE_DIM = {"tiny": 8, "full": 96}
_VAE_Z_DIM = 16
_DEFAULT_SHARD_BYTES = {"tiny": 1 << 20, "full": 10_000_000_000}
_TOKENIZER_VOCAB = 512

_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def transformer_config(profile: Profile) -> dict[str, Any]:
    """The ``config.json`` of the DiT for a profile (``full`` = the release's values)."""
    _check_profile(profile)
    return dict(_OFFICIAL_TRANSFORMER if profile == "full" else _TINY_TRANSFORMER)


def t5_arch(profile: Profile) -> dict[str, Any]:
    _check_profile(profile)
    return dict(_OFFICIAL_T5 if profile == "full" else _TINY_T5)


def wav2vec_config(profile: Profile) -> dict[str, Any]:
    _check_profile(profile)
    return dict(_OFFICIAL_W2V if profile == "full" else _TINY_W2V)


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (expected one of {', '.join(PROFILES)})")


# ------------------------------------------------------------- meta-device modules


def _empty_weights():
    """Parameters on ``meta``, plain tensors (rope freqs, buffers) stay real on CPU."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def meta_transformer(config: dict[str, Any]) -> torch.nn.Module:
    """``WanModel_S2V`` from a config.json dict, parameters on ``meta`` (no allocation)."""
    from storystudio.patches.wan22 import import_wan

    import_wan()
    from wan.modules.s2v.model_s2v import WanModel_S2V

    with _empty_weights():
        return WanModel_S2V.from_config(config)


def meta_t5(arch: dict[str, Any]) -> torch.nn.Module:
    """The official ``T5Encoder`` with the given sizes, parameters on ``meta``."""
    from storystudio.patches.wan22 import import_wan

    import_wan()
    from wan.modules.t5 import T5Encoder

    with torch.device("meta"):
        return T5Encoder(dropout=0.1, **arch)


def t5_arch_from_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Infer ``T5Encoder`` sizes from state-dict shapes (one loader for tiny and full)."""
    vocab, dim = shapes["token_embedding.weight"]
    dim_attn = shapes["blocks.0.attn.q.weight"][0]
    dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
    num_layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    shared_pos = "pos_embedding.embedding.weight" in shapes
    pos_key = "pos_embedding.embedding.weight" if shared_pos else "blocks.0.pos_embedding.embedding.weight"
    num_buckets, num_heads = shapes[pos_key]
    return dict(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                num_layers=num_layers, num_buckets=num_buckets, shared_pos=shared_pos)


def _vae_kwargs(dim: int) -> dict[str, Any]:
    # wan.modules.vae2_1._video_vae's cfg with the width as the only variable.
    return dict(dim=dim, z_dim=_VAE_Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)


def meta_vae(dim: int) -> torch.nn.Module:
    from storystudio.patches.wan22 import import_wan

    import_wan()
    from wan.modules.vae2_1 import WanVAE_

    with torch.device("meta"):
        return WanVAE_(**_vae_kwargs(dim))


def vae_dim_from_state(shapes: dict[str, tuple[int, ...]]) -> int:
    return int(shapes["encoder.conv1.weight"][0])


def meta_wav2vec(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    cfg = Wav2Vec2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        return Wav2Vec2ForCTC(cfg)


# --------------------------------------------------------------- tensor generation


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def specs_of(module: torch.nn.Module, dtype: torch.dtype) -> list[TensorSpec]:
    """Names/shapes of every state-dict entry of a (meta) module, in state-dict order."""
    return [TensorSpec(k, tuple(v.shape), dtype) for k, v in module.state_dict().items()]


def _init_rule(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """How a synthetic tensor is filled: ("ones"|"zeros"|"normal"|"const", std/value)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma" or (leaf in ("weight", "original0") and len(shape) == 1 and "norm" in name):
        return "ones", 1.0
    if leaf == "bias" or leaf == "beta":
        return "zeros", 0.0
    if name.endswith("casual_audio_encoder.weights"):
        return "const", 0.01
    if "modulation" in leaf:
        return "normal", shape[-1] ** -0.5
    if len(shape) <= 1:
        return "normal", 0.02
    fan_in = math.prod(shape[1:])
    return "normal", fan_in ** -0.5


def make_tensor(spec: TensorSpec, *, seed: int, device: torch.device | str) -> torch.Tensor:
    """Deterministic synthetic tensor (depends only on seed, name and shape)."""
    rule, v = _init_rule(spec.name, spec.shape)
    if rule == "ones":
        return torch.ones(spec.shape, dtype=spec.dtype, device=device)
    if rule == "zeros":
        return torch.zeros(spec.shape, dtype=spec.dtype, device=device)
    if rule == "const":
        return torch.full(spec.shape, v, dtype=spec.dtype, device=device)
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % (1 << 62))
    t = torch.randn(spec.shape, generator=g, device=device, dtype=torch.float32)
    return t.mul_(v).to(spec.dtype)


def _host_bytes(t: torch.Tensor):
    """A buffer of the tensor's bytes on the host (one tensor at a time)."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


# ------------------------------------------------------------- streaming writers


def write_safetensors_streaming(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                                metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor; returns the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = produce(s)
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise RuntimeError(f"{s.name}: produced {tuple(t.shape)} {t.dtype}, expected {s.shape} {s.dtype}")
            f.write(_host_bytes(t))
            del t
    tmp.replace(path)
    return offset


class _StorageRef:
    """Stands for one storage in the pickle of a torch zip checkpoint."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles like a contiguous tensor over a :class:`_StorageRef` (torch.save's format)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


_STORAGE_TYPES = {torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage", torch.float32: "FloatStorage"}


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_torch_zip_streaming(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor]) -> int:
    """Write ``torch.save(state_dict)``'s zip format tensor by tensor.

    Loadable with ``torch.load(..., weights_only=True)`` (and ``mmap=True``: data records
    are 64-byte aligned like torch's own writer); CRCs are real, so ``unzip -t`` passes.
    """
    archive = path.name.rsplit(".", 1)[0]
    refs = collections.OrderedDict()
    for i, s in enumerate(specs):
        refs[s.name] = _TensorRef(_StorageRef(str(i), s.dtype, math.prod(s.shape)), s.shape)
    buf = io.BytesIO()
    _RefPickler(buf, protocol=2).dump(refs)
    tmp = path.with_name(path.name + ".part")
    total = 0
    with tmp.open("wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{archive}/data.pkl", buf.getvalue())
        zf.writestr(f"{archive}/byteorder", "little")
        for i, s in enumerate(specs):
            name = f"{archive}/data/{i}"
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            # Pad the local header's extra field so the data starts 64-byte aligned.
            start = raw.tell() + 30 + len(name.encode()) + 20 + 4  # +zip64 extra +pad-field header
            zi.extra = struct.pack("<HH", 0x4246, -start % 64) + b"Z" * (-start % 64)
            t = produce(s)
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise RuntimeError(f"{s.name}: produced {tuple(t.shape)} {t.dtype}, expected {s.shape} {s.dtype}")
            with zf.open(zi, "w", force_zip64=True) as f:
                f.write(_host_bytes(t))
            total += s.nbytes
            del t
        zf.writestr(f"{archive}/version", "3\n")
    tmp.replace(path)
    return total


# ---------------------------------------------------------------- small files


_TOKENIZER_CORPUS = (
    "a person is talking to the camera with a calm expression",
    "the woman smiles and speaks slowly in a bright room",
    "a man sings a song on a stage under warm lights",
    "a child tells a story while sitting at a wooden table",
    "close up of a face, natural light, detailed skin, cinematic",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量",
    "画面模糊，最差质量，细节模糊不清，情绪激动剧烈，手快速抖动，丑陋的，残缺的，多余的手指",
)


def write_umt5_tokenizer(out: Path, vocab_size: int = _TOKENIZER_VOCAB) -> int:
    """A small byte-level BPE tokenizer with umt5's special tokens (pad=0, eos=1, unk=2).

    Saved as a ``tokenizers`` ``tokenizer.json`` that ``AutoTokenizer`` loads; appends
    ``</s>`` like umt5. Returns its vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, "padding_side": "right",
         **specials}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return tok.get_vocab_size()


def _write_wav2vec_small_files(out: Path, config: dict[str, Any]) -> None:
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(config, transformers_version=transformers.__version__)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "processor_class": "Wav2Vec2Processor",
        "return_attention_mask": True, "sampling_rate": 16000}, indent=2))
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(_W2V_VOCAB)}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Wav2Vec2CTCTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "word_delimiter_token": "|", "do_lower_case": False,
        "processor_class": "Wav2Vec2Processor"}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2))


# ------------------------------------------------------------------- the writer


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in state-dict order (like diffusers' ``max_shard_size``)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def dit_specs(profile: Profile, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    return specs_of(meta_transformer(transformer_config(profile)), dtype)


def write_wan_s2v_checkpoint(out_dir: str | Path, profile: Profile = "tiny", *, seed: int = 0,
                             device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                             shard_bytes: int | None = None, workers: int | None = None) -> Path:
    """Write a synthetic checkpoint in the official Wan2.2-S2V-14B layout.

    ``dtype`` overrides the DiT/T5 dtype (default bf16 like the release); the VAE and
    wav2vec2 stay float32. Every tensor is generated on ``device`` and streamed to
    disk; files are written by ``workers`` threads in parallel (default: one per DiT
    shard + one per other big file).
    """
    _check_profile(profile)
    t0 = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    wdtype = dtype or torch.bfloat16
    shard_bytes = shard_bytes or _DEFAULT_SHARD_BYTES[profile]

    # Specs from the official classes on meta.
    tcfg = transformer_config(profile)
    dit = specs_of(meta_transformer(tcfg), wdtype)
    t5 = specs_of(meta_t5(t5_arch(profile)), wdtype)
    vae = specs_of(meta_vae(_VAE_DIM[profile]), torch.float32)
    w2v_cfg = wav2vec_config(profile)
    w2v = specs_of(meta_wav2vec(w2v_cfg), torch.float32)

    # Small files first.
    (out / CONFIG_FILE).write_text(json.dumps(tcfg, indent=2))
    vocab = write_umt5_tokenizer(out / TOKENIZER_DIR)
    if vocab > t5_arch(profile)["vocab"]:
        raise RuntimeError(f"tokenizer vocab {vocab} exceeds the T5 embedding size")
    _write_wav2vec_small_files(out / WAV2VEC_DIR, w2v_cfg)

    shards = plan_shards(dit, shard_bytes)
    n = len(shards)
    names = [SHARD_PATTERN.format(i=i + 1, n=n) for i in range(n)]
    weight_map = {s.name: names[i] for i, shard in enumerate(shards) for s in shard}
    for stale in out.glob("diffusion_pytorch_model-*.safetensors"):
        if stale.name not in names:
            stale.unlink()

    def produce(prefix: str) -> Callable[[TensorSpec], torch.Tensor]:
        # Component prefix in the seed so equal names in different files differ.
        return lambda s: make_tensor(TensorSpec(f"{prefix}/{s.name}", s.shape, s.dtype), seed=seed,
                                     device=device)

    jobs: list[tuple[str, Callable[[], int]]] = []
    for name, shard in zip(names, shards):
        jobs.append((name, lambda p=out / name, sh=shard: write_safetensors_streaming(p, sh, produce("dit"))))
    jobs.append((T5_FILE, lambda: write_torch_zip_streaming(out / T5_FILE, t5, produce("t5"))))
    jobs.append((VAE_FILE, lambda: write_torch_zip_streaming(out / VAE_FILE, vae, produce("vae"))))
    jobs.append((f"{WAV2VEC_DIR}/model.safetensors",
                 lambda: write_safetensors_streaming(out / WAV2VEC_DIR / "model.safetensors", w2v, produce("w2v"))))
    # Biggest first so the pool ends together.
    sizes = {name: sum(s.nbytes for s in shard) for name, shard in zip(names, shards)}
    sizes[T5_FILE] = sum(s.nbytes for s in t5)
    jobs.sort(key=lambda j: -sizes.get(j[0], 0))
    workers = workers or max(1, len(jobs))
    log.info("writing %s Wan2.2-S2V checkpoint to %s on %s: DiT %d tensors in %d shards (%.2f GB), "
             "T5 %.2f GB, %d writer threads", profile, out, device, len(dit), n,
             sum(s.nbytes for s in dit) / 1e9, sizes[T5_FILE] / 1e9, workers)
    done_lock = threading.Lock()
    written = [0]

    def run(job: tuple[str, Callable[[], int]]) -> None:
        name, fn = job
        t = time.monotonic()
        nbytes = fn()
        with done_lock:
            written[0] += nbytes
        log.info("wrote %s (%.2f GB in %.1fs)", name, nbytes / 1e9, time.monotonic() - t)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(run, j) for j in jobs]:
            f.result()

    index = {"metadata": {"total_size": sum(s.nbytes for s in dit)}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    log.info("checkpoint written: %.2f GB in %.1fs", written[0] / 1e9, time.monotonic() - t0)
    return out


# ---------------------------------------------------------------- the validator


def _torch_zip_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of a torch state dict; zip files are memory-mapped (data not read)."""
    sd = load_torch_state(path)
    if not isinstance(sd, dict):
        raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"entries that are not tensors: {bad[:3]}")
    return {k: tuple(v.shape) for k, v in sd.items()}


def load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` of a state dict, memory-mapped (data read lazily) when it is a zip.

    A pre-1.6 (non-zip) torch file cannot be memory-mapped and is read whole.
    """
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def _magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(2)


def _check_torch_zip(problems: Problems, root: Path, rel: str, hint: str) -> dict[str, tuple[int, ...]] | None:
    path = root / rel
    if not path.is_file():
        problems.missing(rel, hint)
        return None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                size = path.stat().st_size
                for zi in zf.infolist():
                    if zi.header_offset + zi.compress_size > size:
                        raise ValueError(f"record {zi.filename} runs past the end of the file")
        elif _magic(path) == b"PK" or path.stat().st_size < 64:
            raise ValueError("truncated torch zip checkpoint (no central directory)")
        return _torch_zip_shapes(path)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        problems.corrupt(rel, f"unreadable ({exc.__class__.__name__}: {str(exc)[:200]})")
        return None


def _compare_shapes(problems: Problems, rel: str, got: dict[str, tuple[int, ...]],
                    want: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and tuple(got[k]) != tuple(want[k])]
    if missing:
        problems.mismatch(rel, f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.mismatch(rel, f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})")
    if wrong:
        k = wrong[0]
        problems.mismatch(rel, f"{len(wrong)} tensors with wrong shape (e.g. {k}: {got[k]} != {want[k]})")


def validate_wan_s2v(path: str | Path) -> None:
    """Raise ``CheckpointError`` naming every missing/corrupt/mismatched file; else None."""
    root = Path(path)
    problems = Problems(root, "Wan2.2-S2V")
    if not root.is_dir():
        problems.missing("", "the checkpoint folder does not exist")
        problems.raise_if_any()

    # --- DiT config
    config: dict[str, Any] | None = None
    if not (root / CONFIG_FILE).is_file():
        problems.missing(CONFIG_FILE, "WanModel_S2V config")
    else:
        try:
            config = read_json(root / CONFIG_FILE)
            absent = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
            if absent:
                problems.mismatch(CONFIG_FILE, f"missing keys {', '.join(absent)}")
                config = None
            elif config.get("_class_name", "WanModel_S2V") != "WanModel_S2V":
                problems.mismatch(CONFIG_FILE, f"_class_name is {config['_class_name']!r}, not 'WanModel_S2V'")
                config = None
        except ValueError as exc:
            problems.corrupt(CONFIG_FILE, str(exc))

    # --- DiT shards
    dit_shapes: dict[str, tuple[int, ...]] = {}
    dit_ok = True
    if not (root / INDEX_FILE).is_file():
        problems.missing(INDEX_FILE, "DiT shard index")
        dit_ok = False
    else:
        try:
            index = read_json(root / INDEX_FILE)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("weight_map is empty")
        except (ValueError, KeyError, TypeError) as exc:
            problems.corrupt(INDEX_FILE, f"not a safetensors index ({exc})")
            weight_map = None
            dit_ok = False
        if weight_map:
            by_file: dict[str, list[str]] = {}
            for k, f in weight_map.items():
                by_file.setdefault(f, []).append(k)
            for f in sorted(by_file):
                if not (root / f).is_file():
                    problems.missing(f, f"DiT shard referenced by {INDEX_FILE}")
                    dit_ok = False
                    continue
                try:
                    header = read_safetensors_header(root / f)
                except (ValueError, OSError) as exc:
                    problems.corrupt(f, str(exc))
                    dit_ok = False
                    continue
                absent = [k for k in by_file[f] if k not in header]
                if absent:
                    problems.mismatch(f, f"{len(absent)} tensors listed in {INDEX_FILE} are absent "
                                         f"(e.g. {absent[0]})")
                    dit_ok = False
                dit_shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k in weight_map})
    if config is not None and dit_ok:
        try:
            want = {k: tuple(v.shape) for k, v in meta_transformer(config).state_dict().items()}
        except Exception as exc:  # noqa: BLE001
            problems.mismatch(CONFIG_FILE, f"cannot build WanModel_S2V from it ({exc})")
        else:
            _compare_shapes(problems, INDEX_FILE, dit_shapes, want)

    # --- T5 encoder + tokenizer
    t5_shapes = _check_torch_zip(problems, root, T5_FILE, "umt5-xxl text encoder")
    t5_vocab = None
    if t5_shapes is not None:
        try:
            arch = t5_arch_from_state(t5_shapes)
            t5_vocab = arch["vocab"]
            want = {k: tuple(v.shape) for k, v in meta_t5(arch).state_dict().items()}
            _compare_shapes(problems, T5_FILE, t5_shapes, want)
            if config is not None and arch["dim"] != 4096:
                problems.mismatch(T5_FILE, f"T5 width {arch['dim']} != 4096 (WanModel_S2V text_dim)")
        except (KeyError, ValueError, TypeError) as exc:
            problems.mismatch(T5_FILE, f"not a umt5 encoder state dict ({exc.__class__.__name__}: {exc})")
    tok_dir = root / TOKENIZER_DIR
    if not tok_dir.is_dir():
        problems.missing(TOKENIZER_DIR + "/", "umt5 tokenizer folder")
    else:
        if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "spiece.model").is_file():
            problems.missing(f"{TOKENIZER_DIR}/tokenizer.json", "or spiece.model")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if not (tok_dir / name).is_file():
                problems.missing(f"{TOKENIZER_DIR}/{name}")
        if (tok_dir / "tokenizer.json").is_file():
            try:
                vocab = len(read_json(tok_dir / "tokenizer.json")["model"]["vocab"])
                if t5_vocab is not None and vocab > t5_vocab:
                    problems.mismatch(f"{TOKENIZER_DIR}/tokenizer.json",
                                      f"vocabulary of {vocab} does not fit the T5 embedding ({t5_vocab} rows)")
            except (ValueError, KeyError, TypeError) as exc:
                problems.corrupt(f"{TOKENIZER_DIR}/tokenizer.json", f"not a tokenizers file ({exc})")

    # --- VAE
    vae_shapes = _check_torch_zip(problems, root, VAE_FILE, "Wan2.1 VAE")
    if vae_shapes is not None:
        try:
            want = {k: tuple(v.shape) for k, v in meta_vae(vae_dim_from_state(vae_shapes)).state_dict().items()}
            _compare_shapes(problems, VAE_FILE, vae_shapes, want)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            problems.mismatch(VAE_FILE, f"not a Wan2.1 VAE state dict ({exc.__class__.__name__}: {exc})")

    # --- wav2vec2
    w2v = root / WAV2VEC_DIR
    if not w2v.is_dir():
        problems.missing(WAV2VEC_DIR + "/", "wav2vec2 audio encoder folder")
    else:
        for name in WAV2VEC_FILES:
            rel = f"{WAV2VEC_DIR}/{name}"
            if not (w2v / name).is_file():
                problems.missing(rel)
            elif name.endswith(".json"):
                try:
                    data = read_json(w2v / name)
                    if name == "config.json":
                        if data.get("model_type") != "wav2vec2":
                            problems.mismatch(rel, f"model_type is {data.get('model_type')!r}, not 'wav2vec2'")
                        elif config is not None and data.get("hidden_size") != config.get("audio_dim"):
                            problems.mismatch(rel, f"hidden_size {data.get('hidden_size')} != DiT audio_dim "
                                                   f"{config.get('audio_dim')}")
                        elif data.get("num_hidden_layers") != 24:
                            problems.mismatch(rel, "num_hidden_layers must be 24 (the S2V audio encoder "
                                                   "weights 25 hidden states)")
                except ValueError as exc:
                    problems.corrupt(rel, str(exc))
        weights = [n for n in WAV2VEC_WEIGHTS if (w2v / n).is_file()]
        if not weights:
            problems.missing(f"{WAV2VEC_DIR}/{WAV2VEC_WEIGHTS[0]}", f"or {WAV2VEC_WEIGHTS[1]}")
        elif weights[0] == "model.safetensors":
            try:
                read_safetensors_header(w2v / "model.safetensors")
            except (ValueError, OSError) as exc:
                problems.corrupt(f"{WAV2VEC_DIR}/model.safetensors", str(exc))
        else:
            _check_torch_zip(problems, root, f"{WAV2VEC_DIR}/pytorch_model.bin", "wav2vec2 weights")

    problems.raise_if_any()


# ---------------------------------------------------------------------- the CLI


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storystudio.models.checkpoints.wan_s2v",
        description="Write (and validate) a synthetic Wan2.2-S2V-14B checkpoint in the official layout.")
    parser.add_argument("--profile", choices=PROFILES, default="tiny")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="where tensors are generated (cuda for full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="DiT/T5 dtype (default bf16 like the release)")
    parser.add_argument("--shard-gb", type=float, default=None, help="DiT shard size in GB")
    parser.add_argument("--workers", type=int, default=None, help="parallel file writers")
    parser.add_argument("--validate-only", action="store_true", help="only validate --out")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if not args.validate_only:
            write_wan_s2v_checkpoint(
                args.out, args.profile, seed=args.seed, device=args.device,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                shard_bytes=int(args.shard_gb * 1e9) if args.shard_gb else None, workers=args.workers)
        t = time.monotonic()
        validate_wan_s2v(args.out)
        log.info("valid Wan2.2-S2V checkpoint at %s (validated in %.1fs)", args.out, time.monotonic() - t)
    except CheckpointError as exc:
        log.error("%s: %s", exc.code, exc.message)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
