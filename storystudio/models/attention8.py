"""8-bit attention (SageAttention) for fast jobs: used only where it is importable and checks out.

Why: attention is about two thirds of a 480p CFG step. SageAttention 1.0.6 measured
49.9 ms against 60.0 ms for SDPA's flash backend on the H100 (33k tokens, 40 heads x
128) with a 1.4 % relative error; cuDNN SDPA (38 ms, exact) beat it there, so this
knob matters only where an 8-bit kernel is faster than the exact path's best.

It is a *candidate*: ``sageattention`` is not a dependency (not installed here nor in
the image). :func:`attention8_status` imports it and, once per device, compares
``sageattn`` with exact attention on random inputs; only a kernel within
:data:`SELF_CHECK_MAX_REL_ERROR` is used. Otherwise fast jobs report the knob as
``unavailable: ...`` and run exact attention.

:func:`attention_8bit` binds a dispatcher to the name ``flash_attention`` in the
official DiT modules for the duration of one job (restoring the previous binding,
whatever the exact path chose): calls Sage can take (no padding masks, not causal, no
window, head dim 64/96/128) go to ``sageattn``, every other call to the previous
function.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SELF_CHECK_MAX_REL_ERROR = 0.05  # relative L2 vs exact attention (Sage 1.0.6 measured 1.4 %)
SAGE_HEAD_DIMS = (64, 96, 128)
# Official modules whose blocks call the module-level name ``flash_attention``: the DiT's
# self/cross attention (wan.modules.model) and the S2V self-attention.
DIT_ATTENTION_MODULES = ("wan.modules.model", "wan.modules.s2v.model_s2v")


@dataclass(frozen=True)
class Attention8Status:
    available: bool
    detail: str  # "sageattention <version>" or why not


def _load_sageattn() -> tuple[Callable | None, str]:
    """``(sageattn, version)`` or ``(None, why)``; a separate function so tests can stand in a kernel."""
    try:
        import sageattention  # type: ignore[import-not-found]
        from sageattention import sageattn  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - a broken install (CUDA/ABI mismatch) is "unavailable" too
        if isinstance(exc, ModuleNotFoundError) and exc.name == "sageattention":
            return None, "sageattention is not installed"
        return None, f"sageattention cannot be imported: {type(exc).__name__}: {exc}"
    return sageattn, f"sageattention {getattr(sageattention, '__version__', '?')}"


_cache: dict[str, tuple[Attention8Status, Callable | None]] = {}
_lock = threading.Lock()


def attention8_status(device: torch.device | str) -> Attention8Status:
    """Whether 8-bit attention runs on ``device`` (imported and self-checked once per device)."""
    return _resolve(torch.device(device))[0]


def _resolve(device: torch.device) -> tuple[Attention8Status, Callable | None]:
    key = str(device)
    with _lock:
        if key not in _cache:
            kernel, detail = _load_sageattn()
            status = Attention8Status(False, detail)
            if kernel is not None:
                try:
                    err = self_check(kernel, device)
                except Exception as exc:  # noqa: BLE001 - a kernel that crashes is unavailable, not fatal
                    status = Attention8Status(False, f"{detail} failed its self-check: {type(exc).__name__}: {exc}")
                    kernel = None
                else:
                    if err <= SELF_CHECK_MAX_REL_ERROR:
                        status = Attention8Status(True, f"{detail} (self-check error {err:.2%})")
                    else:
                        status = Attention8Status(False, f"{detail} differs from exact attention by {err:.1%} "
                                                         f"(limit {SELF_CHECK_MAX_REL_ERROR:.0%})")
                        kernel = None
            _cache[key] = (status, kernel)
            log.info("8-bit attention on %s: %s", key, status.detail)
        return _cache[key]


def self_check(kernel: Callable, device: torch.device) -> float:
    """Relative L2 error of ``kernel`` vs exact SDPA on random [1, 1024, 4, 128] q/k/v."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, 1024, 4, 128, generator=g).to(device, dtype) for _ in range(3))
    got = kernel(q, k, v, tensor_layout="NHD", is_causal=False).float()
    want = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                          v.transpose(1, 2).float()).transpose(1, 2)
    return ((got - want).norm() / want.norm()).item()


def _full(lens: torch.Tensor | None, n: int) -> bool:
    return lens is None or bool((torch.as_tensor(lens) >= n).all())


def _dispatcher(kernel: Callable, previous: Callable) -> Callable:
    def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                        causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                        version=None):
        plain = (not causal and tuple(window_size) == (-1, -1) and dropout_p == 0.0 and q_scale is None
                 and q.size(-1) in SAGE_HEAD_DIMS and q.size(2) == k.size(2) and _full(q_lens, q.size(1))
                 and _full(k_lens, k.size(1)))
        if not plain:
            return previous(q, k, v, q_lens=q_lens, k_lens=k_lens, dropout_p=dropout_p,
                            softmax_scale=softmax_scale, q_scale=q_scale, causal=causal, window_size=window_size,
                            deterministic=deterministic, dtype=dtype, version=version)
        half = (torch.float16, torch.bfloat16)
        cast = (lambda x: x if x.dtype in half else x.to(dtype)) if q.device.type == "cuda" else (lambda x: x)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
        out = kernel(cast(q), cast(k), cast(v), tensor_layout="NHD", is_causal=False, sm_scale=scale)
        return out.type(q.dtype)

    flash_attention.storystudio_8bit = True  # type: ignore[attr-defined]
    return flash_attention


@contextmanager
def attention_8bit(device: torch.device | str) -> Iterator[Attention8Status]:
    """8-bit attention in the DiT for the duration of the block (exact attention when unavailable)."""
    status, kernel = _resolve(torch.device(device))
    if kernel is None:
        yield status
        return
    saved: dict[str, Callable] = {}
    try:
        for name in DIT_ATTENTION_MODULES:
            mod = sys.modules.get(name)
            if mod is None or not hasattr(mod, "flash_attention"):
                continue
            saved[name] = mod.flash_attention
            mod.flash_attention = _dispatcher(kernel, saved[name])
        yield status
    finally:
        for name, fn in saved.items():
            sys.modules[name].flash_attention = fn
