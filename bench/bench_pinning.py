"""Host↔GPU copy speed through :class:`storystudio.models.host_memory.HostBuffer`.

Checks that memory page-locked chunk by chunk with ``cudaHostRegister`` is seen as
pinned by torch and copies at full PCIe speed (the ModelManager's swap cost is
bytes / this rate). GPU only: ``python bench/bench_pinning.py [GiB]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.models.host_memory import HostBuffer, plan_chunks  # noqa: E402


def main() -> None:
    n = int(float(sys.argv[1]) if len(sys.argv) > 1 else 4) << 30
    hb = HostBuffer("check", n, plan_chunks([(0, n)], n))
    t = time.perf_counter()
    hb.pin()
    print(f"| pin {n >> 30} GiB | {time.perf_counter() - t:.2f} s | is_pinned={hb.tensor.is_pinned()} |")
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    for name, fn in (("host→GPU", lambda: hb.copy_to(dev)), ("GPU→host", lambda: hb.copy_from(dev))):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(f"| {name} | {n / (time.perf_counter() - t) / 1e9:.1f} GB/s | |")


if __name__ == "__main__":
    main()
