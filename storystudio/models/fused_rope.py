"""RoPE for the exact path: the official rotation, computed where and how the GPU does it well.

Why: the profile of an exact 480p CFG step on the H100 (``bench/profile_video_step.py``)
showed RoPE costing what it should not:

* ``WanModel_S2V.freqs`` (the 1024-position table) stays on the CPU after the model moves
  (it is a plain attribute, not a buffer). Every forward's ``rope_precompute`` writes each
  segment's rows into a GPU table through a broadcasting CPU->GPU copy, which first
  expands them over the 40 heads on the CPU: ~2.5 GB of pageable copies and the CPU time to
  build them, per CFG step (0.36 s of copies alone).
* ``rope_apply`` multiplies in ``complex128``. Inductor has no code generation for complex
  ops, so inside the compiled blocks each call is an unfused eager kernel over the whole
  [tokens, heads, 64] table (0.2 s per step), plus the casts around it.

:func:`fused_rope` changes neither the positions nor the rotation: the table moves to the
model's device for the generation (the CPU tensor comes back afterwards, so parking the
model leaves nothing behind), and :func:`rope_apply` does the same complex product written
as real arithmetic, ``(a + ib)(c + id) = (ac - bd) + i(ad + bc)``, which inductor fuses
with the RMSNorm before it and the cast after it. :func:`compact_table` keeps one row per
token instead of one per token and head when every head holds the same row (always, for
the positions ``rope_precompute`` covers), so the fused kernel reads 40x fewer table bytes.

The product runs in float32 (:data:`ROTATION_DTYPE`), not the official float64: the
rotated q and k go to attention in bf16, whose rounding (2^-8) is 30,000x coarser than
float32's, so the difference is below float tolerance (1e-5 relative after the bf16 cast,
measured at the DiT's shape), while float64 made the fused norm+RoPE kernel 1.27x slower on
the H100 (3.62 vs 2.86 ms per block, ``bench/exact_levers.py``): float64 arithmetic and
conversions are a fraction of float32's rate there.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_S2V_MODULE = "wan.modules.s2v.model_s2v"
_lock = threading.Lock()
_depth = 0  # open fused_rope blocks (several engines may share a process in the tests)
_official: Any = None  # the official rope_apply while ours is bound
ROTATION_DTYPE = torch.float32  # see the module docstring: float64 costs time and buys nothing after bf16


def rope_apply(x: torch.Tensor, grid_sizes: Any, freqs: torch.Tensor, start: Any = None) -> torch.Tensor:
    """``wan.modules.s2v.model_s2v.rope_apply`` in real :data:`ROTATION_DTYPE` arithmetic.

    x: [B, S, N, D]; freqs: complex [B, >=S, N or 1, D/2], or the same as real (cos, sin)
    pairs [..., D/2, 2] (:class:`CompactTables` hands the compiled blocks that form, so
    their graphs hold no complex tensors); a head dim of 1 broadcasts. Returns float32
    [B, S, N, D], as the official function does. ``grid_sizes``/``start`` are unused there
    too (the table already holds the positions).
    """
    s = x.size(1)
    table = freqs[:, :s]
    table = (torch.view_as_real(table) if table.is_complex() else table).to(ROTATION_DTYPE)  # [B, S, N|1, D/2, 2]
    pairs = x.to(ROTATION_DTYPE).unflatten(-1, (-1, 2))  # [B, S, N, D/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    c, d = table[..., 0], table[..., 1]
    out = torch.stack((a * c - b * d, a * d + b * c), dim=-1).flatten(3)
    return out.float()


def compact_table(freqs: torch.Tensor) -> torch.Tensor:
    """``freqs[:, :, :1]`` when all heads hold the same rows (one row per token), else ``freqs``.

    ``rope_precompute`` fills every covered position of all heads from one per-token row;
    an uncovered position would keep per-head values, so the check is on the data, not
    assumed. One comparison pass per forward, outside the compiled blocks.
    """
    if freqs.dim() != 4 or freqs.size(2) == 1:
        return freqs
    head0 = freqs[:, :, :1]
    if bool(torch.equal(freqs, head0.expand_as(freqs))):
        return head0.contiguous()
    return freqs


class CompactTables:
    """Memo of :func:`compact_table` for the forward in progress (all 40 blocks pass the same
    table), as real (cos, sin) pairs: what the compiled blocks' :func:`rope_apply` reads."""

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._compact: torch.Tensor | None = None

    def __call__(self, freqs: torch.Tensor) -> torch.Tensor:
        if freqs is not self._source:
            compact = compact_table(freqs)
            self._source = freqs
            self._compact = torch.view_as_real(compact) if compact.is_complex() else compact
        assert self._compact is not None
        return self._compact

    def clear(self) -> None:
        self._source = self._compact = None


def is_active() -> bool:
    """Whether :func:`rope_apply` is bound in the S2V module (a :func:`fused_rope` block is open)."""
    return _depth > 0


@contextlib.contextmanager
def fused_rope(model: nn.Module, device: torch.device) -> Iterator[None]:
    """For the block: ``model.freqs`` on ``device`` and :func:`rope_apply` bound in the S2V module."""
    global _depth, _official
    module = sys.modules[_S2V_MODULE]
    saved = getattr(model, "freqs", None)
    moved = isinstance(saved, torch.Tensor) and saved.device != device
    if moved:
        model.freqs = saved.to(device)
    with _lock:
        if _depth == 0:
            _official = module.rope_apply
            module.rope_apply = rope_apply
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                module.rope_apply = _official
                _official = None
        if moved:
            model.freqs = saved
