"""Exact attention backends for the Wan DiT, and the start-up self-check that picks one.

Attention is about two thirds of a Wan2.2-S2V denoising step at 480p (33k tokens,
40 heads x 128), and the kernels differ a lot on the same GPU: on an H100 one call took
60 ms with SDPA's flash backend (torch's default choice) and 38 ms with its cuDNN
backend. Which kernels exist, work and win depends on the GPU, the torch build and the
installed flash-attn, so nothing is hard-coded: :func:`select_backend` runs every
available candidate once on the actual device on a small Wan-shaped problem, compares it
with a float64 reference, times the survivors at a representative size (CUDA only) and
picks the fastest that passed. Candidates that are missing or wrong are skipped with a
log line and stay in the report.

Every backend computes the same function (softmax(QK^T * scale) V); none of them
approximates. Padding (flash-attn ``q_lens``/``k_lens`` varlen semantics), causal or
windowed attention and dropout go through :func:`masked_sdpa`, which honours them with an
explicit mask; the fast kernels are used only for dense calls, which is every call Wan
S2V makes (its self-attention ``k_lens`` equal the sequence length, also for the CFG
batch of two, and cross-attention has no lengths).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Candidates in preference order (used as is where nothing is timed, i.e. on CPU).
CANDIDATES: tuple[str, ...] = ("fa3", "fa4", "fa2", "cudnn", "flash", "efficient", "math")
# "sdpa": torch SDPA choosing its own kernel (what ran before the self-check existed).
BACKENDS: tuple[str, ...] = CANDIDATES + ("sdpa",)
REQUESTS: tuple[str, ...] = ("auto",) + BACKENDS + ("default",)

_SDPA_KERNELS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
_HALF = (torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """The backend's package or kernel is not present on this machine."""


# ----------------------------------------------------------------------------- kernels
def _import_attr(module: str, attr: str) -> Callable[..., Any]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install (ABI, CUDA) counts as absent
        raise BackendUnavailable(f"{module} is not importable: {type(exc).__name__}: {exc}") from None
    fn = getattr(mod, attr, None)
    if fn is None:
        raise BackendUnavailable(f"{module} has no {attr}")
    return fn


