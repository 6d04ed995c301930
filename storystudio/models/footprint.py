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


def video_working_bytes(area: int, infer_frames: int = 80) -> int:
    """Activation bytes of one Wan S2V clip of ``infer_frames`` frames at ``area`` pixels."""
    gib = 0.5 + 23.0 * (area / 1e6) * (infer_frames / 80)
    return int(gib * _MARGIN * GiB)


def image_working_bytes(width: int, height: int) -> int:
    """Activation bytes of one Z-Image generation at ``width × height``."""
    gib = 0.5 + 2.5 * (width * height / 1_048_576)
    return int(gib * _MARGIN * GiB)


def folder_weight_bytes(path: Path, *, expand_half_to_float32: bool = False) -> int:
    """Bytes of the weight files in a checkpoint folder: the size hint for a cold load.

    On CPU the engines run in float32, so half-precision files double in memory;
    ``expand_half_to_float32`` accounts for that (only matters when a CPU budget is set).
    """
    total = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return total * 2 if expand_half_to_float32 else total
