"""Host buffers for model weights, page-locked chunk by chunk while they are filled.

Why not ``torch.empty(n, pin_memory=True)``: measured on the H100 host, one
``cudaHostAlloc`` of the 30 GiB Wan DiT took 16.8 s and held the CUDA driver while
it ran, and PyTorch's pinned allocator rounds every block up to a power of two (a
10.6 GiB T5 would lock 16 GiB of RAM).

So a buffer here is ordinary anonymous memory of the exact size (``mmap``, with
``MADV_HUGEPAGE`` so the kernel may back it with 2 MiB pages: fewer pages to fault in
and to lock), made page-locked with ``cudaHostRegister`` one chunk (~256 MiB, on
tensor boundaries) at a time. The weight loader registers each chunk as soon as
the files have filled it, during the model's cold load, when no job is running:
pinning (≈0.55 s per GiB when measured on fresh pages) never lands on a job's
critical path any more. Every copy is issued per chunk so it never crosses two
registrations.

A registration must be undone before its memory goes back to the kernel. When it is
not, the driver keeps the registration (and the old pages) while the address is
reused: the next buffer mapped there cannot be registered
(``CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED``), device allocations fail with
``cudaErrorAlreadyMapped``, and a copy from such an address would read the old pages.
That is what broke the GPU tests on the H100 (issue 13), which make one ModelManager
after another in one process. So a buffer's memory is a :class:`_HostMapping`, which
unregisters its ranges when the last tensor viewing it goes away, *before* the memory
is unmapped (:meth:`HostBuffer.release` and ``ModelManager.close`` do it explicitly).
Registration goes through :mod:`storystudio.models.cuda_host_register` (the driver API),
so a failed one is reported by name and never leaves an error for PyTorch to trip on.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Sequence

import torch

from storystudio.models import cuda_host_register
from storystudio.models.cuda_host_register import HOST_MEMORY_ALREADY_REGISTERED, HOST_MEMORY_NOT_REGISTERED, Registrar

logger = logging.getLogger(__name__)

GiB = 1024**3
CHUNK_BYTES = 256 * 1024**2
_HUGE_PAGE = 2 * 1024**2

# Chunk states of a HostBuffer.
_PAGEABLE, _PINNING, _PINNED, _FOREIGN, _FAILED = range(5)

# Every registration a HostBuffer of this process holds: pointer -> bytes. It mirrors what the
# driver has page-locked for us, so tests can check that a released buffer leaves nothing behind.
_live: dict[int, int] = {}
_live_lock = threading.Lock()
# Mappings whose registration could not be undone: kept mapped for the life of the process, so their
# addresses are never reused under a registration the driver still holds.
_quarantine: list[_HostMapping] = []


def registered_bytes() -> int:
    """Bytes of host memory that this process's buffers hold page-locked right now."""
    with _live_lock:
        return sum(_live.values())


