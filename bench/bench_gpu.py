"""GPU benchmark: engines on full-size random weights, and ModelManager swaps vs the naive way.

One process, one run, so every ratio compares numbers measured side by side:

1. write the Wan2.2-S2V checkpoint (official layout, random weights), load it, delete the files
   (disk is 64 GiB; parked sets never re-read disk anyway);
2. the same for Z-Image-Turbo;
3. Z-Image 1024², 8 steps: time and peak VRAM;
4. Wan 480p: one CFG denoising step (time of steps=2 minus steps=1) and peak VRAM;
5. the seed design's naive unload/reload: ``module.to("cpu")`` / ``module.to("cuda")`` per set;
6. the ModelManager: swaps in both directions under a budget that forces them, then a 480p video
   job after a swap under the device's real budget, with its peak VRAM.

Usage (on the lent GPU): ``python bench/bench_gpu.py --profile full --workdir /tmp/ckpt --out $OUT``
On CPU with ``--profile tiny --device cpu`` it runs the same code path in seconds (smoke test).
Random weights: outputs are noise; only time and memory mean anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.synthetic.wan_s2v import write_wan_s2v_checkpoint  # noqa: E402
from storystudio.synthetic.zimage import write_zimage_checkpoint  # noqa: E402
from storystudio.models.footprint import image_working_bytes, video_working_bytes  # noqa: E402
from storystudio.models.image_generator import ImageRequest, ZImageGenerator  # noqa: E402
from storystudio.models.model_manager import GiB, ModelManager  # noqa: E402
from storystudio.models.video_generator import VideoRequest, WanS2VGenerator  # noqa: E402

log = logging.getLogger("bench")


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, *args, **kwargs) -> tuple[Any, float]:
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        return out, time.perf_counter() - t0

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / GiB

    def used_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(self.device) / GiB


def module_gib(engine) -> float:
    seen, total = set(), 0
    for m in engine.components().values():
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total / GiB


def pick_workdir(preferred: Path, need_gib: float) -> Path:
    """The first of ``preferred``, /dev/shm, /root, /var/tmp with room for one checkpoint."""
    for cand in (preferred, Path("/dev/shm/storystudio-bench"), Path("/root/storystudio-bench"), Path("/var/tmp/ssb")):
        try:
            cand.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(cand).free / GiB
        except OSError:
            continue
        log.info("workdir candidate %s: %.1f GiB free", cand, free)
        if free >= need_gib:
            return cand
    raise SystemExit(f"no folder with {need_gib} GiB free for the checkpoints")


def naive_move(engine, device: torch.device | str) -> None:
    for m in engine.components().values():
        m.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["tiny", "full"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/storystudio-bench"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--video-area", type=int, default=480 * 832, help="pixel area of the video job (480p)")
    ap.add_argument("--infer-frames", type=int, default=80)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--forced-budget-gib", type=float, default=None,
                    help="budget for the forced-swap scenario (default: largest set + its working memory)")
    ap.add_argument("--swap-rounds", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    clock = Clock(device)
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"profile": args.profile, "device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
        res["gpu_total_gib"] = round(torch.cuda.mem_get_info(device)[1] / GiB, 2)
    from storystudio.patches.wan22 import attention_backend, import_wan

    import_wan()
    res["wan_attention"] = attention_backend()

    def dump() -> None:
        (args.out / "bench_gpu.json").write_text(json.dumps(res, indent=2))

    # ---------------------------------------------------------------- 1-2: write + load
    workdir = pick_workdir(args.workdir, need_gib=50 if args.profile == "full" else 1)
    res["workdir"] = str(workdir)
    wan_dir, z_dir = workdir / "Wan2.2-S2V-14B", workdir / "Z-Image-Turbo"
    for d in (wan_dir, z_dir):
        shutil.rmtree(d, ignore_errors=True)
    _, res["wan_write_s"] = clock.time(write_wan_s2v_checkpoint, wan_dir, args.profile, device=args.device)
    res["wan_disk_gib"] = sum(p.stat().st_size for p in wan_dir.rglob("*") if p.is_file()) / GiB
    wan, res["wan_load_s"] = clock.time(WanS2VGenerator.from_pretrained, wan_dir, device=args.device)
    res["wan_weights_gib"] = module_gib(wan)
    shutil.rmtree(wan_dir)
    dump()
    _, res["z_write_s"] = clock.time(write_zimage_checkpoint, z_dir, args.profile, device=args.device)
    res["z_disk_gib"] = sum(p.stat().st_size for p in z_dir.rglob("*") if p.is_file()) / GiB
    z, res["z_load_s"] = clock.time(ZImageGenerator.from_pretrained, z_dir, device=args.device)
    res["z_weights_gib"] = module_gib(z)
    shutil.rmtree(z_dir)
    res["both_resident_gib"] = clock.used_gib()
    dump()

    # ---------------------------------------------------------------- 3: Z-Image generation
    size = args.image_size
    ireq = ImageRequest(prompt="a lighthouse at dawn", width=size, height=size, steps=8, seed=1)
    clock.time(z.generate, ireq)  # warm-up (kernels, allocator)
    clock.reset_peak()
    _, res["z_gen_s"] = clock.time(z.generate, ireq)
    res["z_gen_peak_gib"] = clock.peak_gib()
    dump()

    # ---------------------------------------------------------------- 4: Wan one CFG step
    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 255, (480, 832, 3), dtype=np.uint8))
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)  # 1 s: one clip

    def vreq(steps: int) -> VideoRequest:
        return VideoRequest(image=ref, audio=audio, prompt="a person talking", max_area=args.video_area,
                            infer_frames=args.infer_frames, steps=steps, guidance=4.5, seed=1)

    clock.reset_peak()
    _, t1 = clock.time(wan.generate, vreq(1))
    res["wan_gen_1step_s"] = t1
    res["wan_gen_peak_gib_with_z_resident"] = clock.peak_gib()
    _, t2 = clock.time(wan.generate, vreq(2))
    res["wan_gen_2step_s"] = t2
    res["wan_cfg_step_s"] = t2 - t1
    dump()

    # ---------------------------------------------------------------- 5: naive unload/reload
    if not args.skip_naive:
        _, res["naive_wan_to_cpu_s"] = clock.time(naive_move, wan, "cpu")
        _, res["naive_z_to_cpu_s"] = clock.time(naive_move, z, "cpu")
        gc.collect()
        _, res["naive_wan_to_gpu_s"] = clock.time(naive_move, wan, device)
        _, res["naive_z_to_gpu_s"] = clock.time(naive_move, z, device)
        res["naive_z_to_wan_s"] = res["naive_z_to_cpu_s"] + res["naive_wan_to_gpu_s"]
        res["naive_wan_to_z_s"] = res["naive_wan_to_cpu_s"] + res["naive_z_to_gpu_s"]
        dump()

    # ---------------------------------------------------------------- 6: ModelManager
    mgr = ModelManager(device)
    real_budget = mgr.budget_bytes
    mgr.register("image", lambda d: z)
    mgr.register("video", lambda d: wan)
    # Adopting a loaded engine copies it into pinned parking buffers: the pinning cost lands here, at load.
    _, res["adopt_and_pin_image_s"] = clock.time(mgr.ensure, "image")
    _, res["adopt_and_pin_video_s"] = clock.time(mgr.ensure, "video")
    vwork = video_working_bytes(args.video_area, args.infer_frames)
    iwork = image_working_bytes(size, size)
    wan_b, z_b = int(res["wan_weights_gib"] * GiB), int(res["z_weights_gib"] * GiB)
    forced = args.forced_budget_gib

    def swap_rounds(label: str, budget: int, iw: int, vw: int) -> None:
        """Alternate image/video residency; record park+restore seconds of each transition."""
        mgr.budget_bytes = budget
        res[f"{label}_budget_gib"] = budget / GiB
        z_to_wan, wan_to_z = [], []
        for _ in range(args.swap_rounds):
            s0 = mgr.stats().swap_seconds
            mgr.ensure("image", working_bytes=iw)
            wan_to_z.append(mgr.stats().swap_seconds - s0)
            after_image = mgr.component_residency()
            s0 = mgr.stats().swap_seconds
            mgr.ensure("video", working_bytes=vw)
            z_to_wan.append(mgr.stats().swap_seconds - s0)
        res[f"{label}_z_to_wan_s"] = z_to_wan
        res[f"{label}_wan_to_z_s"] = wan_to_z
        res[f"{label}_residency"] = {"after_image": after_image, "after_video": mgr.component_residency()}
        dump()

    # policy: room for weights + the 480p / 1024² working memory, as production computes it
    swap_rounds("mgr", int(forced * GiB) if forced else max(wan_b + vwork, z_b + iwork) + GiB, iwork, vwork)
    # tight: only one set's weights fit, so (almost) everything of the other set moves each time
    swap_rounds("tight", max(wan_b, z_b) + GiB, 0, 0)

    # 480p video job after a swap, under the device's real budget
    mgr.budget_bytes = real_budget
    mgr.ensure("image", working_bytes=iwork)
    clock.time(z.generate, ireq)
    s0 = mgr.stats().swap_seconds
    clock.reset_peak()
    mgr.run("video", lambda e: e.generate(vreq(1)), working_bytes=vwork)
    res["real_budget_gib"] = None if real_budget is None else real_budget / GiB
    res["real_budget_swap_s"] = mgr.stats().swap_seconds - s0
    res["video_after_swap_peak_gib"] = clock.peak_gib()
    res["real_budget_residency"] = mgr.component_residency()
    res["manager_stats"] = mgr.stats().as_dict()
    dump()
    print_table(res)


def print_table(res: dict[str, Any]) -> None:
    def f(x: Any) -> str:
        if isinstance(x, list):
            return "[" + ", ".join(f(v) for v in x) + "]"
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    rows = [(k, f(v)) for k, v in res.items() if not isinstance(v, dict)]
    for label in ("mgr", "tight"):
        if "naive_z_to_wan_s" in res and res.get(f"{label}_z_to_wan_s"):
            for a, b in (("z_to_wan", "Z→Wan"), ("wan_to_z", "Wan→Z")):
                worst = max(res[f"{label}_{a}_s"])
                ratio = f"{res[f'naive_{a}_s'] / worst:.1f}x" if worst > 1e-4 else "n/a (nothing moved)"
                rows.append((f"ratio naive/{label} {b} (worst round)", ratio))
    w = max(len(k) for k, _ in rows)
    print("\n| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |")


if __name__ == "__main__":
    main()
