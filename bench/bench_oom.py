"""An out-of-memory job that succeeds on its retry: the ModelManager's OOM path on a real GPU.

Scenario (issue 13): both model sets are resident, and a job on the video set needs more
activation memory than is free (its estimate was too low, so nothing was parked before
it). Its first attempt allocates half of its activations, then runs out of memory. The
manager must leave the ``except`` block (freeing the failed attempt's frames and their
tensors), park the image set, and retry: the retry needs ``free + image_set / 2`` bytes,
which fit only once the image set is parked *and* the first attempt's half is freed.

The sets are synthetic bf16 blocks of the real component sizes by default (Wan2.2-S2V
42.6 GiB, Z-Image-Turbo 19.1 GiB, as ``bench_swap.py``), or the real checkpoints with
``--zimage-dir``/``--wan-dir``; the job's activations are synthetic in both cases (this
measures the manager, not a generation). The image set's weights are compared bit for
bit after it is restored.

GPU:  python bench/bench_oom.py                      (writes bench/results/<date>-<gpu>-oom.json)
      python bench/bench_oom.py --zimage-dir /models/Z-Image-Turbo --wan-dir /models/Wan2.2-S2V-14B
CPU:  python bench/bench_oom.py --device cpu --out /tmp/oom.json
      (simulated: a fake device of 80 MiB and sets of 1/1024 the size; the manager's
      measured-free-memory hook reads the simulated device, and allocations past it raise
      torch.OutOfMemoryError; a smoke test of the same code path, no GPU figures)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.errors import GenerationError  # noqa: E402
from storystudio.models.model_manager import GiB, ModelManager, measured_free_bytes  # noqa: E402

log = logging.getLogger("bench_oom")
WAN_GIB = {"transformer": 30.35, "text_encoder": 10.58, "vae": 0.47, "audio_encoder": 1.18}
ZIMAGE_GIB = {"transformer": 11.46, "text_encoder": 7.49, "vae": 0.16}
BLOCK = 256 * 1024**2  # bytes per synthetic parameter tensor (CUDA)
SIM_SCALE = 1024  # the simulated CPU device: sizes in MiB instead of GiB
SIM_CAPACITY = 80 * 1024**2


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([AHBL]\d{2,3}S?)\b", name.upper())
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Synthetic:
    """A set of components of given sizes; seeded values so a round trip can be compared bit for bit."""

    def __init__(self, sizes_bytes: dict[str, int], device: torch.device, seed: int, block: int) -> None:
        self.mods: dict[str, nn.Module] = {}
        g = torch.Generator(device=device).manual_seed(seed)
        for name, n in sizes_bytes.items():
            m = nn.Module()
            left, i = n, 0
            while left > 0:
                elems = max(1, min(block, left) // 2)
                t = torch.randn(elems, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)
                m.register_parameter(f"w{i}", nn.Parameter(t, requires_grad=False))
                left -= elems * 2
                i += 1
            self.mods[name] = m

    def components(self) -> dict[str, nn.Module]:
        return self.mods


def checksum(engine: Any) -> list[float]:
    return [float(p.double().sum()) for m in engine.components().values() for p in m.parameters()]


class SimulatedDevice:
    """CPU smoke mode: a device of ``capacity`` bytes holding the manager's resident weights and live activations."""

    def __init__(self, capacity: int, sizes: dict[str, int]) -> None:
        self.capacity = capacity
        self.sizes = sizes  # "set.component" -> bytes
        self.manager: ModelManager | None = None
        self._live: dict[int, int] = {}

    def used(self) -> int:
        assert self.manager is not None
        weights = sum(self.sizes[k] for k, on in self.manager.component_residency().items() if on)
        return weights + sum(self._live.values())

    def free(self, _device: torch.device | None = None) -> int:
        return self.capacity - self.used()

    def alloc(self, nbytes: int) -> object:
        if nbytes > self.free():
            raise torch.OutOfMemoryError(
                f"simulated: tried to allocate {nbytes / 2**20:.1f} MiB, {self.free() / 2**20:.1f} MiB free")
        token = type("Activation", (), {})()
        self._live[id(token)] = nbytes
        weakref.finalize(token, self._live.pop, id(token), None)
        return token


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device == "cuda"
    dev = torch.device(args.device)
    sim: SimulatedDevice | None = None
    unit = GiB if cuda else GiB // SIM_SCALE
    sizes = {f"video.{k}": int(v * unit) for k, v in WAN_GIB.items()} | {
        f"image.{k}": int(v * unit) for k, v in ZIMAGE_GIB.items()}
    if cuda:
        torch.cuda.empty_cache()
        mgr = ModelManager(dev, budget_gib=100_000, reserve_gib=args.reserve_gib)  # bookkeeping never parks
    else:
        sim = SimulatedDevice(SIM_CAPACITY, sizes)
        mgr = ModelManager(dev, free_memory=sim.free, reserve_gib=args.reserve_gib / SIM_SCALE)
        sim.manager = mgr
    real = bool(args.zimage_dir and args.wan_dir)
    if real:
        from dataclasses import replace

        from storystudio.config import WorkerSettings
        from storystudio.worker import build_manager

        settings = replace(WorkerSettings.from_env(), device=args.device, zimage_dir=args.zimage_dir,
                           wan_dir=args.wan_dir, vram_budget_gib=100_000, vram_reserve_gib=args.reserve_gib)
        mgr = build_manager(settings)
    else:
        block = BLOCK if cuda else BLOCK // SIM_SCALE
        for name, seed in (("video", 1), ("image", 2)):
            comp = {k.split(".", 1)[1]: v for k, v in sizes.items() if k.startswith(name + ".")}
            mgr.register(name, lambda d, c=comp, s=seed: Synthetic(c, d, s, block))
    t0 = time.perf_counter()
    image = mgr.ensure("image")
    video = mgr.ensure("video")
    load_s = time.perf_counter() - t0
    image_sum = checksum(image)
    set_bytes = {"image": nbytes(image), "video": nbytes(video)}
    free_both = measured_free_bytes(dev) if cuda else sim.free()  # type: ignore[union-attr]
    need = free_both + set_bytes["image"] // 2  # fits only once the image set is parked
    half = need // 2
    attempts: list[str] = []

    def job(engine: Any) -> str:
        attempts.append("started")
        first = alloc(half)  # a local of this frame: freed only when the failed attempt's frame is
        second = alloc(need - half)
        del first, second
        return "ok"

    alloc: Callable[[int], object]
    if cuda:
        def alloc(n: int) -> object:
            t = torch.empty(n, dtype=torch.uint8, device=dev)
            t.fill_(1)
            return t
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        alloc = sim.alloc  # type: ignore[union-attr]
    t1 = time.perf_counter()
    error = None
    try:
        mgr.run("video", job)
        ok = True
    except GenerationError as exc:
        ok, error = False, f"{exc.code}: {exc.message}"
    job_s = time.perf_counter() - t1
    residency_after = mgr.component_residency()
    stats = mgr.stats()
    mgr.ensure("image")
    intact = checksum(mgr.ensure("image")) == image_sum
    report: dict[str, Any] = {
        "bench": "oom",
        "date": dt.date.today().isoformat(),
        "mode": "cuda" if cuda else "simulated-cpu",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else f"simulated {SIM_CAPACITY / 2**20:.0f} MiB device",
        "torch": torch.__version__,
        "sets": "checkpoints" if real else "synthetic",
        "retry_succeeded": ok,
        "error": error,
        "attempts": len(attempts),
        "oom_retries": stats.oom_retries,
        "image_set_parked_for_retry": not any(v for k, v in residency_after.items() if k.startswith("image.")),
        "image_weights_identical_after_restore": intact,
        "unit": "GiB" if cuda else "MiB (simulated)",
        "total": (torch.cuda.mem_get_info(dev)[1] if cuda else SIM_CAPACITY) / unit,
        "image_set": set_bytes["image"] / unit,
        "video_set": set_bytes["video"] / unit,
        "free_with_both_sets": free_both / unit,
        "job_activations": need / unit,
        "peak_allocated": (torch.cuda.max_memory_allocated(dev) / unit) if cuda else None,
        "load_seconds": round(load_s, 3),
        "job_seconds_with_retry": round(job_s, 3),
        "swap_seconds": round(stats.swap_seconds, 3),
    }
    return report


