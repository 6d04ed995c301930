"""Reading weights from files into one flat buffer per component, in parallel, pinning as it goes.

A component's tensors (parameters and buffers, one slot per tied tensor) are laid out
back to back, 256-byte aligned, in one flat byte buffer: the :class:`Layout`. Its
tensors are views into that buffer, which is what makes a park or a restore one copy.

:func:`fill` reads every tensor's :class:`~storystudio.models.weight_files.FileSpan`
with ``os.preadv`` from a pool of threads, in blocks of ≤ 16 MiB so that one large
tensor is read by many threads (a network volume answers many requests in flight
faster than one; the page cache is copied by several cores). Blocks are grouped in
chunks; as soon as a chunk is complete it is

* page-locked (host mode: the chunk belongs to the component's parking buffer in host
  RAM, registered with ``cudaHostRegister`` while the other chunks are still being read),
* copied to the flat device buffer (asynchronously, while later chunks are read).

Without a host buffer (the component is re-read from disk when it comes back, or no
parking is planned at all), chunks go through a small :class:`StagingRing` of
page-locked slots instead, so host memory stays bounded. On CPU the "device" buffer
is host memory and the same path fills it directly.

A stored dtype different from the slot's (Z-Image's transformer is float32 on disk
and runs in bf16) is converted block by block in the reading thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from storystudio.models.host_memory import HostBuffer, plan_chunks
from storystudio.models.weight_files import FileSpan, InMemory, LoadPlan, TensorSource

logger = logging.getLogger(__name__)

GiB = 1024**3
ALIGN = 256  # byte alignment of every tensor inside a flat buffer (any dtype view is legal)
READ_THREADS = 16
BLOCK_BYTES = 16 * 1024**2
RING_SLOTS = 4
RING_SLOT_BYTES = 64 * 1024**2


@dataclass
class Slot:
    """One tensor's place inside its component's flat buffer."""

    name: str
    tensor: torch.Tensor  # the Parameter or buffer object itself; its .data is re-pointed
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


class Layout:
    """Every parameter and buffer of a module, packed into one flat byte range (``meta`` tensors allowed).

    ``seen`` is shared by the components of one set: a tensor already laid out by an
    earlier component (or tied within this one) is not laid out twice.
    """

    def __init__(self, module: nn.Module, seen: set[int] | None = None) -> None:
        self.slots: list[Slot] = []
        seen = set() if seen is None else seen
        offset = 0
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if id(t) in seen:  # tied weights: one slot, every name follows it
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            self.slots.append(Slot(name, t, offset, nbytes, t.dtype, t.shape))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = offset

    def ranges(self) -> list[tuple[int, int]]:
        return [(s.offset, s.offset + s.nbytes) for s in self.slots]

    def host_chunks(self) -> list[tuple[int, int]]:
        """Registration chunks of a host buffer: on tensor boundaries, ~256 MiB each."""
        return plan_chunks(self.ranges(), self.nbytes)

    @staticmethod
    def view(flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        if slot.nbytes == 0:
            return torch.empty(slot.shape, dtype=slot.dtype, device=flat.device)
        return flat[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)

    def point(self, flat: torch.Tensor) -> None:
        """Make every tensor a view into ``flat`` (host or device)."""
        for slot in self.slots:
            _repoint(slot.tensor, self.view(flat, slot))

    def drop(self) -> None:
        """Release the weights: every tensor becomes ``meta`` (re-read from disk on restore)."""
        for slot in self.slots:
            _repoint(slot.tensor, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))

    def complete(self, sources: Mapping[str, TensorSource]) -> dict[str, TensorSource]:
        """``sources`` plus the tensors the module already holds (buffers its ``__init__`` computed).

        Those are snapshotted as :class:`InMemory` sources now, before the layout
        re-points them, so a component can be re-read from disk later.
        """
        out = dict(sources)
        for slot in self.slots:
            if slot.name in out:
                continue
            if slot.tensor.is_meta:
                raise ValueError(f"tensor {slot.name} has no source and no data")
            out[slot.name] = InMemory(slot.tensor.detach().to("cpu"))
        return out


def _repoint(t: torch.Tensor, new: torch.Tensor) -> None:
    """Make tensor object ``t`` hold ``new``'s data, keeping its identity (engines and tied modules hold it).

    ``t.data = new`` does that between CPU and CUDA tensors, but torch refuses it
    between ``meta`` and real tensors; those are swapped in place instead.
    """
    if t.is_meta == new.is_meta:
        t.data = new
        return
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    torch.utils.swap_tensors(t, new)


@dataclass
class FillStats:
    file_bytes: int = 0
    seconds: float = 0.0
    pinned_bytes: int = 0

    @property
    def gbps(self) -> float:
        return self.file_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Piece:
    slot: Slot
    src: TensorSource
    e0: int  # element range of the tensor this piece covers
    e1: int

    @property
    def dst(self) -> int:
        return self.slot.offset + self.e0 * self.slot.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return (self.e1 - self.e0) * self.slot.dtype.itemsize


def _plan_pieces(
    layout: Layout, sources: Mapping[str, TensorSource], chunks: list[tuple[int, int]], block: int
) -> list[list[_Piece]]:
    """Split every tensor into pieces of ≤ ``block`` bytes that never cross a chunk boundary."""
    per_chunk: list[list[_Piece]] = [[] for _ in chunks]
    ci = 0
    for slot in layout.slots:
        if slot.nbytes == 0:
            continue
        src = sources[slot.name]
        item = slot.dtype.itemsize
        start, end = slot.offset, slot.offset + slot.nbytes
        while chunks[ci][1] <= start:
            ci += 1
        pos, k = start, ci
        step = max(item, block - block % item)  # pieces hold whole elements
        while pos < end:
            stop = min(end, chunks[k][1], pos + step)
            per_chunk[k].append(_Piece(slot, src, (pos - slot.offset) // item, (stop - slot.offset) // item))
            pos = stop
            if pos >= chunks[k][1]:
                k += 1
    return per_chunk


class _Files:
    """Read-only descriptors shared by the reading threads (``pread`` is position-free)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _pread_into(fd: int, dst: torch.Tensor, offset: int, path: Path) -> None:
    view = memoryview(dst.numpy())
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset}")
        view = view[n:]
        offset += n