def _first(out: Any) -> torch.Tensor:
    """flash-attn functions return ``out`` or ``(out, lse, ...)`` depending on the version."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _flash_attn(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None) -> torch.Tensor:
    if q.device.type != "cuda" or q.dtype not in _HALF:
        raise BackendUnavailable(f"{kind} needs CUDA fp16/bf16 tensors")
    if kind == "fa3":
        fn = _import_attr("flash_attn_interface", "flash_attn_func")
    elif kind == "fa4":
        fn = _import_attr("flash_attn.cute.interface", "flash_attn_func")
    else:
        fn = _import_attr("flash_attn", "flash_attn_func")
    return _first(fn(q, k, v, softmax_scale=scale, causal=False))


# ``sdpa_kernel`` narrows torch's SDPA backend flags for the whole process and restores what
# it saw on entry: two threads with overlapping blocks (engines sharing a process, as the
# tests' fake fleet does) would leave one kernel enabled for good ("No available kernel"
# later). Every SDPA call here, narrowed or not, therefore runs under this lock; one
# generation per process, as in production, never waits on it.
_SDPA_FLAGS_LOCK = threading.RLock()


def _sdpa(kernel: str | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
          mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA on [B, L, N, C] tensors; ``kernel`` None lets torch choose."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kt.size(1) != qt.size(1):  # grouped-query heads
        rep = qt.size(1) // kt.size(1)
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    ctx = sdpa_kernel([getattr(SDPBackend, _SDPA_KERNELS[kernel])]) if kernel else contextlib.nullcontext()
    with _SDPA_FLAGS_LOCK, ctx:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def dense_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Unmasked attention on one backend; q [B, Lq, N, C], k/v [B, Lk, Nk, C*] -> [B, Lq, N, Cv]."""
    if backend in ("fa3", "fa4", "fa2"):
        return _flash_attn(backend, q, k, v, softmax_scale)
    if backend == "sdpa":
        return _sdpa(None, q, k, v, softmax_scale)
    if backend in _SDPA_KERNELS:
        return _sdpa(backend, q, k, v, softmax_scale)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def effective_lens(lens: torch.Tensor | None, full: int, device: torch.device) -> torch.Tensor | None:
    """``lens`` as a long tensor on ``device``, or None when it pads nothing (every length >= ``full``)."""
    if lens is None:
        return None
    x = torch.as_tensor(lens).reshape(-1)
    if bool((x >= full).all()):
        return None
    return x.to(device=device, dtype=torch.long).clamp(0, full)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor | None = None,
                k_lens: torch.Tensor | None = None, *, dropout_p: float = 0.0, softmax_scale: float | None = None,
                causal: bool = False, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Attention with flash-attn's varlen semantics on torch SDPA (torch picks the kernel).

    q: [B, Lq, Nq, C1], k: [B, Lk, Nk, C1], v: [B, Lk, Nk, C2] (Nq divisible by Nk), all one
    dtype. Keys at positions ``>= k_lens[b]`` are ignored, queries at positions ``>= q_lens[b]``
    give zeros; ``causal`` and ``window_size`` are aligned bottom-right like flash-attn.
    Returns [B, Lq, Nq, C2].
    """
    b, lq = q.shape[:2]
    lk = k.size(1)
    device = q.device
    ql, kl = effective_lens(q_lens, lq, device), effective_lens(k_lens, lk, device)
    local = window_size is not None and tuple(window_size) != (-1, -1)

    mask = None
    if kl is not None or ql is not None or causal or local:
        kpos = torch.arange(lk, device=device)
        qpos = torch.arange(lq, device=device)
        k_valid = kl if kl is not None else torch.full((b,), lk, device=device, dtype=torch.long)
        q_valid = ql if ql is not None else torch.full((b,), lq, device=device, dtype=torch.long)
        mask = (kpos.view(1, 1, lk) < k_valid.view(b, 1, 1)).expand(b, lq, lk)
        if causal or local:
            # flash-attn aligns the diagonal bottom-right: query i sees key j when
            # j <= i + (k_len - q_len) (causal), within [-left, +right] of it (window).
            diag = qpos.view(1, lq, 1) + (k_valid - q_valid).view(b, 1, 1)
            rel = kpos.view(1, 1, lk) - diag
            left, right = (window_size if local else (-1, -1))
            if causal:
                right = 0
            if right >= 0:
                mask = mask & (rel <= right)
            if left >= 0:
                mask = mask & (rel >= -left)
        mask = mask.unsqueeze(1)  # [B, 1, Lq, Lk]

    if mask is None:
        out = _sdpa(None, q, k, v, softmax_scale, dropout_p=dropout_p)
    else:
        # A query row with no visible key would give NaN: let it see everything and
        # zero it afterwards (flash-attn returns zeros there).
        empty = ~mask.any(dim=-1, keepdim=True)  # [B, 1, Lq, 1]
        out = _sdpa(None, q, k, v, softmax_scale, mask=mask | empty, dropout_p=dropout_p)
        out = out.masked_fill(empty.transpose(1, 2), 0.0)
    if ql is not None:
        qmask = torch.arange(lq, device=device).view(1, lq) < ql.view(b, 1)
        out = out * qmask.view(b, lq, 1, 1).to(out.dtype)
    return out


def attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              q_lens: torch.Tensor | None = None, k_lens: torch.Tensor | None = None, *,
              dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
              window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Attention on ``backend`` when the call is dense, on :func:`masked_sdpa` otherwise.

    Dense means: the lengths pad nothing, no causal/window mask, no dropout. Inputs are
    [B, L, N, C] in one dtype; the result is contiguous [B, Lq, N, Cv] in that dtype.
    """
    lq, lk = q.size(1), k.size(1)
    window = tuple(window_size) if window_size is not None else (-1, -1)
    dense = (not causal and window == (-1, -1) and dropout_p == 0.0
             and effective_lens(q_lens, lq, q.device) is None and effective_lens(k_lens, lk, q.device) is None)
    if dense:
        out = dense_attention(backend, q, k, v, softmax_scale)
    else:
        out = masked_sdpa(q, k, v, q_lens, k_lens, dropout_p=dropout_p, softmax_scale=softmax_scale,
                          causal=causal, window_size=window)
    return out.contiguous()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens=None, k_lens=None,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """Explicit masked softmax in float64 on the CPU: the self-check's oracle."""
    b, lq, nq, c = q.shape
    lk, nk = k.size(1), k.size(2)
    q64, k64, v64 = q.double().cpu(), k.double().cpu(), v.double().cpu()
    if nk != nq:
        k64 = k64.repeat_interleave(nq // nk, dim=2)
        v64 = v64.repeat_interleave(nq // nk, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(c)
    out = torch.zeros(b, lq, nq, v.size(-1), dtype=torch.float64)
    for i in range(b):
        ql = lq if q_lens is None else int(q_lens[i])
        kl = lk if k_lens is None else int(k_lens[i])
        if ql == 0 or kl == 0:
            continue
        s = torch.einsum("qnc,knc->nqk", q64[i, :ql], k64[i, :kl]) * scale
        p = torch.softmax(s, dim=-1)
        out[i, :ql] = torch.einsum("nqk,knc->qnc", p, v64[i, :kl])
    return out


# ----------------------------------------------------------------------------- self-check
@dataclass
class CandidateCheck:
    """One candidate's outcome: ``ok`` when it ran and matched the float64 reference."""

    name: str
    ok: bool
    rel_error: float | None = None  # worst relative L2 error over the check problems
    ms: float | None = None  # mean time per call at the timing size (CUDA only)
    note: str = ""


@dataclass
class AttentionSelection:
    """The chosen backend and why; reported by the engine and the bench."""

    backend: str
    requested: str
    device: str
    dtype: str
    timing_shape: tuple[int, int, int, int] | None = None  # (B, L, heads, head_dim) of the timing run
    checks: list[CandidateCheck] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = {c["name"]: {k: v for k, v in c.items() if k != "name"} for c in d["checks"]}
        return d


def error_bound(dtype: torch.dtype) -> float:
    """Largest relative L2 error accepted against the float64 reference.

    fp16/bf16 kernels accumulate in float32 but round inputs and the output: observed
    errors are a few 1e-3 for bf16; 2e-2 leaves room without letting a wrong kernel
    through (a wrong mask or scale gives errors of order 1).
    """
    return 2e-2 if dtype in _HALF else 1e-4


Runner = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _default_runner(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention(name, q, k, v)


def check_candidate(name: str, *, device: torch.device, dtype: torch.dtype, head_dim: int,
                    runner: Runner = _default_runner, seed: int = 0) -> CandidateCheck:
    """Run ``name`` on two small Wan-shaped problems (self- and cross-attention, batch 2)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for lq, lk in ((96, 96), (64, 40)):
        q, k, v = (torch.randn(2, n, 2, head_dim, generator=g) for n in (lq, lk, lk))
        q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
        try:
            out = runner(name, q, k, v)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except BackendUnavailable as exc:
            return CandidateCheck(name, False, note=f"unavailable: {exc}")
        except Exception as exc:  # noqa: BLE001 - any failure just rules the candidate out
            return CandidateCheck(name, False, note=f"failed: {type(exc).__name__}: {str(exc)[:200]}")
        if tuple(out.shape) != (2, lq, 2, head_dim):
            return CandidateCheck(name, False, note=f"wrong output shape {tuple(out.shape)}")
        ref = reference_attention(q, k, v)
        got = out.detach().double().cpu()
        if not torch.isfinite(got).all():
            return CandidateCheck(name, False, note="non-finite output")
        worst = max(worst, float((got - ref).norm() / ref.norm().clamp_min(1e-12)))
    bound = error_bound(dtype)
    if worst > bound:
        return CandidateCheck(name, False, rel_error=worst, note=f"relative error {worst:.2e} above {bound:.0e}")
    return CandidateCheck(name, True, rel_error=worst)


def time_candidate(name: str, *, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
                   runner: Runner = _default_runner, reps: int = 2) -> float:
    """Mean milliseconds per call at ``shape`` = (B, L, heads, head_dim), after one warm-up (CUDA)."""
    b, n, h, d = shape
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(3))
    runner(name, q, k, v)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(reps):
        runner(name, q, k, v)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps


def select_backend(*, device: torch.device | str, dtype: torch.dtype, heads: int, head_dim: int,
                   requested: str = "auto", timing_tokens: int = 32768, candidates: tuple[str, ...] = CANDIDATES,
                   runner: Runner = _default_runner) -> AttentionSelection:
    """Check every candidate on ``device`` and pick one (see the module docstring).

    ``requested`` is ``auto`` or a backend name (``STORYSTUDIO_ATTENTION``). A requested
    backend is used when it passes its check; when it does not, the choice falls back to
    ``auto`` and the note says so (the report always names the backend that really runs).
    ``default`` and ``sdpa`` are taken as requested without a check: they are the paths
    that ran before this module existed. On CUDA the passing candidates are timed at
    ``timing_tokens`` tokens with ``heads`` x ``head_dim`` (Wan 480p: ~33k x 40 x 128).
    """
    device = torch.device(device)
    if requested not in REQUESTS:
        raise ValueError(f"attention must be one of {', '.join(REQUESTS)}, got {requested!r}")
    sel = AttentionSelection(backend="", requested=requested, device=str(device), dtype=str(dtype).replace("torch.", ""))
    if requested in ("default", "sdpa"):
        sel.backend = requested
        return sel
    names = list(candidates)
    if requested != "auto" and requested not in names:
        names.append(requested)
    timed = device.type == "cuda"
    if timed:
        sel.timing_shape = (1, int(timing_tokens), int(heads), int(head_dim))
    t0 = time.perf_counter()
    for name in names:
        check = check_candidate(name, device=device, dtype=dtype, head_dim=head_dim, runner=runner)
        if check.ok and timed:
            try:
                check.ms = round(time_candidate(name, device=device, dtype=dtype, shape=sel.timing_shape,
                                                runner=runner), 3)
            except Exception as exc:  # noqa: BLE001 - e.g. a kernel that refuses the long sequence
                check.ok = False
                check.note = f"failed at the timing size: {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if check.ok:
            log.info("attention candidate %s: ok (rel. error %.1e%s)", name, check.rel_error or 0.0,
                     f", {check.ms:.2f} ms" if check.ms is not None else "")
        else:
            log.info("attention candidate %s skipped: %s", name, check.note)
        sel.checks.append(check)
    passed = [c for c in sel.checks if c.ok]
    if not passed:
        sel.backend = "sdpa"
        sel.note = "no candidate passed the self-check; torch SDPA chooses its own kernel"
    elif requested != "auto" and any(c.name == requested for c in passed):
        sel.backend = requested
        sel.note = "forced"
    else:
        if requested != "auto":
            sel.note = f"requested {requested} did not pass the self-check; auto choice used"
            log.warning("attention backend %s was requested but %s; choosing automatically", requested,
                        next(c.note for c in sel.checks if c.name == requested))
        best = min(passed, key=lambda c: c.ms) if timed else passed[0]
        sel.backend = best.name
    log.info("attention backend: %s on %s %s (self-check %.2f s)%s", sel.backend, device, sel.dtype,
             time.perf_counter() - t0, f"; {sel.note}" if sel.note else "")
    return sel
