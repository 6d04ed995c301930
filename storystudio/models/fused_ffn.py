"""The DiT's FFN with its GELU in the GEMM's epilogue (exact path): one pass over the hidden states fewer.

Why: every Wan block's FFN is ``Linear(5120 -> 13824) -> GELU(tanh) -> Linear(13824 -> 5120)``.
Run as written, the first GEMM writes its 33k x 13824 bf16 output (0.9 GB per CFG branch),
and inductor's separate GELU kernel reads it back and writes it again: ~1 ms per block
and branch on the H100, 0.07 s of a 480p CFG step. cuBLASLt can apply bias and the tanh
GELU to the accumulator before the single store (``torch._addmm_activation(...,
use_gelu=True)``): 13.72 -> 12.80 ms per FFN at the DiT's shape (``bench/exact_levers.py``).
The math is the official one; the result differs only in bf16 rounding (the official path
rounds the linear's output to bf16 before the GELU, the epilogue rounds once, after it).

:func:`fused_ffn` swaps the classes of each block's first FFN linear and its GELU for the
duration of a generation (the same per-job flag the FP8 linears use), so the loaded model,
its parameters and its state dict never change; compiled blocks see a class change as a
guard and keep one graph per variant. The fused call is the opaque op
``storystudio::linear_gelu_tanh`` (inductor would split ``_addmm_activation`` again).
A block whose FFN is not exactly that shape (an FP8 linear of the fast preset, another
activation) is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("storystudio::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")``; on CUDA in the GEMM's epilogue."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        flat = x.reshape(-1, x.size(-1))
        return torch._addmm_activation(bias, flat, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.size(0))
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.size(0)))


class LinearGeluTanh(nn.Linear):
    """An ``nn.Linear`` whose output already went through GELU(tanh) (class-swapped in, never built)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # what F.linear would see under the engine's autocast
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        elif x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        return linear_gelu_tanh(x, weight, bias)


class FusedAwayGELU(nn.GELU):
    """The GELU after a :class:`LinearGeluTanh`: already applied, passes its input through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x


def _fusable(ffn: nn.Module) -> bool:
    return (isinstance(ffn, nn.Sequential) and len(ffn) == 3 and type(ffn[0]) is nn.Linear
            and ffn[0].bias is not None and type(ffn[1]) is nn.GELU and ffn[1].approximate == "tanh")


@contextlib.contextmanager
def fused_ffn(model: nn.Module) -> Iterator[int]:
    """Each block's ``ffn`` with its GELU in the first linear's epilogue for the block; yields how many."""
    swapped: list[nn.Sequential] = []
    try:
        for block in getattr(model, "blocks", ()):
            ffn = getattr(block, "ffn", None)
            if ffn is None or not _fusable(ffn):
                continue
            ffn[0].__class__ = LinearGeluTanh
            ffn[1].__class__ = FusedAwayGELU
            swapped.append(ffn)
        yield len(swapped)
    finally:
        for ffn in swapped:
            ffn[0].__class__ = nn.Linear
            ffn[1].__class__ = nn.GELU
