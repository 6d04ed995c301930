"""Host buffers for parked weights, page-locked chunk by chunk.

A buffer is ordinary memory of the exact size, made page-locked with
``cudaHostRegister`` one chunk (~256 MiB, on tensor boundaries) at a time, and every
copy is issued per chunk so it never crosses two registrations. Why not
``torch.empty(n, pin_memory=True)``: PyTorch's pinned allocator rounds every block up
to a power of two (a 10.6 GiB T5 would lock 16 GiB of RAM), and one ``cudaHostAlloc``
of the 30 GiB Wan DiT took 16.8 s on the H100 host while holding the CUDA driver.

When to pin is the ModelManager's decision: it pins a component's buffer
synchronously, at that component's first park (see ``ModelManager._host_buffer``),
because pinning in the background during a job stalled the GPU just as badly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

GiB = 1024**3
CHUNK_BYTES = 256 * 1024**2


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


class HostBuffer:
    """One component's flat host copy; page-locked chunk by chunk when CUDA is there."""

    def __init__(self, key: str, nbytes: int, chunks: list[tuple[int, int]]) -> None:
        self.key = key
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.chunks = chunks
        self.pinned_chunks = 0

    def pin(self) -> None:
        """Page-lock every chunk; on any failure stay (partly) pageable: slower, still correct."""
        t0 = time.perf_counter()
        try:
            cudart = torch.cuda.cudart()
        except (AssertionError, RuntimeError) as exc:
            logger.warning("could not pin %s (%s); using pageable memory", self.key, exc)
            return
        base = self.tensor.data_ptr()
        for a, b in self.chunks[self.pinned_chunks :]:
            err = cudart.cudaHostRegister(base + a, b - a, 0)
            if int(err) != 0:
                logger.warning(
                    "could not pin %s beyond %.2f GiB (cudaHostRegister error %s); the rest stays pageable",
                    self.key,
                    a / GiB,
                    err,
                )
                return
            self.pinned_chunks += 1
        logger.info(
            "pinned host buffer for %s: %.2f GiB in %d chunks, %.2f s",
            self.key,
            self.tensor.numel() / GiB,
            len(self.chunks),
            time.perf_counter() - t0,
        )

    def copy_from(self, flat: torch.Tensor) -> None:
        """Device → host, one asynchronous copy per chunk."""
        for a, b in self.chunks:
            self.tensor[a:b].copy_(flat[a:b], non_blocking=True)

    def copy_to(self, flat: torch.Tensor) -> None:
        """Host → device, one asynchronous copy per chunk."""
        for a, b in self.chunks:
            flat[a:b].copy_(self.tensor[a:b], non_blocking=True)
