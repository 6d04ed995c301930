"""FP8 attention on cuDNN (``sdpa_fp8`` through the cuDNN frontend), a fast-preset candidate.

Why: after the exact path, attention is ~45 % of a 480p CFG step on the H100 and already
runs cuDNN's bf16 flash kernel at ~650 TFLOP/s; only an 8-bit kernel can go further.
SageAttention 1 measured slower than cuDNN bf16 there (49.9 vs 38 ms), and Sage 2 / FA3
have no wheels for the image's torch; cuDNN's FP8 forward does, through the
``nvidia-cudnn-frontend`` wheel on the cuDNN that torch already ships.

Per-tensor scaling (cuDNN's FP8 SDPA takes scalar scales): Q, K and V are scaled so
their largest magnitude maps to e4m3's 448. K is first centred per head over its tokens
(``k - mean(k)``), which changes no softmax row (it subtracts the same ``q . mean`` from
every logit of a query) but removes the shared offset that would otherwise eat the 8-bit
range (SageAttention's smoothing). The probabilities are scaled by 448 into e4m3; the
output is e4m3 too (Hopper's kernel writes FP8 O), scaled like V, and comes back as bf16.

:func:`load` returns ``(kernel, detail)`` or ``(None, why)``; the kernel has
SageAttention's signature (``tensor_layout="NHD"``) so :mod:`~storystudio.models.attention8`
treats both alike. Graphs are built once per shape and kept.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch

E4M3_MAX = 448.0
_TINY = 1e-12


def load() -> tuple[Callable[..., torch.Tensor] | None, str]:
    """``(kernel, "cudnn-frontend <v>, cuDNN <v>")`` where it can run, else ``(None, why)``."""
    try:
        import cudnn  # type: ignore[import-not-found]  # the nvidia-cudnn-frontend wheel
    except Exception as exc:  # noqa: BLE001 - a broken install (ImportError, OSError) is "unavailable" too
        if isinstance(exc, ModuleNotFoundError) and exc.name == "cudnn":
            return None, "cuDNN FP8: nvidia-cudnn-frontend is not installed"
        return None, f"cuDNN FP8: the cuDNN frontend cannot be imported: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return None, "cuDNN FP8: needs a CUDA device"
    if torch.cuda.get_device_capability() < (9, 0):
        return None, "cuDNN FP8: needs a Hopper or newer GPU (compute capability 9.0+)"
    version = getattr(cudnn, "__version__", "?")
    try:
        backend = cudnn.backend_version()
    except Exception:  # noqa: BLE001 - only for the report
        backend = "?"
    return CudnnFP8Attention(cudnn), f"cuDNN FP8 (frontend {version}, cuDNN {backend})"


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, descale)``: e4m3 ``x * 448 / amax(|x|)`` and the float32 [1,1,1,1] factor that undoes it."""
    amax = x.abs().amax().float().clamp(min=_TINY)
    scale = E4M3_MAX / amax
    x8 = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, (1.0 / scale).reshape(1, 1, 1, 1)