def plan_chunks(ranges: Sequence[tuple[int, int]], total: int, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Group consecutive ``(start, end)`` tensor ranges into chunks of at least ``chunk_bytes``.

    A chunk boundary never falls inside a tensor, so any tensor's bytes lie within
    one chunk (a tensor larger than ``chunk_bytes`` is a chunk of its own). The chunks
    cover ``[0, total)`` without gaps.
    """
    chunks: list[tuple[int, int]] = []
    start = 0
    for _, end in ranges:
        if end - start >= chunk_bytes:
            chunks.append((start, end))
            start = end
    if start < total or not chunks:
        chunks.append((start, total))
    return chunks


class _HostMapping(mmap.mmap):
    """Anonymous memory that gives back its page-locked ranges before it is unmapped.

    ``torch.frombuffer`` keeps this object alive for as long as any tensor views the
    memory, and a subclass's ``__del__`` runs before ``mmap``'s own deallocation unmaps
    it. Pages are faulted in only when first written, and the kernel may back the
    mapping with transparent huge pages (``MADV_HUGEPAGE``): fewer pages to fault in
    and to lock.
    """

    @classmethod
    def anonymous(cls, nbytes: int) -> _HostMapping:
        mem = cls(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem.registrations = {}  # pointer -> (bytes, device index, registrar)
        mem.lock = threading.Lock()
        if nbytes >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mem.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP disabled: ordinary pages, same behaviour
                pass
        return mem

    def add(self, ptr: int, nbytes: int, device_index: int, registrar: Registrar) -> None:
        with self.lock:
            self.registrations[ptr] = (nbytes, device_index, registrar)
        with _live_lock:
            _live[ptr] = nbytes

    def unregister_all(self, key: str) -> bool:
        """Undo every registration; False if the driver kept one (it stays recorded)."""
        with self.lock:
            pending = list(self.registrations.items())
        kept = False
        for ptr, (nbytes, device_index, registrar) in pending:
            res = registrar.unregister(ptr, device_index)
            if res.ok or res.code == HOST_MEMORY_NOT_REGISTERED:
                with self.lock:
                    self.registrations.pop(ptr, None)
                with _live_lock:
                    _live.pop(ptr, None)
            else:
                kept = True
                logger.warning("could not unregister %.2f GiB of %s: %s", nbytes / GiB, key, res)
        return not kept

    def __del__(self) -> None:
        try:
            if getattr(self, "registrations", None) and not self.unregister_all("a released host buffer"):
                _quarantine.append(self)  # never unmapped: its address must not be reused while registered
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver goes with the process
            pass


class HostBuffer:
    """One flat host copy of a component (or a staging slot); chunks page-locked on request.

    ``device``: the CUDA device the buffer feeds (its primary context does the
    registration); when not given, the current device of the thread making the buffer.
    ``registrar``: the page-locking calls (the CUDA driver by default; tests give a fake).
    """

    def __init__(self, key: str, nbytes: int, chunks: list[tuple[int, int]], *,
                 device: torch.device | None = None, registrar: Registrar | None = None) -> None:
        self.key = key
        self._mapping = _HostMapping.anonymous(nbytes) if nbytes > 0 else None
        self.tensor = (torch.frombuffer(self._mapping, dtype=torch.uint8) if self._mapping is not None
                       else torch.empty(0, dtype=torch.uint8))
        self.chunks = chunks
        self._state = [_PAGEABLE] * len(chunks)
        self._lock = threading.Lock()
        if device is not None and device.type == "cuda" and device.index is not None:
            self._device_index: int | None = device.index
        elif torch.cuda.is_initialized():  # this thread's device, not a reader thread's (always 0) at pin time
            self._device_index = torch.cuda.current_device()
        else:
            self._device_index = None
        self._registrar = registrar

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @property
    def pinned_bytes(self) -> int:
        """Bytes this buffer has page-locked itself."""
        return sum(b - a for (a, b), s in zip(self.chunks, self._state) if s == _PINNED)

    def _target(self) -> tuple[Registrar, int] | None:
        registrar = self._registrar or cuda_host_register.driver()
        if registrar is None:
            return None
        if self._device_index is not None:
            return registrar, self._device_index
        return registrar, torch.cuda.current_device() if torch.cuda.is_available() else 0

    def pin_chunk(self, i: int) -> bool:
        """Page-lock chunk ``i``; False (and the chunk stays as it is: slower copies, same result) on failure.

        A chunk is tried once: a second call (another thread, a later ``pin``) returns
        the first call's outcome without registering the range again.
        """
        with self._lock:
            if self._state[i] != _PAGEABLE:
                return self._state[i] == _PINNED
            self._state[i] = _PINNING
        state = self._register(i)
        with self._lock:
            self._state[i] = state
        return state == _PINNED

    def _register(self, i: int) -> int:
        a, b = self.chunks[i]
        if b <= a:
            return _PINNED
        target = self._target()
        if target is None or self._mapping is None:
            return _FAILED
        registrar, device_index = target
        ptr = self.tensor.data_ptr() + a
        res = registrar.register(ptr, b - a, device_index)
        if res.ok:
            self._mapping.add(ptr, b - a, device_index, registrar)
            return _PINNED
        if res.code == HOST_MEMORY_ALREADY_REGISTERED:
            logger.warning(
                "could not pin %s at %.2f GiB: %s. Part of this freshly mapped chunk is still registered from "
                "memory this process freed without unregistering it; the chunk is left to that registration "
                "and never unregistered here",
                self.key, a / GiB, res,
            )
            return _FOREIGN
        logger.warning("could not pin %s at %.2f GiB (%.2f GiB): %s; that chunk stays pageable",
                       self.key, a / GiB, (b - a) / GiB, res)
        return _FAILED

    def pin(self) -> None:
        """Page-lock every chunk not yet locked (stops at the first failure but a foreign registration)."""
        if self._target() is None:
            logger.warning("could not pin %s (no CUDA); using pageable memory", self.key)
            return
        for i in range(len(self.chunks)):
            if not self.pin_chunk(i) and self._state[i] == _FAILED:
                return

    def release(self) -> None:
        """Unregister every chunk now (a failed load, ``ModelManager.close``); the memory stays, pageable.

        Waits for the device first: a copy still reading a chunk must not lose its
        page-locking in flight.
        """
        if self._mapping is None or not self._mapping.registrations:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(self._device_index)
        self._mapping.unregister_all(self.key)
        with self._lock:
            self._state = [_PAGEABLE if s == _PINNED else s for s in self._state]

    def copy_from(self, flat: torch.Tensor) -> None:
        """Device → host, one asynchronous copy per chunk."""
        for a, b in self.chunks:
            self.tensor[a:b].copy_(flat[a:b], non_blocking=True)

    def copy_to(self, flat: torch.Tensor) -> None:
        """Host → device, one asynchronous copy per chunk."""
        for a, b in self.chunks:
            flat[a:b].copy_(self.tensor[a:b], non_blocking=True)
