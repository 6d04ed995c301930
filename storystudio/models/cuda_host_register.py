"""Page-locking host memory ranges for CUDA, through the driver API, without touching PyTorch's error state.

Why not ``torch.cuda.cudart().cudaHostRegister``: that binding returns the runtime's
error code but leaves the CUDA runtime's per-thread *last error* set when the call
fails, and PyTorch exposes no ``cudaGetLastError`` to clear it. PyTorch checks that
slot after its own calls, so a failed registration surfaced later as an unrelated
``torch.empty(..., device="cuda")`` raising ``CUDA error: part or all of the requested
memory range is already mapped`` (seen on the H100, issue 13). Its error enum also
knows only ``success``, so every failure was logged as ``cudaError.???``.

The driver API (``cuMemHostRegister`` in ``libcuda.so.1``, the library PyTorch itself
runs on) has no last-error slot: a failure is only the returned code, reported here
with its real name (``cuGetErrorName``) in a :class:`CudaResult`. The registration is
made ``PORTABLE`` (pinned for every context of the process) inside the device's
primary context, pushed onto the calling thread only for the call and popped again, so
the reader threads that pin chunks while a set loads neither need a current context
nor leave one behind, and a rank on ``cuda:3`` never creates a context on GPU 0.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

CU_MEMHOSTREGISTER_PORTABLE = 0x01
SUCCESS = 0
HOST_MEMORY_ALREADY_REGISTERED = 712  # CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED (same code in the runtime)
HOST_MEMORY_NOT_REGISTERED = 713  # CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED

# Names for the codes this module expects, used when the driver cannot name a code itself.
_KNOWN = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    208: "CUDA_ERROR_ALREADY_MAPPED",
    712: "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
    713: "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    999: "CUDA_ERROR_UNKNOWN",
}


@dataclass(frozen=True)
class CudaResult:
    """A driver call's outcome: its code, the code's name and the driver's description."""

    code: int
    name: str
    description: str = ""

    @property
    def ok(self) -> bool:
        return self.code == SUCCESS

    def __str__(self) -> str:
        return f"{self.name} ({self.code}): {self.description}" if self.description else f"{self.name} ({self.code})"


class _DriverCallFailed(Exception):
    """A context call failed before the registration itself could be tried."""

    def __init__(self, result: CudaResult) -> None:
        super().__init__(str(result))
        self.result = result


class Registrar(Protocol):
    """What :class:`~storystudio.models.host_memory.HostBuffer` needs (tests give a fake)."""

    def register(self, ptr: int, nbytes: int, device_index: int) -> CudaResult: ...

    def unregister(self, ptr: int, device_index: int) -> CudaResult: ...


class DriverRegistrar:
    """``cuMemHostRegister`` / ``cuMemHostUnregister`` from ``libcuda.so.1`` (ctypes; the GIL is released)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        vp, pvp, cint = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int
        for name, args in (
            ("cuInit", [ctypes.c_uint]),
            ("cuDeviceGet", [ctypes.POINTER(cint), cint]),
            ("cuDevicePrimaryCtxRetain", [pvp, cint]),
            ("cuCtxGetCurrent", [pvp]),
            ("cuCtxPushCurrent_v2", [vp]),
            ("cuCtxPopCurrent_v2", [pvp]),
            ("cuMemHostRegister_v2", [vp, ctypes.c_size_t, ctypes.c_uint]),
            ("cuMemHostUnregister", [vp]),
            ("cuGetErrorName", [cint, ctypes.POINTER(ctypes.c_char_p)]),
            ("cuGetErrorString", [cint, ctypes.POINTER(ctypes.c_char_p)]),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, cint
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        rc = lib.cuInit(0)
        if rc != SUCCESS:
            raise OSError(f"cuInit failed: {self.result(rc)}")

    def result(self, code: int) -> CudaResult:
        """``code`` with its driver name and description (``cuGetErrorName`` / ``cuGetErrorString``)."""
        if code == SUCCESS:
            return CudaResult(0, "CUDA_SUCCESS")
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        got_name = self._lib.cuGetErrorName(code, ctypes.byref(name)) == SUCCESS and name.value
        got_text = self._lib.cuGetErrorString(code, ctypes.byref(text)) == SUCCESS and text.value
        return CudaResult(
            code,
            name.value.decode() if got_name and name.value else _KNOWN.get(code, f"CUDA error {code}"),
            text.value.decode() if got_text and text.value else "",
        )

    def _primary_context(self, device_index: int) -> ctypes.c_void_p:
        """The device's primary context (the one the runtime, hence PyTorch, uses), retained once."""
        with self._lock:
            ctx = self._contexts.get(device_index)
            if ctx is None:
                dev, ctx = ctypes.c_int(), ctypes.c_void_p()
                rc = self._lib.cuDeviceGet(ctypes.byref(dev), device_index)
                if rc == SUCCESS:
                    rc = self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value)
                if rc != SUCCESS:
                    raise _DriverCallFailed(self.result(rc))
                self._contexts[device_index] = ctx
            return ctx

    @contextmanager
    def _in_context(self, device_index: int) -> Iterator[None]:
        """Run with the device's primary context current on this thread; the thread's own is left as it was."""
        ctx = self._primary_context(device_index)
        current = ctypes.c_void_p()
        rc = self._lib.cuCtxGetCurrent(ctypes.byref(current))
        if rc != SUCCESS:
            raise _DriverCallFailed(self.result(rc))
        if current.value == ctx.value:
            yield
            return
        rc = self._lib.cuCtxPushCurrent_v2(ctx)
        if rc != SUCCESS:
            raise _DriverCallFailed(self.result(rc))
        try:
            yield
        finally:
            popped = ctypes.c_void_p()
            self._lib.cuCtxPopCurrent_v2(ctypes.byref(popped))

    def register(self, ptr: int, nbytes: int, device_index: int) -> CudaResult:
        try:
            with self._in_context(device_index):
                rc = self._lib.cuMemHostRegister_v2(ptr, nbytes, CU_MEMHOSTREGISTER_PORTABLE)
        except _DriverCallFailed as exc:
            return exc.result
        return self.result(rc)

    def unregister(self, ptr: int, device_index: int) -> CudaResult:
        try:
            with self._in_context(device_index):
                rc = self._lib.cuMemHostUnregister(ptr)
        except _DriverCallFailed as exc:
            return exc.result
        return self.result(rc)


@functools.cache
def driver() -> DriverRegistrar | None:
    """The process's driver registrar; ``None`` without a usable CUDA device (nothing is pinned then)."""
    try:
        if not torch.cuda.is_available():
            return None
        return DriverRegistrar(ctypes.CDLL("libcuda.so.1"))
    except (OSError, AttributeError, RuntimeError, AssertionError) as exc:
        logger.warning("page-locking host memory is unavailable (%s: %s); parking buffers stay pageable",
                       type(exc).__name__, exc)
        return None
