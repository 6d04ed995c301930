"""Reading the container's memory limit and the host's free memory from fake /proc and /sys trees."""

from __future__ import annotations

from pathlib import Path

from storystudio.models.host_limits import GiB, read_host_memory

MiB = 1024**2


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


MEMINFO = "MemTotal:       131072000 kB\nMemFree:          1000000 kB\nMemAvailable:   100000000 kB\n"


def test_cgroup_v2_limit_and_working_set(tmp_path):
    root = tree(tmp_path, {
        "proc/meminfo": MEMINFO,
        "sys/fs/cgroup/memory.max": f"{64 * GiB}\n",
        "sys/fs/cgroup/memory.current": f"{20 * GiB}\n",
        "sys/fs/cgroup/memory.stat": f"anon {12 * GiB}\nfile {8 * GiB}\ninactive_file {6 * GiB}\n",
    })
    hm = read_host_memory(root)
    assert (hm.mem_total, hm.mem_available) == (131072000 * 1024, 100000000 * 1024)
    assert hm.cgroup_version == 2 and hm.cgroup_limit == 64 * GiB
    assert hm.cgroup_usage == 14 * GiB, "reclaimable page cache is not counted"
    assert hm.cgroup_room == 50 * GiB
    assert hm.available() == 50 * GiB, "the container's room is smaller than the host's MemAvailable"
    assert "limit 64.0 GiB" in hm.describe() and "working set 14.0 GiB" in hm.describe()


def test_cgroup_v2_without_a_limit_falls_back_to_mem_available(tmp_path):
    root = tree(tmp_path, {"proc/meminfo": MEMINFO, "sys/fs/cgroup/memory.max": "max\n",
                           "sys/fs/cgroup/memory.current": "123\n"})
    hm = read_host_memory(root)
    assert hm.cgroup_version == 2 and hm.cgroup_limit is None and hm.cgroup_room is None
    assert hm.available() == 100000000 * 1024


def test_cgroup_v1_limit_and_its_unlimited_sentinel(tmp_path):
    v1 = "sys/fs/cgroup/memory/"
    root = tree(tmp_path / "a", {
        "proc/meminfo": MEMINFO,
        v1 + "memory.limit_in_bytes": f"{32 * GiB}\n",
        v1 + "memory.usage_in_bytes": f"{10 * GiB}\n",
        v1 + "memory.stat": f"cache {5 * GiB}\ntotal_inactive_file {4 * GiB}\n",
    })
    hm = read_host_memory(root)
    assert hm.cgroup_version == 1 and hm.cgroup_usage == 6 * GiB and hm.available() == 26 * GiB
    unlimited = tree(tmp_path / "b", {"proc/meminfo": MEMINFO, v1 + "memory.limit_in_bytes": "9223372036854771712\n"})
    hm = read_host_memory(unlimited)
    assert hm.cgroup_limit is None and hm.available() == 100000000 * 1024


def test_a_host_memory_smaller_than_the_limit_wins_and_nothing_readable_means_unknown(tmp_path):
    root = tree(tmp_path / "a", {"proc/meminfo": "MemTotal: 8000 kB\nMemAvailable: 4000 kB\n",
                                 "sys/fs/cgroup/memory.max": f"{64 * GiB}\n", "sys/fs/cgroup/memory.current": "0\n"})
    assert read_host_memory(root).available() == 4000 * 1024
    hm = read_host_memory(tmp_path / "empty")
    assert hm.available() is None and hm.cgroup_version is None
