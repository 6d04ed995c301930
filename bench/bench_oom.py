"""An out-of-memory job that succeeds on its retry: the ModelManager's OOM path on a real GPU.

Scenario (issue 13): both model sets are resident, loaded without any out-of-memory error,
and a job on the video set needs more activation memory than is free (its estimate was too
low, so nothing was parked before it). Its first attempt allocates half of its activations,
then runs out of memory. The manager must leave the ``except`` block (freeing the failed
attempt's frames and their tensors), park the image set, and retry: the job needs
``free + image_set / 2`` bytes, which fit only once the image set is parked *and* the first
attempt's half is freed (measured on an 80 GB H100: 16.8 GiB free beside both sets, a 26.3 GiB
job; the retry has 35.9 GiB, 22.7 GiB if the failed half were still held).

The manager is set up as the worker sets it up: the budget is the card's memory minus the
reserve, and the largest planned video job is registered, so on an 80 GB card parking is
expected and the sets are read into pinned parking buffers while they load. The sets are
synthetic bf16 blocks of the real component sizes by default (Wan2.2-S2V 42.6 GiB,
Z-Image-Turbo 19.1 GiB, as ``bench_swap.py``), handed to the manager the way a checkpoint
is: parameters on ``meta`` and, for each, where its bytes are (a window of one small random
pool in host memory), so the manager alone puts the weights on the device, once. The real
checkpoints are used with ``--zimage-dir``/``--wan-dir``. The job's activations are synthetic
in both cases (this measures the manager, not a generation). The image set's weights are
compared bit for bit after it is restored. The run fails, without running the job, when
loading the two sets did not leave both resident without an out-of-memory retry.

GPU:  python bench/bench_oom.py --out $OUT          (writes $OUT/<date>-<gpu>-oom.json)
      python bench/bench_oom.py                     (writes bench/results/<date>-<gpu>-oom.json)
      python bench/bench_oom.py --zimage-dir /models/Z-Image-Turbo --wan-dir /models/Wan2.2-S2V-14B
CPU:  python bench/bench_oom.py --device cpu --out /tmp/oom.json
      (simulated: a fake device of 80 MiB and sets of 1/1024 the size; the manager's
      measured-free-memory hook reads the simulated device, and device allocations past it,
      the manager's own while loading and restoring and the job's, raise
      torch.OutOfMemoryError; the same sequence as on the GPU, no GPU figures)

``--out`` is a directory (``<out>/<date>-<gpu>-oom.json``) unless it names a ``.json`` file.
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
from storystudio.models.weight_files import InMemory, LoadPlan  # noqa: E402
from storystudio.worker import planned_working_bytes  # noqa: E402

log = logging.getLogger("bench_oom")
WAN_GIB = {"transformer": 30.35, "text_encoder": 10.58, "vae": 0.47, "audio_encoder": 1.18}
ZIMAGE_GIB = {"transformer": 11.46, "text_encoder": 7.49, "vae": 0.16}
LOAD_ORDER = ("video", "image")  # the larger set first: the least host memory in flight while loading
BLOCK = 256 * 1024**2  # bytes per synthetic parameter tensor (CUDA)
SHIFTS = 1 << 16  # distinct windows of the random pool: every parameter holds different bytes
SIM_SCALE = 1024  # the simulated CPU device: sizes in MiB instead of GiB
SIM_CAPACITY_MIB = 80
RESULTS = Path(__file__).resolve().parent / "results"


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([AHBL]\d{2,3}S?)\b", name.upper())
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Synthetic:
    """A model set's engine: named components (modules of bf16 parameters)."""

    def __init__(self, mods: dict[str, nn.Module]) -> None:
        self.mods = mods

    def components(self) -> dict[str, nn.Module]:
        return self.mods


