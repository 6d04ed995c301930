"""How much VRAM a job needs beyond the weights, and how big a model folder is.

The ModelManager makes room for ``weights + working bytes`` before a job, so these
estimates decide whether the other model set may stay resident. They come from
peaks measured on an H100 with full-size random weights (bench/RESULTS.md):

* Wan2.2-S2V, one CFG step, 80 frames per clip: 480p peaked at 40 GiB and 720p at
  52 GiB with 30.4 GiB of DiT weights resident, i.e. ≈9.6 GiB and ≈21.6 GiB of
  activations — close to linear in pixel area (≈23 GiB per megapixel).
* Z-Image-Turbo at 1024², 8 steps: 14 GiB peak with ≈11.5 GiB of transformer weights,
  i.e. ≈2.5 GiB per megapixel.

A 25 % margin covers VAE decode spikes and allocator fragmentation; an estimate
that is still too small is caught by the manager's out-of-memory retry.
"""

from __future__ import annotations

from pathlib import Path

GiB = 1024**3
_MARGIN = 1.25
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


# Activation GiB per megapixel of an 80-frame clip, per sample of the forward's batch.
_VIDEO_GIB_PER_MP_EAGER = 23.0
# The compiled blocks (models/compile.py) keep far fewer float32 temporaries alive: on the
# H100 (bench/results/2026-11-26-h100-video-speed-run2.json) the exact path peaked at 9.6 GiB over
# the weights at 480p with the CFG batch of 2 (12.2 GiB/MP per sample), 12.0 GiB at 720p batch 1
# (12.7), and the fast preset's FP8 linears at 6.5 GiB at 480p batch 1 (16.0: the quantized
# activations). The largest of the three covers both presets.
_VIDEO_GIB_PER_MP_COMPILED = 16.0


def video_working_bytes(area: int, infer_frames: int = 80, *, batch: int = 1, compiled: bool = False) -> int:
    """Activation bytes of one Wan S2V clip of ``infer_frames`` frames at ``area`` pixels.

    ``batch=2`` is classifier-free guidance's two branches in one forward: the
    activations of one forward scale with the batch (the measured peaks above are
    batch 1; two sequential forwards peak like one). ``compiled``: the DiT blocks run
    compiled (the exact path on a GPU), which needs about two thirds of the eager bytes;
    the ModelManager plans with the eager figure (a clip may always fall back to eager),
    the CFG-batch decision with the one that will run.
    """
    per_mp = _VIDEO_GIB_PER_MP_COMPILED if compiled else _VIDEO_GIB_PER_MP_EAGER
    gib = 0.5 + per_mp * (area / 1e6) * (infer_frames / 80) * batch
    return int(gib * _MARGIN * GiB)


def image_working_bytes(width: int, height: int) -> int:
    """Activation bytes of one Z-Image generation at ``width × height``."""
    gib = 0.5 + 2.5 * (width * height / 1_048_576)
    return int(gib * _MARGIN * GiB)


def folder_weight_bytes(path: Path, *, itemsize: int = 2) -> int:
    """Bytes the weights of a checkpoint folder will occupy once loaded: the size hint for a cold load.

    Safetensors files are counted from their headers as ``numel × itemsize`` of the
    dtype the engine loads in (2 for bf16 on CUDA, 4 for float32 on CPU), because the
    files' own dtype can differ: Z-Image-Turbo ships its transformer in float32 (24.6 GB
    on disk, 12.3 GB once loaded as bf16). Other weight files (``.pth``) count by size.
    A missing folder counts as 0; the loader then reports what is missing.
    """
    from storystudio.models.checkpoints.common import read_safetensors_header

    total = 0
    for p in Path(path).rglob("*"):
        if not p.is_file() or p.suffix not in _WEIGHT_SUFFIXES:
            continue
        if p.suffix == ".safetensors":
            try:
                header = read_safetensors_header(p)
            except (OSError, ValueError):
                total += p.stat().st_size
                continue
            for info in header.values():
                numel = 1
                for dim in info["shape"]:
                    numel *= int(dim)
                total += numel * itemsize
        else:
            total += p.stat().st_size * (itemsize // 2 if itemsize > 2 else 1)
    return total
