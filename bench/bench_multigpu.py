"""Multi-GPU benchmark: one CFG step of the Wan2.2-S2V DiT on 1 GPU vs N GPUs, same run.

What is timed: transformer forwards only (the DiT is >95 % of a video's time), one CFG step
= the conditional and the unconditional forward. Three ways, on the same inputs:

* ``1gpu``    — rank 0 alone, the official forward twice (what the 1-GPU worker does);
* ``ulysses`` — all N ranks, each forward sequence-parallel (production code:
  ``ParallelDiT`` on rank 0 announcing and broadcasting each call, ``follow`` on the others);
* ``cfg``     — N even: both branches batched into one call, branch 0 on the first N/2
  ranks and branch 1 on the others, each half sequence-parallel.

The production default (``STORYSTUDIO_PARALLEL_MODE=auto``) is ``cfg`` for even N; the
JSON's ``cfg_step_s_ngpu`` is the faster of the two modes, and both are reported.

Why random weights built on each GPU: the DiT (16.3B parameters, ~33 GB bf16) is what
dominates a step, and writing/reading a checkpoint would cost minutes of the GPU budget.
Every rank builds the same weights (deterministic per tensor name) directly on its GPU.

Usage (machine with N GPUs; NVLink multicast is forced off here and in every spawned rank):
    python bench/bench_multigpu.py --ranks 2 --out bench/results
    python bench/bench_multigpu.py --ranks 4 --out bench/results
CPU smoke test (gloo, tiny DiT, scaled-down sizes):
    python bench/bench_multigpu.py --device cpu --profile tiny --ranks 2 --out /tmp/mg

Writes ``<out>/<date>-<gpu>x<N>-multigpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.distributed.config import MULTICAST_OFF_ENV, disable_multicast  # noqa: E402

disable_multicast()  # before torch / NCCL initialise anything, in this process and in every child

import torch  # noqa: E402

log = logging.getLogger("bench_multigpu")
GiB = 1024**3

# (height, width) per resolution. full: the worker's official size rule for a 16:9 reference at
# the 480p / 720p areas (448x832, 704x1280). tiny: small enough for a CPU.
SIZES = {
    "full": {"480p": (448, 832), "720p": (704, 1280)},
    "tiny": {"480p": (64, 112), "720p": (96, 160)},
}
MOTION_FRAMES = 73
TEXT_TOKENS = 128


def gpu_slug(name: str) -> str:
    m = re.search(r"\b([AHBL]\d{2,3}S?)\b", name.upper())
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------ model and inputs


def build_random_dit(profile: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The official WanModel_S2V with the release's sizes, random weights made on ``device``.

    Same rule as the synthetic checkpoint writer (``make_tensor``: deterministic per tensor
    name), so every rank gets identical weights without any transfer.
    """
    from storystudio.models.checkpoints.wan_s2v import meta_transformer
    from storystudio.synthetic.wan_s2v import make_tensor, specs_of, transformer_config

    model = meta_transformer(transformer_config(profile))
    state = {}
    for spec in specs_of(model, dtype):
        state[spec.name] = make_tensor(spec, seed=0, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    return model.eval().requires_grad_(False)


def make_inputs(model: torch.nn.Module, height: int, width: int, frames: int, device: torch.device,
                dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) keyword arguments of one clip's forward, as the engine builds them.

    Same seed on every rank → same tensors everywhere. A middle clip (motion frames kept),
    which is the steady-state cost of a long scene.
    """
    g = torch.Generator().manual_seed(1234)
    lat_motion = (MOTION_FRAMES + 3) // 4
    lat_frames = (frames + 3 + MOTION_FRAMES) // 4 - lat_motion
    h, w = height // 8, width // 8

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    audio = rnd(1, 25, int(model.config.audio_dim), frames)  # 25 wav2vec2 hidden states
    cond = {
        "x": [rnd(16, lat_frames, h, w)],
        "t": torch.tensor([999.0], device=device),
        "context": [rnd(TEXT_TOKENS, 4096)],
        "seq_len": lat_frames * h * w // 4,
        "cond_states": torch.zeros(1, 16, lat_frames, h, w, device=device, dtype=dtype),
        "motion_latents": rnd(1, 16, lat_motion, h, w),
        "ref_latents": rnd(1, 16, 1, h, w),
        "audio_input": audio,
        "motion_frames": [MOTION_FRAMES, lat_motion],
        "drop_motion_frames": False,
    }
    uncond = dict(cond, context=[rnd(TEXT_TOKENS, 4096)], audio_input=0.0 * audio)
    return cond, uncond


def batched(cond: dict[str, Any], uncond: dict[str, Any]) -> dict[str, Any]:
    """Both guidance branches as one batch of two (what ``cfg`` mode splits over the halves)."""
    return dict(cond, x=cond["x"] + uncond["x"], context=cond["context"] + uncond["context"],
                audio_input=torch.cat([cond["audio_input"], uncond["audio_input"]]),
                cond_states=torch.cat([cond["cond_states"]] * 2),
                motion_latents=torch.cat([cond["motion_latents"]] * 2),
                ref_latents=torch.cat([cond["ref_latents"]] * 2))


# ------------------------------------------------------------------------ per rank


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / GiB, 2)


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def rank_entry(rank: int, args: dict[str, Any], inboxes: list[Any], results: Any) -> None:
    """One benchmark rank. Rank 0 drives and times; the others follow each phase."""
    for key, value in MULTICAST_OFF_ENV.items():
        assert os.environ.get(key) == value, f"{key} not inherited"
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    from storystudio.distributed.parallel_dit import Comm, ParallelDiT, follow
    from storystudio.models.fused_rope import fused_rope
    from storystudio.patches import wan22

    n = args["ranks"]
    cuda = args["device"] == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    comm = Comm.init(rank=rank, size=n, device=device, init_method=args["init_method"], timeout_s=1800)
    wan22.import_wan()
    timer = Timer(device)
    t0 = time.perf_counter()
    model = build_random_dit(args["profile"], device, dtype)
    timer.sync()
    build_s = time.perf_counter() - t0
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    out: dict[str, Any] = {"rank": rank, "build_s": round(build_s, 2), "weights_gib": round(weights_gib, 2),
                           "peaks": {}}
    modes = ["ulysses"] + (["cfg"] if n % 2 == 0 else [])
    steps, warmup = args["steps"], args["warmup"]

    if rank != 0:
        dist_barrier()
        for res in args["resolutions"]:
            dist_barrier()  # rank 0's 1-GPU phase runs meanwhile
            for mode in modes:
                timer.reset_peak()
                follow(comm, inboxes[rank - 1], lambda: model)  # autocast comes with each call
                out["peaks"][f"{res}/{mode}"] = timer.peak_gib()
                dist_barrier()
        results.put(out)
        return

    timings: dict[str, Any] = {"attention": wan22.attention_backend(), "rope": args["rope"]}
    pdit = ParallelDiT(model, comm, inboxes, "ulysses")
    dist_barrier()
    for res in args["resolutions"]:
        height, width = SIZES[args["profile"]][res]
        cond, uncond = make_inputs(model, height, width, args["frames"], device, dtype)
        row: dict[str, Any] = {"size": [height, width]}

        def step_1gpu() -> list[torch.Tensor]:
            a = type(model).forward(model, **cond)
            type(model).forward(model, **uncond)
            return a

        def step_ulysses() -> list[torch.Tensor]:
            a = pdit.forward(**cond)
            pdit.forward(**uncond)
            return a

        both = batched(cond, uncond)

        def step_cfg() -> list[torch.Tensor]:
            return pdit.forward(**both)[:1]

        def measure(fn) -> tuple[float, torch.Tensor]:
            # The worker's exact path runs the fused RoPE (rank 0's engine enters it for every
            # generation and the followers are told per forward); --rope official measures the old one.
            rope = fused_rope(model, device) if args["rope"] == "fused" else contextlib.nullcontext()
            with torch.no_grad(), _autocast(device, dtype), rope:
                for _ in range(warmup):
                    fn()
                timer.sync()
                t = time.perf_counter()
                for _ in range(steps):
                    y = fn()
                timer.sync()
            return (time.perf_counter() - t) / steps, y[0].float()

        timer.reset_peak()
        row["cfg_step_s_1gpu"], ref = measure(step_1gpu)
        row["peak_vram_gib_1gpu"] = timer.peak_gib()
        log.info("%s 1 GPU: %.3f s per CFG step", res, row["cfg_step_s_1gpu"])
        dist_barrier()
        for mode in modes:
            pdit.mode = mode
            timer.reset_peak()
            row[f"cfg_step_s_{mode}"], y = measure(step_ulysses if mode == "ulysses" else step_cfg)
            row[f"max_abs_diff_{mode}"] = float((y - ref).abs().max())
            pdit.stop_followers()
            out["peaks"][f"{res}/{mode}"] = timer.peak_gib()
            log.info("%s %d ranks %s: %.3f s per CFG step", res, n, mode, row[f"cfg_step_s_{mode}"])
            dist_barrier()
        row["tokens"] = _tokens(model, cond)
        timings[res] = row
    out["timings"] = timings
    results.put(out)


def dist_barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _tokens(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    from storystudio.distributed.sequence_parallel import _prepare

    with torch.no_grad():
        return int(_prepare(model, **kwargs).x.shape[1])


# ------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--profile", choices=["full", "tiny"], default="full")
    ap.add_argument("--ranks", type=int, default=None, help="N (default: every visible GPU)")
    ap.add_argument("--resolutions", default="480p,720p")
    ap.add_argument("--frames", type=int, default=80, help="frames per clip (official 80)")
    ap.add_argument("--steps", type=int, default=1, help="timed CFG steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed CFG steps first")
    ap.add_argument("--rope", choices=["fused", "official"], default="fused",
                    help="the RoPE of every measured forward (fused: the worker's exact path)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import multiprocessing as mp

    from storystudio.distributed.executor import _free_port

    n = args.ranks or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if n < 2:
        raise SystemExit("need at least 2 ranks")
    if args.device == "cuda" and torch.cuda.device_count() < n:
        raise SystemExit(f"--ranks {n} but {torch.cuda.device_count()} GPU(s) visible")
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    spec = {"ranks": n, "device": args.device, "profile": args.profile, "resolutions": resolutions,
            "frames": args.frames, "steps": args.steps, "warmup": args.warmup, "rope": args.rope,
            "init_method": f"tcp://127.0.0.1:{_free_port()}"}
    ctx = mp.get_context("spawn")
    inboxes = [ctx.Queue() for _ in range(n - 1)]
    results = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=rank_entry, args=(r, spec, inboxes, results), name=f"bench-rank{r}")
             for r in range(n)]
    for p in procs:
        p.start()
    outs = []
    while len(outs) < n:
        try:
            outs.append(results.get(timeout=5))
        except Exception:  # noqa: BLE001 - queue.Empty: check the ranks are still alive
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"rank(s) failed: {[(p.name, p.exitcode) for p in dead]}") from None
    for p in procs:
        p.join(60)
    outs.sort(key=lambda o: o["rank"])
    report = summarize(outs, args, n, time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_slug(report["gpu"]) if args.device == "cuda" else "cpu"
    path = args.out / f"{datetime.date.today().isoformat()}-{gpu}x{n}-multigpu.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {path}")


def summarize(outs: list[dict[str, Any]], args: argparse.Namespace, n: int, wall: float) -> dict[str, Any]:
    lead = outs[0]
    timings = lead["timings"]
    report: dict[str, Any] = {
        "gpus": n,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "device": args.device,
        "profile": args.profile,
        "torch": torch.__version__,
        "attention": timings["attention"],
        "rope": timings["rope"],
        "frames": args.frames,
        "steps_timed": args.steps,
        "env": dict(MULTICAST_OFF_ENV),
        "dit_weights_gib_per_gpu": lead["weights_gib"],
        "build_s": [o["build_s"] for o in outs],
        "wall_s": round(wall, 1),
        "cfg_step_s_1gpu": {},
        "cfg_step_s_ngpu": {},
        "speedup": {},
        "efficiency": {},
    }
    for res, row in timings.items():
        if res in ("attention", "rope"):
            continue
        modes = [m for m in ("ulysses", "cfg") if f"cfg_step_s_{m}" in row]
        best = min(modes, key=lambda m: row[f"cfg_step_s_{m}"])
        row["cfg_step_s_ngpu"] = row[f"cfg_step_s_{best}"]
        row["best_mode"] = best
        for m in modes:
            row[f"speedup_{m}"] = round(row["cfg_step_s_1gpu"] / row[f"cfg_step_s_{m}"], 3)
        row["speedup"] = round(row["cfg_step_s_1gpu"] / row["cfg_step_s_ngpu"], 3)
        row["efficiency"] = round(row["speedup"] / n, 3)
        row["peak_vram_gib_per_gpu"] = {m: [o["peaks"].get(f"{res}/{m}") for o in outs] for m in modes}
        report[res] = row
        report["cfg_step_s_1gpu"][res] = round(row["cfg_step_s_1gpu"], 4)
        report["cfg_step_s_ngpu"][res] = round(row["cfg_step_s_ngpu"], 4)
        report["speedup"][res] = row["speedup"]
        report["efficiency"][res] = row["efficiency"]
    return report


def print_table(report: dict[str, Any]) -> None:
    n = report["gpus"]
    print(f"\nWan2.2-S2V DiT, one CFG step (2 forwards), {report['gpu']} x{n}, attention {report['attention']}")
    head = f"{'res':6} {'tokens':>7} {'1 GPU s':>9} {'ulysses s':>10} {'cfg s':>8} {'speed-up':>9} {'eff.':>6}  peak GiB per GPU (1 GPU | best mode)"
    print(head)
    print("-" * len(head))
    for res in ("480p", "720p"):
        row = report.get(res)
        if row is None:
            continue
        cfg = row.get("cfg_step_s_cfg")
        peaks = row["peak_vram_gib_per_gpu"][row["best_mode"]]
        print(f"{res:6} {row['tokens']:>7} {row['cfg_step_s_1gpu']:>9.3f} {row['cfg_step_s_ulysses']:>10.3f} "
              f"{(f'{cfg:.3f}' if cfg is not None else '-'):>8} {row['speedup']:>8.2f}x {row['efficiency']:>6.2f}  "
              f"{row['peak_vram_gib_1gpu']} | {peaks} ({row['best_mode']})")


if __name__ == "__main__":
    main()