def synthetic_plan(sizes_bytes: dict[str, int], seed: int, block: int) -> LoadPlan:
    """A set of components of the given sizes, as a checkpoint hands it over: weights still to be read.

    Every parameter is on ``meta`` and its source is a window of one random pool in host
    memory (a different window each, so a round trip is checked bit for bit and a misplaced
    chunk shows). Nothing is put on the device here: the manager allocates the weights there
    once. (Building the tensors on the device and letting the manager adopt them held every
    set twice while it loaded: the first H100 run ran out of memory loading the video set.)
    """
    per_param = max(1, block // 2)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(per_param + SHIFTS, generator=g).to(torch.bfloat16)
    mods: dict[str, nn.Module] = {}
    sources: dict[str, dict[str, InMemory]] = {}
    k = 0
    for name, n in sizes_bytes.items():
        m, src = nn.Module(), {}
        left, i = n, 0
        while left > 0:
            elems = max(1, min(block, left) // 2)
            m.register_parameter(f"w{i}", nn.Parameter(torch.empty(elems, dtype=torch.bfloat16, device="meta"),
                                                        requires_grad=False))
            start = (k * 7919) % SHIFTS
            src[f"w{i}"] = InMemory(pool[start : start + elems])
            left -= elems * 2
            i += 1
            k += 1
        mods[name], sources[name] = m, src
    return LoadPlan(Synthetic(mods), sources)


def checksum(engine: Any) -> list[float]:
    return [float(p.sum(dtype=torch.float64)) for m in engine.components().values() for p in m.parameters()]


def nbytes(engine: Any) -> int:
    return sum(t.numel() * t.element_size() for m in engine.components().values()
               for t in [*m.parameters(), *m.buffers()])


class SimulatedDevice:
    """CPU mode: a device of ``capacity`` bytes.

    Every device allocation is counted for as long as its tensor lives and refused past the
    capacity, as CUDA would: the manager's own (:meth:`guard` wraps its device allocator, so
    loading and restoring are counted from the moment a buffer is made, and a failed
    attempt's buffers stay counted until its frames are gone) and the job's (:meth:`alloc`).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: dict[int, int] = {}

    def used(self) -> int:
        return sum(self._live.values())

    def free(self, _device: torch.device | None = None) -> int:
        return self.capacity - self.used()

    def _take(self, obj: object, nbytes: int) -> None:
        self._live[id(obj)] = nbytes
        weakref.finalize(obj, self._live.pop, id(obj), None)

    def _check(self, nbytes: int, what: str) -> None:
        if nbytes > self.free():
            raise torch.OutOfMemoryError(
                f"simulated: {what} tried to allocate {nbytes / 2**20:.2f} MiB, {self.free() / 2**20:.2f} MiB free")

    def guard(self, manager: ModelManager) -> None:
        """Route the manager's device allocations (weights, while loading and restoring) through the capacity."""
        real = manager._alloc_device

        def alloc_device(nbytes: int) -> torch.Tensor:
            self._check(nbytes, "the manager")
            flat = real(nbytes)
            self._take(flat, nbytes)
            return flat

        manager._alloc_device = alloc_device  # type: ignore[method-assign]

    def alloc(self, nbytes: int) -> object:
        self._check(nbytes, "the job")
        token = type("Activation", (), {})()
        self._take(token, nbytes)
        return token


def build(args: argparse.Namespace) -> tuple[ModelManager, SimulatedDevice | None, bool, int]:
    """The manager with both sets registered (nothing loaded), the simulated device, whether real sets, the unit."""
    cuda = args.device == "cuda"
    dev = torch.device(args.device)
    unit = GiB if cuda else GiB // SIM_SCALE
    if args.zimage_dir and args.wan_dir:
        from dataclasses import replace

        from storystudio.config import WorkerSettings
        from storystudio.worker import build_manager

        settings = replace(WorkerSettings.from_env(), device=args.device, zimage_dir=args.zimage_dir,
                           wan_dir=args.wan_dir, vram_budget_gib=None, vram_reserve_gib=args.reserve_gib)
        return build_manager(settings), None, True, unit
    sizes = {f"video.{k}": int(v * unit) for k, v in WAN_GIB.items()} | {
        f"image.{k}": int(v * unit) for k, v in ZIMAGE_GIB.items()}
    planned = planned_working_bytes()
    sim = None
    if cuda:
        torch.cuda.empty_cache()
        mgr = ModelManager(dev, reserve_gib=args.reserve_gib)  # the worker's budget: the card minus the reserve
    else:
        capacity = int(args.sim_capacity_mib * 2**20)
        sim = SimulatedDevice(capacity)
        reserve = args.reserve_gib / SIM_SCALE
        mgr = ModelManager(dev, budget_gib=capacity / GiB - reserve, reserve_gib=reserve, free_memory=sim.free)
        sim.guard(mgr)
    block = BLOCK if cuda else BLOCK // SIM_SCALE
    for name, seed in (("video", 1), ("image", 2)):
        comp = {k.split(".", 1)[1]: v for k, v in sizes.items() if k.startswith(name + ".")}
        mgr.register(name, lambda d, c=comp, s=seed: synthetic_plan(c, s, block), size_hint_bytes=sum(comp.values()),
                     max_working_bytes=planned[name] * unit // GiB)
    return mgr, sim, False, unit


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device == "cuda"
    dev = torch.device(args.device)
    mgr, sim, real, unit = build(args)
    report: dict[str, Any] = {
        "bench": "oom",
        "date": dt.date.today().isoformat(),
        "mode": "cuda" if cuda else "simulated-cpu",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else f"simulated {args.sim_capacity_mib:g} MiB device",
        "torch": torch.__version__,
        "sets": "checkpoints" if real else "synthetic",
        "unit": "GiB" if cuda else "MiB (simulated)",
        "total": (torch.cuda.mem_get_info(dev)[1] if cuda else sim.capacity) / unit,  # type: ignore[union-attr]
        "budget": None if mgr.budget_bytes is None else mgr.budget_bytes / unit,
        "retry_succeeded": False,
        "error": None,
    }
    try:
        report.update(_scenario(mgr, sim, dev, unit))
    finally:
        mgr.close()
    return report


def _scenario(mgr: ModelManager, sim: SimulatedDevice | None, dev: torch.device, unit: int) -> dict[str, Any]:
    """Load both sets, check they are resident without an OOM, run the job that needs a retry."""
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    engines: dict[str, Any] = {}
    try:
        for name in LOAD_ORDER:
            engines[name] = mgr.ensure(name)
        load_failure = None
    except GenerationError as exc:
        load_failure = f"{exc.code}: {exc.message}"
    load_s = time.perf_counter() - t0
    load_stats = mgr.stats()
    residency = mgr.component_residency()
    both_resident = len(engines) == len(LOAD_ORDER) and all(residency.values())
    out: dict[str, Any] = {
        "both_sets_resident_after_load": both_resident,
        "load_oom_retries": load_stats.oom_retries,
        "load_seconds": round(load_s, 3),
        "pinned": load_stats.pinned_gib * GiB / unit,
        "parking": load_stats.parking,
    }
    if load_failure or load_stats.oom_retries or not both_resident:
        out["error"] = (f"scenario precondition failed: loading the sets took {load_stats.oom_retries} "
                        f"out-of-memory retries ({load_failure or 'each retry succeeded'}) and left "
                        f"{sorted(k for k, on in residency.items() if not on) or 'no set loaded'} off the device; "
                        "the job was not run")
        return out
    image_sum = checksum(engines["image"])
    set_bytes = {name: nbytes(engine) for name, engine in engines.items()}
    free_both = measured_free_bytes(dev) if cuda else sim.free()  # type: ignore[union-attr]
    assert free_both is not None
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
    try:
        mgr.run("video", job)
        ok, error = True, None
    except GenerationError as exc:
        ok, error = False, f"{exc.code}: {exc.message}"
    job_s = time.perf_counter() - t1
    residency_after = mgr.component_residency()
    stats = mgr.stats()
    peak = torch.cuda.max_memory_allocated(dev) / unit if cuda else None
    intact = checksum(mgr.ensure("image")) == image_sum
    out.update({
        "retry_succeeded": ok,
        "error": error,
        "attempts": len(attempts),
        "oom_retries": stats.oom_retries - load_stats.oom_retries,
        "image_set_parked_for_retry": not any(v for k, v in residency_after.items() if k.startswith("image.")),
        "image_weights_identical_after_restore": intact,
        "image_set": set_bytes["image"] / unit,
        "video_set": set_bytes["video"] / unit,
        "free_with_both_sets": free_both / unit,
        "job_activations": need / unit,
        "first_attempt_half": half / unit,
        "peak_allocated": peak,
        "job_seconds_with_retry": round(job_s, 3),
        "swap_seconds": round(stats.swap_seconds, 3),
    })
    return out


def output_path(out: Path | None, report: dict[str, Any]) -> Path:
    """``out`` itself when it names a ``.json`` file, else ``<out or bench/results>/<date>-<gpu>-oom.json``."""
    if out is not None and out.suffix == ".json" and not out.is_dir():
        return out
    tag = gpu_slug(report["device_name"]) if report["mode"] == "cuda" else "cpu"
    return (out or RESULTS) / f"{report['date']}-{tag}-oom.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--zimage-dir", type=Path, help="real Z-Image-Turbo folder (with --wan-dir)")
    ap.add_argument("--wan-dir", type=Path, help="real Wan2.2-S2V-14B folder (with --zimage-dir)")
    ap.add_argument("--reserve-gib", type=float, default=0.5, help="the manager's VRAM reserve")
    ap.add_argument("--sim-capacity-mib", type=float, default=SIM_CAPACITY_MIB,
                    help="--device cpu: size of the simulated device")
    ap.add_argument("--out", type=Path, help="results folder (default bench/results) or a .json file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the simulated smoke run")
    if (args.zimage_dir or args.wan_dir) and (args.device != "cuda" or not (args.zimage_dir and args.wan_dir)):
        raise SystemExit("--zimage-dir and --wan-dir go together, on --device cuda")
    report = run(args)
    unit = report["unit"]

    def num(key: str) -> str:
        return f"{report[key]:.2f}" if isinstance(report.get(key), float) else str(report.get(key, "-"))

    rows = [("device", report["device_name"]), ("mode / sets", f"{report['mode']} / {report['sets']}"),
            (f"total ({unit})", num("total")), (f"image set ({unit})", num("image_set")),
            (f"video set ({unit})", num("video_set")),
            ("both sets resident after load / load OOM retries",
             f"{report.get('both_sets_resident_after_load')} / {report.get('load_oom_retries')}"),
            (f"free with both sets ({unit})", num("free_with_both_sets")),
            (f"job activations ({unit})", num("job_activations")),
            ("attempts / oom_retries", f"{report.get('attempts', '-')} / {report.get('oom_retries', '-')}"),
            ("image set parked for the retry", report.get("image_set_parked_for_retry", "-")),
            ("image weights identical after restore", report.get("image_weights_identical_after_restore", "-")),
            ("job seconds (with retry)", report.get("job_seconds_with_retry", "-")),
            ("retry_succeeded", report["retry_succeeded"])]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if report["error"]:
        print("error:", report["error"])
    out = output_path(args.out, report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not report["retry_succeeded"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
