"""Synthetic Z-Image-Turbo checkpoints (profiles ``tiny`` and ``full``) in the official diffusers layout.

The layout and the official values it reproduces are in
:mod:`storystudio.models.checkpoints.zimage`. The synthetic writer builds tensor *specs* (names, shapes) by instantiating the
official classes on the ``meta`` device, then streams random tensors generated on
``device`` straight into safetensors files one tensor at a time, so the full profile
(6.15B-parameter transformer, Qwen3-4B encoder) never lives in host memory.

Measured on a lent H100 (torch 2.11, diffusers 0.42.1, transformers 5.23): the full bf16
profile (20.5 GB) writes in 23 s with ``device="cuda"``, validates in 0.2 s; its index
files are byte-identical in size to the release's (48,969 and 32,819 bytes) and the
text-encoder shards 1-2 have exactly the release's byte sizes.

Test / demo / bench tooling: the worker never imports this package.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storystudio.errors import CheckpointError
from storystudio.models.checkpoints.zimage import (
    MODEL_INDEX,
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TRANSFORMER_CONFIG,
    VAE_CONFIG,
    TensorSpec,
    text_encoder_specs,
    transformer_specs,
    validate_zimage,
    vae_specs,
)
from storystudio.synthetic import PROFILES

log = logging.getLogger(__name__)

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
