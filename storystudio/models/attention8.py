"""8-bit attention for fast jobs: the fastest 8-bit kernel that is importable, checks out
and beats exact attention on this GPU.

Why: attention is about half of an exact 480p CFG step on the H100, and the exact path
already runs cuDNN's bf16 flash kernel; only 8-bit arithmetic can go further. Candidates,
in order of preference on a tie:

* ``cudnn_fp8``: cuDNN's FP8 SDPA through the ``nvidia-cudnn-frontend`` wheel
  (:mod:`storystudio.models.attention_fp8`), Hopper and newer;
* ``sageattention``: SageAttention where installed (not a dependency; 1.0.6 measured
  49.9 ms against cuDNN bf16's 38 ms on the H100, so it rarely wins there).

:func:`attention8_status` loads each once per device, compares it with exact attention on
random inputs (:data:`SELF_CHECK_MAX_REL_ERROR`) and, on CUDA, times it against exact SDPA
at a DiT-like shape: a kernel that is not faster is not used (the knob would only cost
accuracy). Otherwise fast jobs report the knob as ``unavailable: ...`` and run exact
attention.

:func:`attention_8bit` binds a dispatcher to the name ``flash_attention`` in the
official DiT modules for the duration of one job (restoring the previous binding,
whatever the exact path chose): calls an 8-bit kernel can take (no padding masks, not
causal, no window, head dim 64/96/128) go to it, every other call to the previous
function. Inside compiled blocks the call goes through the opaque op
``storystudio::attention_8bit``, so the padding check runs at call time, not as a graph break.
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

from storystudio.models.attention import time_candidate

log = logging.getLogger(__name__)

SELF_CHECK_MAX_REL_ERROR = 0.05  # relative L2 vs exact attention (Sage 1.0.6 measured 1.4 %)
TIMING_SHAPE = (1, 16384, 8, 128)  # B, tokens, heads, head dim: long enough to be compute-bound
CANDIDATES = ("cudnn_fp8", "sageattention")  # preference on a tie
# Calls with fewer query or key tokens stay exact: the DiT's text (512 keys) and audio
# cross-attentions are a few percent of a step, and 8-bit kernels gain nothing there.
MIN_TOKENS = 1024
SAGE_HEAD_DIMS = (64, 96, 128)
# Official modules whose blocks call the module-level name ``flash_attention``: the DiT's
# self/cross attention (wan.modules.model) and the S2V self-attention.
DIT_ATTENTION_MODULES = ("wan.modules.model", "wan.modules.s2v.model_s2v")


@dataclass(frozen=True)
class Attention8Status:
    available: bool
    detail: str  # the kernel in use and its check, or why none is
    kernel: str | None = None  # a name of CANDIDATES when available


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


def _load_cudnn_fp8() -> tuple[Callable | None, str]:
    from storystudio.models import attention_fp8

    return attention_fp8.load()


def _loaders() -> dict[str, Callable[[], tuple[Callable | None, str]]]:
    """Looked up at call time so tests can stand in kernels (``monkeypatch`` the ``_load_*`` names)."""
    return {"cudnn_fp8": _load_cudnn_fp8, "sageattention": _load_sageattn}


_cache: dict[str, tuple[Attention8Status, Callable | None]] = {}
_kernels: dict[str, Callable] = {}  # name -> kernel in use, for the compiled-graph op
_lock = threading.Lock()


def attention8_status(device: torch.device | str) -> Attention8Status:
    """Whether 8-bit attention runs on ``device`` (imported and self-checked once per device)."""
    return _resolve(torch.device(device))[0]


def _resolve(device: torch.device) -> tuple[Attention8Status, Callable | None]:
    key = str(device)
    with _lock:
        if key not in _cache:
            _cache[key] = _choose(device)
            log.info("8-bit attention on %s: %s", key, _cache[key][0].detail)
        return _cache[key]


def _choose(device: torch.device) -> tuple[Attention8Status, Callable | None]:
    """Check every candidate; the fastest that agrees with exact attention (and, on CUDA, beats it)."""
    notes: list[str] = []
    passing: list[tuple[float, int, str, Callable, str]] = []
    exact_ms: float | None = None
    for rank, (name, loader) in enumerate(_loaders().items()):
        kernel, detail = loader()
        if kernel is None:
            notes.append(detail)
            continue
        try:
            err = self_check(kernel, device)
        except Exception as exc:  # noqa: BLE001 - a kernel that crashes is unavailable, not fatal
            notes.append(f"{detail} failed its self-check: {type(exc).__name__}: {exc}")
            continue
        if not err <= SELF_CHECK_MAX_REL_ERROR:
            notes.append(f"{detail} differs from exact attention by {err:.1%} "
                         f"(limit {SELF_CHECK_MAX_REL_ERROR:.0%})")
            continue
        ms = float("nan")
        if device.type == "cuda":
            try:
                exact_ms = exact_ms if exact_ms is not None else time_kernel(_exact_nhd, device)
                ms = time_kernel(kernel, device)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{detail} failed its timing run: {type(exc).__name__}: {exc}")
                continue
            if not ms < exact_ms:
                notes.append(f"{detail} is not faster than exact attention ({ms:.2f} vs {exact_ms:.2f} ms "
                             f"at {TIMING_SHAPE[1]} tokens)")
                continue
        timing = "" if math.isnan(ms) else f"; {ms:.2f} ms vs exact {exact_ms:.2f} ms at {TIMING_SHAPE[1]} tokens"
        passing.append((0.0 if math.isnan(ms) else ms, rank, name, kernel,
                        f"{detail} (self-check error {err:.2%}{timing})"))
    if not passing:
        return Attention8Status(False, "; ".join(notes) or "no 8-bit attention candidate"), None
    _, _, name, kernel, detail = min(passing, key=lambda p: (p[0], p[1]))
    _kernels[name] = kernel
    return Attention8Status(True, detail, kernel=name), kernel


def _exact_nhd(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=sm_scale).transpose(1, 2)


def time_kernel(kernel: Callable, device: torch.device, shape: tuple[int, int, int, int] = TIMING_SHAPE,
                repeats: int = 5) -> float:
    """Milliseconds per call of an NHD ``kernel`` on random bf16 q/k/v of ``shape``, timed by the
    exact-attention self-check's own timer (:func:`storystudio.models.attention.time_candidate`)."""
    def runner(_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernel(q, k, v, tensor_layout="NHD", is_causal=False)

    return time_candidate("8-bit", device=device, dtype=torch.bfloat16, shape=shape, runner=runner, reps=repeats)


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


def _dispatcher(kernel: Callable, previous: Callable, name: str | None = None) -> Callable:
    def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                        causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                        version=None):
        exact = dict(q_lens=q_lens, k_lens=k_lens, dropout_p=dropout_p, softmax_scale=softmax_scale,
                     q_scale=q_scale, causal=causal, window_size=window_size, deterministic=deterministic,
                     dtype=dtype, version=version)
        static = (not causal and tuple(window_size) == (-1, -1) and dropout_p == 0.0 and q_scale is None
                  and q.size(-1) in SAGE_HEAD_DIMS and q.size(2) == k.size(2)
                  and min(q.size(1), k.size(1)) >= MIN_TOKENS)
        if not static:
            return previous(q, k, v, **exact)
        half = (torch.float16, torch.bfloat16)
        cast = (lambda x: x if x.dtype in half else x.to(dtype)) if q.device.type == "cuda" else (lambda x: x)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
        if torch.compiler.is_compiling() and name is not None:
            from storystudio.patches import wan22

            fallback = wan22.active_attention()
            fallback = "sdpa" if fallback == "default" else fallback
            out = torch.ops.storystudio.attention_8bit(cast(q), cast(k), cast(v), q_lens, k_lens, name,
                                                       float(scale), fallback)
            return out.type(q.dtype)
        if not (_full(q_lens, q.size(1)) and _full(k_lens, k.size(1))):
            return previous(q, k, v, **exact)
        try:
            out = kernel(cast(q), cast(k), cast(v), tensor_layout="NHD", is_causal=False, sm_scale=scale)
        except NotImplementedError:  # a shape the kernel does not support: exact for this call
            return previous(q, k, v, **exact)
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
            mod.flash_attention = _dispatcher(kernel, saved[name], status.kernel)
        yield status
    finally:
        for name, fn in saved.items():
            sys.modules[name].flash_attention = fn


@torch.library.custom_op("storystudio::attention_8bit", mutates_args=())
def _attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor | None,
                       k_lens: torch.Tensor | None, kernel: str, scale: float, fallback: str) -> torch.Tensor:
    """The dispatcher's call from a compiled graph: the 8-bit kernel when nothing is padded, else exact."""
    from storystudio.models import attention

    if _full(q_lens, q.size(1)) and _full(k_lens, k.size(1)):
        try:
            return _kernels[kernel](q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale).to(q.dtype)
        except NotImplementedError:  # a shape the kernel does not support: exact for this call
            pass

    return attention.attention(fallback, q, k, v, q_lens, k_lens, softmax_scale=scale).to(q.dtype)


@_attention_8bit_op.register_fake
def _(q, k, v, q_lens, k_lens, kernel, scale, fallback):
    return q.new_empty((q.size(0), q.size(1), q.size(2), v.size(-1)))
