"""FP8 (e4m3) weights and activations for the Wan DiT's block linears: the fast preset's ``fp8`` knob.

Why: on an H100 a 33k x 5120 -> 13824 FFN-up linear took 6.07 ms in bf16 and 3.88 ms as
``torch._scaled_mm`` on FP8 operands with row-wise scales (3.53 ms tensor-wise); the
block linears are about a third of a CFG step at 480p.

How, and why this way:

* **Weights are quantized once** (:func:`build_store`): per output row, scale =
  amax / 448, giving a ``float8_e4m3fn`` [N, K] matrix and a float32 scale. They live
  as *buffers* of an :class:`FP8Store` module that the engine reports as its own
  component, so the ModelManager parks and restores them like any other weights —
  one byte per weight, half of what the bf16 copy moves.
* **The bf16 linears stay as they are.** Fast is opt-in per job and exact jobs need
  the bf16 weights, so both copies exist; :func:`fp8_linears` turns the selected
  ``nn.Linear`` modules into :class:`FP8Linear` (a class swap, no new parameters) for
  the duration of one fast job and back afterwards. Exact jobs run the untouched
  modules, bit for bit; the manager may park whichever copy a job does not use.
* **Activations are quantized per call**: one scale per token (row-wise) by default,
  one per tensor as the fallback where row-wise ``_scaled_mm`` is not available.
* **Backends**: ``scaled_mm`` on CUDA devices that pass a one-time probe (compute
  capability 8.9+, the call checked against the emulation); ``emulated`` on CPU — the
  same quantized operands multiplied in float32, so the math of the GPU path is
  testable without a GPU. Anything else is unsupported (a job that explicitly asks
  for fp8 then fails with ``fp8_unsupported``).

Which layers (:data:`FP8_LINEAR_PATTERN`): the attention projections (q, k, v, o of
self- and cross-attention) and both FFN linears of every DiT block — the big GEMMs.
Embeddings, the head, the modulation, the audio injector and the frame packer stay in
bf16: they are small or precision-sensitive.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MIN_SCALE = 1e-12  # an all-zero row or token still gets a finite scale
Granularity = Literal["row", "tensor"]
Backend = Literal["scaled_mm", "emulated"]

# Module names (relative to WanModel_S2V) whose nn.Linear runs in FP8 on fast jobs.
FP8_LINEAR_PATTERN = re.compile(r"^blocks\.\d+\.(?:self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")
_ALIGN = 16  # torch._scaled_mm needs K and N to be multiples of 16


# ------------------------------------------------------------------ quantization
def quantize(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> (float8 [M, K], float32 scale) with ``x ≈ q.float() * scale``.

    Row-wise: one scale per row, shape [M, 1] (per token for activations, per output
    channel for a weight). Tensor-wise: one scale, shape [1, 1]. Values are scaled so
    the largest magnitude maps to 448, clamped (never NaN) and rounded to nearest.
    """
    # amax in x's own dtype is exact; the division promotes to float32 (scale is float32),
    # so a bf16 activation is never rounded twice. Two full-size temporaries at most.
    mag = x.abs()
    amax = mag.amax(dim=-1, keepdim=True) if granularity == "row" else mag.amax().reshape(1, 1)
    del mag
    scale = (amax.float() / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize` (float32); ``scale`` is [M, 1] or [1, 1]."""
    return q.float() * scale


def emulated_scaled_mm(qa: torch.Tensor, qw: torch.Tensor, scale_a: torch.Tensor, scale_w: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What ``torch._scaled_mm(qa, qw.t(), scale_a, scale_w.t(), bias)`` computes, in float32.

    ``qa`` [M, K] and ``qw`` [N, K] are the FP8 operands (exactly representable in
    float32), ``scale_a`` [M, 1] or [1, 1], ``scale_w`` [N, 1] or [1, 1]. Only the
    summation order and the final rounding differ from the GPU kernel.
    """
    out = (qa.float() @ qw.float().t()) * scale_a * scale_w.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _cuda_scaled_mm(qa: torch.Tensor, qw: torch.Tensor, scale_a: torch.Tensor, scale_w: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, fused_bias: bool) -> torch.Tensor:
    # qw is [N, K] row-major, so qw.t() is the column-major [K, N] operand _scaled_mm wants.
    if out_dtype not in (torch.bfloat16, torch.float16):
        # Row-wise _scaled_mm writes bf16 only (a linear called inside a float32 autocast region).
        return _cuda_scaled_mm(qa, qw, scale_a, scale_w, bias, torch.bfloat16, fused_bias).to(out_dtype)
    scale_b = scale_w.reshape(1, -1)
    if bias is not None and fused_bias:
        return torch._scaled_mm(qa, qw.t(), scale_a=scale_a, scale_b=scale_b, bias=bias.to(out_dtype),
                                out_dtype=out_dtype)
    out = torch._scaled_mm(qa, qw.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return out if bias is None else out + bias.to(out_dtype)


# ------------------------------------------------------------------ device support
@dataclass(frozen=True)
class FP8Support:
    """Whether and how FP8 linears run on a device (probed once per device)."""

    backend: Backend | None
    granularity: Granularity | None = None
    fused_bias: bool = False
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.backend is not None

    def describe(self) -> str:
        if self.backend is None:
            return f"unavailable: {self.reason}"
        return f"{self.backend} ({self.granularity}-wise scales)"


_support_cache: dict[str, FP8Support] = {}
_support_lock = threading.Lock()


def fp8_support(device: torch.device | str) -> FP8Support:
    """How FP8 linears run on ``device``: probed once per device and cached."""
    device = torch.device(device)
    key = str(device)
    with _support_lock:
        if key not in _support_cache:
            _support_cache[key] = _probe(device)
            log.info("FP8 linears on %s: %s", key, _support_cache[key].describe())
        return _support_cache[key]


def _probe(device: torch.device) -> FP8Support:
    if device.type == "cpu":
        return FP8Support("emulated", "row", reason="CPU: FP8 math emulated in float32")
    if device.type != "cuda":
        return FP8Support(None, reason=f"no FP8 matmul on {device.type} devices")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        return FP8Support(None, reason=f"{name} is compute capability {cap[0]}.{cap[1]}; FP8 matmul needs 8.9+ "
                                       "(Ada, Hopper or newer)")
    errors = []
    for granularity in ("row", "tensor"):
        for fused_bias in (True, False):
            try:
                _check_call(device, granularity, fused_bias)
            except Exception as exc:  # noqa: BLE001 - any failure of the probe means "not this way"
                errors.append(f"{granularity}-wise{' +bias' if fused_bias else ''}: {type(exc).__name__}: {exc}")
                continue
            return FP8Support("scaled_mm", granularity, fused_bias)  # type: ignore[arg-type]
    return FP8Support(None, reason="torch._scaled_mm failed: " + "; ".join(errors)[:500])


def _check_call(device: torch.device, granularity: Granularity, fused_bias: bool) -> None:
    """One small ``_scaled_mm`` against the emulation; raises if it fails or disagrees."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(64, 64, generator=g).to(device)
    w = torch.randn(32, 64, generator=g).to(device)
    b = torch.randn(32, generator=g).to(device, torch.bfloat16)
    qa, sa = quantize(x, granularity)
    qw, sw = quantize(w, granularity)
    got = _cuda_scaled_mm(qa, qw, sa, sw, b, torch.bfloat16, fused_bias).float()
    want = emulated_scaled_mm(qa, qw, sa, sw, b, torch.float32)
    err = ((got - want).norm() / want.norm()).item()
    if not err < 1e-2:
        raise RuntimeError(f"result differs from the emulation by {err:.3g} (relative L2)")


# ------------------------------------------------------------------ weights
class FP8Weight(nn.Module):
    """One quantized linear weight: ``weight`` float8 [N, K] and ``scale`` float32 [N, 1] or [1, 1]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, granularity: Granularity) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.granularity: Granularity = granularity

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: Granularity) -> FP8Weight:
        q, scale = quantize(linear.weight.detach(), granularity)
        return cls(q, scale, granularity)

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return f"out={n}, in={k}, {self.granularity}-wise"


class FP8Store(nn.Module):
    """The FP8 copies of the selected linears of one model, keyed by module name.

    An ordinary module holding only buffers, so the ModelManager parks/restores it as a
    component of its own.
    """

    def __init__(self, weights: dict[str, FP8Weight], granularity: Granularity) -> None:
        super().__init__()
        self.granularity: Granularity = granularity
        self.names = list(weights)
        # ModuleDict keys cannot contain dots.
        self.layers = nn.ModuleDict({n.replace(".", "/"): w for n, w in weights.items()})

    def __getitem__(self, name: str) -> FP8Weight:
        return self.layers[name.replace(".", "/")]  # type: ignore[return-value]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def select_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears of ``model`` that run in FP8: names matching :data:`FP8_LINEAR_PATTERN`.

    A matching linear whose sizes ``_scaled_mm`` cannot take (not multiples of 16) is
    left out with a log line rather than failing the whole model.
    """
    out: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if not FP8_LINEAR_PATTERN.match(name) or not isinstance(mod, nn.Linear):
            continue
        if mod.in_features % _ALIGN or mod.out_features % _ALIGN:
            log.warning("FP8: %s (%d -> %d) is not a multiple of %d; it stays in bf16", name, mod.in_features,
                        mod.out_features, _ALIGN)
            continue
        out[name] = mod
    return out


def store_nbytes(model: nn.Module, granularity: Granularity = "row") -> int:
    """Bytes :func:`build_store` will allocate for ``model`` (one per weight plus the scales)."""
    total = 0
    for lin in select_linears(model).values():
        total += lin.weight.numel() + 4 * (lin.out_features if granularity == "row" else 1)
    return total


@torch.no_grad()
def build_store(model: nn.Module, granularity: Granularity = "row") -> FP8Store:
    """Quantize the selected linears of ``model`` once, on the device their weights are on."""
    weights = {name: FP8Weight.from_linear(lin, granularity) for name, lin in select_linears(model).items()}
    store = FP8Store(weights, granularity)
    log.info("FP8 store: %d linears, %.2f GiB", len(weights), store.nbytes() / 2**30)
    return store


class LinearWeights(nn.Module):
    """The bf16 weights of the selected linears, as a group of the *same* Parameter objects.

    The engine reports it as a component listed before the whole transformer, so the
    ModelManager (a tensor belongs to the first component that lists it) can park these
    weights on their own while a job runs on the FP8 copy.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, lin in select_linears(model).items():
            self.register_parameter(name.replace(".", "/") + "/weight", lin.weight)


# ------------------------------------------------------------------ the linear
class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose forward runs on its FP8 weight; only ever made by :func:`fp8_linears`.

    The bf16 ``weight`` is not read (it may be parked); ``bias`` still is.
    """

    _fp8: FP8Weight
    _fp8_support: FP8Support

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._fp8
        support = self._fp8_support
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        lead = x.shape[:-1]
        qa, sa = quantize(x.reshape(-1, x.shape[-1]), w.granularity)
        if support.backend == "scaled_mm":
            y = _cuda_scaled_mm(qa, w.weight, sa, w.scale, self.bias, out_dtype, support.fused_bias)
        else:
            y = emulated_scaled_mm(qa, w.weight, sa, w.scale, self.bias, out_dtype)
        return y.reshape(*lead, y.shape[-1])


@contextmanager
def fp8_linears(model: nn.Module, store: FP8Store, support: FP8Support) -> Iterator[int]:
    """Run the selected linears of ``model`` on ``store`` inside the block; yields how many.

    The class swap is the per-job flag: outside the block the modules are plain
    ``nn.Linear`` again (also after an exception).
    """
    if not support.available:
        raise RuntimeError(f"FP8 linears are {support.describe()}")
    swapped: list[nn.Linear] = []
    try:
        for name, lin in select_linears(model).items():
            if type(lin) is not nn.Linear:
                raise RuntimeError(f"{name} is already an {type(lin).__name__}")
            fw = store[name]
            if tuple(fw.weight.shape) != (lin.out_features, lin.in_features):
                raise RuntimeError(f"FP8 weight of {name} is {tuple(fw.weight.shape)}, the linear is "
                                   f"{(lin.out_features, lin.in_features)}")
            # object.__setattr__: a submodule reference here would add the store's buffers
            # to the transformer's own parameters/buffers (and to its component).
            object.__setattr__(lin, "_fp8", fw)
            object.__setattr__(lin, "_fp8_support", support)
            lin.__class__ = FP8Linear
            swapped.append(lin)
        yield len(swapped)
    finally:
        for lin in swapped:
            lin.__class__ = nn.Linear
            del lin.__dict__["_fp8"], lin.__dict__["_fp8_support"]

