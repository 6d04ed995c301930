"""The official Wan2.2-S2V-14B folder layout: file names, module builders, loader and validator.

Layout (as on the Hugging Face repo ``Wan-AI/Wan2.2-S2V-14B``)::

    config.json                                          WanModel_S2V (diffusers ConfigMixin)
    diffusion_pytorch_model-0000N-of-0000M.safetensors   DiT shards, bf16
    diffusion_pytorch_model.safetensors.index.json
    models_t5_umt5-xxl-enc-bf16.pth                      umt5-xxl encoder state dict, bf16
    Wan2.1_VAE.pth                                       Wan2.1 VAE state dict, fp32
    google/umt5-xxl/                                     tokenizer (config.t5_tokenizer)
    wav2vec2-large-xlsr-53-english/                      transformers Wav2Vec2ForCTC folder

The ``meta_*`` builders instantiate the official module classes on the ``meta`` device
(no allocation): the engine loads weights into them and the validator compares a
folder's tensor shapes with them. ``validate_wan_s2v`` checks a folder (official
download or synthetic) and raises one ``CheckpointError`` naming every missing, corrupt
or mismatched file. The synthetic writer of this layout is
:mod:`storystudio.synthetic.wan_s2v` (tests, demo and benches only).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from storystudio.models.checkpoints.common import Problems, empty_weights, read_json, read_safetensors_header

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

_VAE_Z_DIM = 16  # Wan2.1 VAE latent channels (fixed by the pipeline)


# ------------------------------------------------------------- meta-device modules


def _empty_weights():
    """Parameters on ``meta``, plain tensors (rope freqs, buffers) stay real on CPU (under the build lock)."""
    return empty_weights(include_buffers=False)


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