class CudnnFP8Attention:
    """``kernel(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=None)`` on cuDNN's FP8 SDPA."""

    def __init__(self, cudnn: Any) -> None:
        self.cudnn = cudnn
        self._graphs: dict[tuple, Any] = {}  # shape -> (graph, tensors, workspace) or the NotImplementedError
        self._handles: dict[int, Any] = {}
        self._lock = threading.RLock()  # _graph builds under it and _build asks _handle, which takes it again

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "NHD",
                 is_causal: bool = False, sm_scale: float | None = None) -> torch.Tensor:
        if tensor_layout != "NHD" or is_causal:
            raise ValueError("cuDNN FP8 attention here takes NHD, non-causal calls only")
        b, lq, h, d = q.shape
        lk = k.shape[1]
        scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
        out_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        k = k - k.float().mean(dim=1, keepdim=True).to(k.dtype)  # softmax-invariant smoothing
        q8, dq = quantize(q.contiguous())
        k8, dk = quantize(k.contiguous())
        v8, dv = quantize(v.contiguous())
        one = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        s_scale = one * E4M3_MAX
        s_descale = one / E4M3_MAX
        o_scale = 1.0 / dv  # |O| <= max|V|: O in V's range
        o8 = torch.empty(b, lq, h, d, dtype=torch.float8_e4m3fn, device=q.device)
        amax_s = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        amax_o = torch.empty_like(amax_s)
        graph, t, ws_size = self._graph(b, h, lq, lk, d, scale, q.device)
        workspace = torch.empty(max(ws_size, 1), dtype=torch.uint8, device=q.device)
        handle = self._handle(q.device)
        self.cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        graph.execute({t["q"]: q8, t["k"]: k8, t["v"]: v8, t["dq"]: dq, t["dk"]: dk, t["dv"]: dv,
                       t["ds"]: s_descale, t["ss"]: s_scale, t["so"]: o_scale, t["o"]: o8,
                       t["amax_s"]: amax_s, t["amax_o"]: amax_o}, workspace, handle=handle)
        return (o8.float() * dv).to(out_dtype)

    def _handle(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            if index not in self._handles:
                with torch.cuda.device(index):
                    self._handles[index] = self.cudnn.create_handle()
            return self._handles[index]

    def _graph(self, b: int, h: int, lq: int, lk: int, d: int, scale: float,
               device: torch.device) -> tuple[Any, dict[str, Any], int]:
        """The built graph for this shape; ``NotImplementedError`` (remembered) where cuDNN has no
        FP8 plan for it, so the caller runs exact attention for that shape instead of failing."""
        key = (b, h, lq, lk, d, scale, str(device))
        with self._lock:
            if key not in self._graphs:
                try:
                    self._graphs[key] = self._build(b, h, lq, lk, d, scale, device)
                except Exception as exc:  # noqa: BLE001 - cudnn raises its own error types
                    self._graphs[key] = NotImplementedError(
                        f"cuDNN FP8 SDPA has no plan for {key[:5]}: {type(exc).__name__}: {exc}")
            graph = self._graphs[key]
        if isinstance(graph, NotImplementedError):
            raise graph
        return graph

    def _build(self, b: int, h: int, lq: int, lk: int, d: int, scale: float,
               device: torch.device) -> tuple[Any, dict[str, Any], int]:
        cudnn = self.cudnn
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                              handle=self._handle(device))

        def nhd(name: str, length: int) -> Any:  # [B, L, H, D] memory seen as cuDNN's (B, H, L, D)
            return graph.tensor(name=name, dim=(b, h, length, d), stride=(length * h * d, d, h * d, 1),
                                data_type=e4m3)

        t: dict[str, Any] = {"q": nhd("q", lq), "k": nhd("k", lk), "v": nhd("v", lk)}
        for name in ("dq", "dk", "dv", "ds", "ss", "so"):
            t[name] = graph.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
        kwargs = dict(q=t["q"], k=t["k"], v=t["v"], descale_q=t["dq"], descale_k=t["dk"], descale_v=t["dv"],
                      descale_s=t["ds"], scale_s=t["ss"], scale_o=t["so"], attn_scale=scale,
                      use_causal_mask=False)
        try:
            o, _, amax_s, amax_o = graph.sdpa_fp8(generate_stats=False, **kwargs)
        except TypeError:  # frontends before the generate_stats spelling
            o, _, amax_s, amax_o = graph.sdpa_fp8(is_inference=True, **kwargs)
        o.set_output(True).set_dim((b, h, lq, d)).set_stride((lq * h * d, d, h * d, 1)).set_data_type(e4m3)
        for name, tensor in (("amax_s", amax_s), ("amax_o", amax_o)):
            tensor.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
            t[name] = tensor
        t["o"] = o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        return graph, t, int(graph.get_workspace_size())
