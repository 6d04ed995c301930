"""Synthetic Wan2.2-S2V-14B checkpoints (profiles ``tiny`` and ``full``) in the official layout.

``write_wan_s2v_checkpoint`` writes the layout described in
:mod:`storystudio.models.checkpoints.wan_s2v` with seeded random weights. The tensor
names and shapes come from the official module classes instantiated on the ``meta``
device, so the ``full`` profile is the real architecture (DiT 16.3B parameters) by
construction. Tensors are generated on ``device`` one at a time and streamed into
their files (safetensors shards and torch zip ``.pth`` alike), so host memory holds
at most one tensor per writer thread, never a whole model.

Test / demo / bench tooling: the worker never imports this package.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from storystudio.errors import CheckpointError
from storystudio.models.checkpoints.wan_s2v import (
    CONFIG_FILE,
    INDEX_FILE,
    SHARD_PATTERN,
    T5_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    WAV2VEC_DIR,
    meta_t5,
    meta_transformer,
    meta_vae,
    meta_wav2vec,
    validate_wan_s2v,
)
from storystudio.synthetic import PROFILES, Profile
from storystudio.synthetic.torch_zip import host_bytes, write_torch_zip_streaming

log = logging.getLogger(__name__)

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
            f.write(host_bytes(t))
            del t
    tmp.replace(path)
    return offset


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


# ---------------------------------------------------------------------- the CLI


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storystudio.synthetic.wan_s2v",
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
