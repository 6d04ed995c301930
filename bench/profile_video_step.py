"""Where one Wan CFG step's time goes: a profiled step per path, GPU kernels grouped by kind.

Why: the targets of issue 10 need to know what is left once attention runs on the
fastest exact kernel. This loads the model once (as ``bench_video_speed.py``), runs a
two-step single-clip generation per path and profiles the second step (the first is the
warm-up and, on the exact path, the compile). Per path it reports the step's wall time,
the time the GPU was busy (the union of kernel intervals: the rest is launch overhead and
host work), the kernel time per kind (attention, GEMM, Triton-fused, eager elementwise,
copies, other) and the top kernels. Random weights: time only.

GPU:  python bench/profile_video_step.py --out $OUT             (writes <date>-<gpu>-step-profile.json)
CPU:  python bench/profile_video_step.py --profile tiny --device cpu --out /tmp/p
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import re
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_video_speed as bvs  # noqa: E402
from storystudio.config import WorkerSettings  # noqa: E402
from storystudio.render import VIDEO_SET  # noqa: E402
from storystudio.storage import StorageSettings  # noqa: E402
from storystudio.worker import Worker  # noqa: E402

log = logging.getLogger("bench.profile_video_step")

KINDS = (  # first match wins
    ("attention", re.compile(r"cudnn|fmha|flash|attention|sdpa|attn", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|scaled_mm|cublas|sm90_|sm80_", re.I)),
    ("triton", re.compile(r"^triton", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|cat|index|gather|scatter", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|reduce|norm|softmax", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals (kernels on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(prof: torch.profiler.profile, wall_s: float, top: int) -> dict[str, Any]:
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals: list[tuple[float, float]] = []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = evt.time_range.start, evt.time_range.end
        intervals.append((start, end))
        per_name[evt.name][0] += end - start
        per_name[evt.name][1] += 1
    by_kind: dict[str, float] = defaultdict(float)
    for name, (us, _) in per_name.items():
        by_kind[kind_of(name)] += us
    kernels = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "step_wall_s": round(wall_s, 4),
        "gpu_busy_s": round(busy_us(intervals) / 1e6, 4),
        "kernel_s_by_kind": {k: round(v / 1e6, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kernels": len(intervals),
        "top": [{"name": n[:120], "s": round(us / 1e6, 4), "calls": c, "kind": kind_of(n)}
                for n, (us, c) in kernels],
    }


class ProfiledStep:
    """Wraps ``engine._denoise``: step ``index`` runs under the profiler, the others as usual."""

    def __init__(self, engine: Any, index: int = 1) -> None:
        self.engine, self.index = engine, index
        self.prof: torch.profiler.profile | None = None
        self.wall_s = 0.0
        self._real = engine._denoise

    def __enter__(self) -> ProfiledStep:
        device = self.engine.device
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)

        def denoise(latents, timesteps, scheduler, call_model, generator):
            def step(x, t, i):
                if i != self.index:
                    return call_model(x, t, i)
                bvs.sync(device)
                with torch.profiler.profile(activities=acts) as prof:
                    t0 = time.perf_counter()
                    out = call_model(x, t, i)
                    bvs.sync(device)
                    self.wall_s = time.perf_counter() - t0
                self.prof = prof
                return out

            return self._real(latents, timesteps, scheduler, step, generator)

        self.engine._denoise = denoise
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine._denoise


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(bvs.PROFILES), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--resolutions", type=lambda s: s.split(","), default=["480p"])
    ap.add_argument("--paths", type=lambda s: s.split(","), default=list(bvs.PATHS))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    prof = bvs.PROFILES[args.profile]
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "profile": args.profile,
                           "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
    workdir = bvs.pick_workdir(args.workdir, need_gib=50 if args.profile == "full" else 1)
    bvs.ensure_checkpoint(workdir / "Wan2.2-S2V-14B", args.profile, args.device, res)
    settings = replace(
        WorkerSettings.from_env({"STORYSTUDIO_DEVICE": args.device, "STORYSTUDIO_MODELS_DIR": str(workdir)}),
        storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(workdir / "output")}),
        video_path=bvs.options_for("exact", prof["compile_backend"]))
    worker = Worker.from_settings(settings)
    engine = worker.manager.ensure(VIDEO_SET)
    res["attention_backend"] = engine.attention.backend if engine.attention else None
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"{_dt.date.today().isoformat()}-{bvs.gpu_slug(device)}-step-profile.json"
    for label in args.resolutions:
        req = bvs.steps_request(prof["shapes"][label], prof["infer_frames"], 2)
        for path in args.paths:
            engine.options = bvs.options_for(path, prof["compile_backend"])
            with ProfiledStep(engine) as ps:
                result = bvs.run_on_manager(worker.manager, bvs.request_for(path, req, device))
            assert ps.prof is not None
            summary = summarize(ps.prof, ps.wall_s, args.top)
            summary["engine"] = result.engine
            res[f"{path}_{label}"] = summary
            out_file.write_text(json.dumps(res, indent=2, default=str))
            print(f"\n{path} {label}: step {summary['step_wall_s']} s, GPU busy {summary['gpu_busy_s']} s")
            print("| kind | s |\n|---|---|")
            for kind, s in summary["kernel_s_by_kind"].items():
                print(f"| {kind} | {s} |")
            print("| kernel | s | calls |\n|---|---|---|")
            for k in summary["top"]:
                print(f"| {k['name'][:80]} | {k['s']} | {k['calls']} |")
    print(f"\nwrote {out_file}")
    return res


if __name__ == "__main__":
    main()
