"""How much host memory this process may still lock: the container's limit and the host's free memory.

Page-locked (pinned) memory cannot be swapped or reclaimed, so the ModelManager asks
here before it gives a model component a parking buffer in host RAM. Two limits
apply, and the smaller one wins:

* the host's ``MemAvailable`` (``/proc/meminfo``): what the kernel could hand out
  without swapping, page cache included;
* the container's memory limit: cgroup v2 ``/sys/fs/cgroup/memory.max`` (usage
  ``memory.current``), or cgroup v1 ``/sys/fs/cgroup/memory/memory.limit_in_bytes``
  (usage ``memory.usage_in_bytes``). The kernel's OOM killer acts on this limit, not
  on the host's free memory: a RunPod worker whose pod is limited to 62 GiB on a
  2 TB host is killed as soon as it crosses 62 GiB. Usage counts the reclaimable
  page cache (``inactive_file``), which is subtracted, as the kubelet does for its
  "working set".

Everything is read from files under ``root`` (``/`` in production), so tests lay out
fake ``/proc`` and ``/sys`` trees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GiB = 1024**3
# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above
# this is treated as unlimited.
_UNLIMITED_ABOVE = 1 << 60


@dataclass(frozen=True)
class HostMemory:
    """One reading of the host's and the container's memory, in bytes."""

    mem_total: int | None  # /proc/meminfo MemTotal
    mem_available: int | None  # /proc/meminfo MemAvailable
    cgroup_version: int | None  # 1, 2, or None when no memory controller was found
    cgroup_limit: int | None  # None: unlimited or unknown
    cgroup_usage: int | None  # working set: usage minus inactive page cache

    @property
    def cgroup_room(self) -> int | None:
        """Bytes the container may still allocate before its limit (None: no limit)."""
        if self.cgroup_limit is None:
            return None
        return max(0, self.cgroup_limit - (self.cgroup_usage or 0))

    def available(self) -> int | None:
        """Bytes that can still be allocated: the smaller of the host's and the container's room.

        ``None`` when neither could be read (not Linux): the caller then trusts allocation.
        """
        rooms = [r for r in (self.mem_available, self.cgroup_room) if r is not None]
        return min(rooms) if rooms else None

    def describe(self) -> str:
        def gib(v: int | None) -> str:
            return "unknown" if v is None else f"{v / GiB:.1f} GiB"

        limit = "none" if self.cgroup_limit is None else gib(self.cgroup_limit)
        return (
            f"MemAvailable {gib(self.mem_available)} of {gib(self.mem_total)}, "
            f"cgroup v{self.cgroup_version or '?'} limit {limit}, working set {gib(self.cgroup_usage)}"
        )


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    if raw == "max":
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return None if value >= _UNLIMITED_ABOVE else value


def _read_kv(path: Path) -> dict[str, int]:
    """``key value`` lines (memory.stat) or ``Key:   value kB`` lines (meminfo), in bytes for kB."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) < 2:
            continue
        try:
            value = int(parts[1])
        except ValueError:
            continue
        if len(parts) > 2 and parts[2].lower() == "kb":
            value *= 1024
        out[parts[0]] = value
    return out


def read_meminfo(root: Path = Path("/")) -> tuple[int | None, int | None]:
    """``(MemTotal, MemAvailable)`` in bytes from ``/proc/meminfo``."""
    info = _read_kv(root / "proc" / "meminfo")
    return info.get("MemTotal"), info.get("MemAvailable")


def read_cgroup(root: Path = Path("/")) -> tuple[int | None, int | None, int | None]:
    """``(version, limit, working set)`` of this process's memory cgroup.

    v2 is read at ``/sys/fs/cgroup`` (the container's own cgroup namespace root),
    v1 at ``/sys/fs/cgroup/memory``. A hybrid host that has both reports v2 when
    ``memory.max`` exists.
    """
    v2 = root / "sys" / "fs" / "cgroup"
    if (v2 / "memory.max").is_file():
        limit = _read_int(v2 / "memory.max")
        usage = _read_int(v2 / "memory.current")
        stat = _read_kv(v2 / "memory.stat")
        if usage is not None:
            usage = max(0, usage - stat.get("inactive_file", 0))
        return 2, limit, usage
    v1 = v2 / "memory"
    if (v1 / "memory.limit_in_bytes").is_file():
        limit = _read_int(v1 / "memory.limit_in_bytes")
        usage = _read_int(v1 / "memory.usage_in_bytes")
        stat = _read_kv(v1 / "memory.stat")
        if usage is not None:
            usage = max(0, usage - stat.get("total_inactive_file", stat.get("inactive_file", 0)))
        return 1, limit, usage
    return None, None, None


def read_host_memory(root: Path = Path("/")) -> HostMemory:
    total, available = read_meminfo(root)
    version, limit, usage = read_cgroup(root)
    return HostMemory(
        mem_total=total, mem_available=available, cgroup_version=version, cgroup_limit=limit, cgroup_usage=usage
    )