_scratch = threading.local()


def _scratch_bytes(n: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(max(n, BLOCK_BYTES), dtype=torch.uint8)
    return buf[:n]


def _fill_piece(piece: _Piece, dst: torch.Tensor, files: _Files) -> int:
    """Write one piece's bytes into ``dst`` (uint8, exactly ``piece.nbytes``); returns file bytes read."""
    src, dtype = piece.src, piece.slot.dtype
    if isinstance(src, FileSpan):
        item = src.dtype.itemsize
        offset, n = src.offset + piece.e0 * item, (piece.e1 - piece.e0) * item
        fd = files.fd(src.path)
        if src.dtype == dtype:
            _pread_into(fd, dst, offset, src.path)
        else:
            tmp = _scratch_bytes(n)
            _pread_into(fd, tmp, offset, src.path)
            dst.view(dtype).copy_(tmp.view(src.dtype))
        return n
    dst.view(dtype).copy_(src.tensor.reshape(-1)[piece.e0 : piece.e1])
    return 0


class StagingRing:
    """A few page-locked slots that stream a component to the device without a full host copy."""

    def __init__(self, *, slots: int = RING_SLOTS, slot_bytes: int = RING_SLOT_BYTES, pin: bool = True,
                 device: torch.device | None = None) -> None:
        self.slot_bytes = slot_bytes
        chunks = [(i * slot_bytes, (i + 1) * slot_bytes) for i in range(slots)]
        self.buffer = HostBuffer("staging", slots * slot_bytes, chunks, device=device)
        if pin:
            self.buffer.pin()
        self._events: list[torch.cuda.Event | None] = [None] * slots

    @property
    def slots(self) -> int:
        return len(self._events)

    def slot(self, i: int) -> torch.Tensor:
        """Slot ``i``, once the copy that last read it has finished."""
        ev = self._events[i]
        if ev is not None:
            ev.synchronize()
            self._events[i] = None
        return self.buffer.tensor[i * self.slot_bytes : (i + 1) * self.slot_bytes]

    def copied(self, i: int, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
            self._events[i] = ev


def _execute(
    pieces: list[list[_Piece]],
    dest: Callable[[int], tuple[torch.Tensor, int]],
    on_done: Callable[[int], None],
    consume: Callable[[int], None],
    *,
    threads: int,
    window: int | None,
) -> int:
    """Fill chunks with a thread pool; ``on_done(ci)`` runs in the thread that completes chunk ``ci``,
    ``consume(ci)`` in this thread, in chunk order. ``window`` bounds chunks in flight (ring slots)."""
    n = len(pieces)
    done = [threading.Event() for _ in range(n)]
    remaining = [len(p) for p in pieces]
    errors: list[BaseException] = []
    lock = threading.Lock()
    read = [0]
    files = _Files()

    def finish(ci: int) -> None:
        if not errors:
            try:
                on_done(ci)
            except BaseException as exc:  # noqa: BLE001 - reported by the consuming thread
                errors.append(exc)
        done[ci].set()

    def work(ci: int, piece: _Piece, buf: torch.Tensor, base: int) -> None:
        got = 0
        try:
            if not errors:
                a = piece.dst - base
                got = _fill_piece(piece, buf[a : a + piece.nbytes], files)
        except BaseException as exc:  # noqa: BLE001 - reported by the consuming thread
            errors.append(exc)
        with lock:
            read[0] += got
            remaining[ci] -= 1
            last = remaining[ci] == 0
        if last:
            finish(ci)

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="weights") as pool:

            def submit(ci: int) -> None:
                buf, base = dest(ci)
                if not pieces[ci]:
                    finish(ci)
                for piece in pieces[ci]:
                    pool.submit(work, ci, piece, buf, base)

            ahead = n if window is None else min(n, window)
            for ci in range(ahead):
                submit(ci)
            for ci in range(n):
                done[ci].wait()
                if errors:
                    break
                consume(ci)
                if ci + ahead < n:
                    submit(ci + ahead)
        # leaving the pool waits for submitted work, which skips its read once an error is recorded
    finally:
        files.close()
    if errors:
        raise errors[0]
    return read[0]


def fill(
    layout: Layout,
    sources: Mapping[str, TensorSource],
    device_flat: torch.Tensor,
    *,
    host: HostBuffer | None = None,
    pin: bool = False,
    ring: StagingRing | None = None,
    threads: int = READ_THREADS,
    block_bytes: int = BLOCK_BYTES,
) -> FillStats:
    """Read every slot of ``layout`` from ``sources`` and leave the bytes in ``device_flat``.

    * ``host`` given: the bytes land in the host buffer first (each chunk pinned when
      ``pin``), then each chunk is copied to ``device_flat`` (skipped when they are the same).
    * ``ring`` given, or ``device_flat`` on a GPU: through the ring's slots (a temporary
      pageable ring if None), bounded host memory;
    * otherwise (``device_flat`` on CPU): read straight into it.

    ``sources`` must cover every slot (see :meth:`Layout.complete`). Copies are
    asynchronous: synchronize the device before reading the result.
    """
    t0 = time.perf_counter()
    device = device_flat.device
    stats = FillStats()
    if host is not None:
        chunks = host.chunks
        pieces = _plan_pieces(layout, sources, chunks, block_bytes)
        same = host.tensor is device_flat

        def on_done(ci: int) -> None:
            if pin:
                host.pin_chunk(ci)

        def consume(ci: int) -> None:
            if not same:
                a, b = chunks[ci]
                device_flat[a:b].copy_(host.tensor[a:b], non_blocking=True)

        stats.file_bytes = _execute(
            pieces, lambda ci: (host.tensor, 0), on_done, consume, threads=threads, window=None
        )
        stats.pinned_bytes = host.pinned_bytes
    elif ring is None and device.type == "cpu":
        chunks = [(0, layout.nbytes)]
        pieces = _plan_pieces(layout, sources, chunks, block_bytes)
        stats.file_bytes = _execute(
            pieces, lambda ci: (device_flat, 0), lambda ci: None, lambda ci: None, threads=threads, window=None
        )
    else:
        ring = ring or StagingRing(pin=False)
        step = ring.slot_bytes
        chunks = [(a, min(a + step, layout.nbytes)) for a in range(0, max(layout.nbytes, 1), step)]
        pieces = _plan_pieces(layout, sources, chunks, block_bytes)

        def dest(ci: int) -> tuple[torch.Tensor, int]:
            return ring.slot(ci % ring.slots), chunks[ci][0]

        def consume(ci: int) -> None:
            a, b = chunks[ci]
            slot = ring.buffer.tensor[(ci % ring.slots) * step :][: b - a]
            device_flat[a:b].copy_(slot, non_blocking=True)
            ring.copied(ci % ring.slots, device)

        stats.file_bytes = _execute(pieces, dest, lambda ci: None, consume, threads=threads, window=ring.slots)
    stats.seconds = time.perf_counter() - t0
    return stats


def materialize(plan: LoadPlan, device: torch.device, *, threads: int = READ_THREADS) -> object:
    """Read a plan's weights onto ``device`` without a ModelManager (``from_pretrained``, tests, tools).

    The same reader as the manager's; each component ends as views into one flat
    device buffer. Components the plan has no sources for are left as they are.
    """
    ring = StagingRing(pin=False) if device.type == "cuda" else None
    by_tensor = plan.by_tensor()
    seen: set[int] = set()
    for module in plan.engine.components().values():
        layout = Layout(module, seen)
        sources = {s.name: by_tensor[id(s.tensor)] for s in layout.slots if id(s.tensor) in by_tensor}
        if not sources:
            continue
        flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        fill(layout, layout.complete(sources), flat, ring=ring, threads=threads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        layout.point(flat)
    return plan.engine


def drop_page_cache(paths: list[Path]) -> None:
    """Evict files from the page cache (``POSIX_FADV_DONTNEED``): the next read comes from the disk.

    Only clean pages are dropped, which read-only weight files always are. Used by
    the cold-start benchmark and its tests.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