def nbytes(engine: Any) -> int:
    return sum(t.numel() * t.element_size() for m in engine.components().values()
               for t in [*m.parameters(), *m.buffers()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--zimage-dir", type=Path, help="real Z-Image-Turbo folder (with --wan-dir)")
    ap.add_argument("--wan-dir", type=Path, help="real Wan2.2-S2V-14B folder (with --zimage-dir)")
    ap.add_argument("--reserve-gib", type=float, default=0.5, help="the manager's VRAM reserve")
    ap.add_argument("--out", type=Path, help="JSON file; default bench/results/<date>-<gpu>-oom.json (cuda)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the simulated smoke run")
    if (args.zimage_dir or args.wan_dir) and (args.device != "cuda" or not (args.zimage_dir and args.wan_dir)):
        raise SystemExit("--zimage-dir and --wan-dir go together, on --device cuda")
    report = run(args)
    unit = report["unit"]
    rows = [("device", report["device_name"]), ("mode / sets", f"{report['mode']} / {report['sets']}"),
            (f"total ({unit})", f"{report['total']:.2f}"), (f"image set ({unit})", f"{report['image_set']:.2f}"),
            (f"video set ({unit})", f"{report['video_set']:.2f}"),
            (f"free with both sets ({unit})", f"{report['free_with_both_sets']:.2f}"),
            (f"job activations ({unit})", f"{report['job_activations']:.2f}"),
            ("attempts / oom_retries", f"{report['attempts']} / {report['oom_retries']}"),
            ("image set parked for the retry", report["image_set_parked_for_retry"]),
            ("image weights identical after restore", report["image_weights_identical_after_restore"]),
            ("job seconds (with retry)", report["job_seconds_with_retry"]),
            ("retry_succeeded", report["retry_succeeded"])]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if report["error"]:
        print("error:", report["error"])
    out = args.out
    if out is None:
        tag = gpu_slug(report["device_name"]) if args.device == "cuda" else "cpu"
        out = Path("bench/results") / f"{report['date']}-{tag}-oom.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not report["retry_succeeded"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
