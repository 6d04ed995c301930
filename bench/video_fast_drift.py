"""Drift of the fast preset's knobs against the exact path, on one loaded Wan model and one seed.

For each variant — the exact path again (the run-to-run noise floor), each knob alone
(``fp8``, ``attention_8bit``, ``step_cache``) and the whole ``fast`` preset — the same
request is generated and its final latents (before the VAE) are compared with the exact
run's: relative L2 = ||fast - exact|| / ||exact||, over all clips. Also reported: the
steps each clip reused, what each knob actually ran as on this device, and wall time.

Random weights: the drift says how far each approximation moves *this* network's output,
not whether a real video still looks right — judging quality needs the real weights.

:func:`drift_report` is the reusable piece (``bench/bench_video_speed.py`` or a test can
call it on an engine it already holds). As a script:

    # CPU smoke test on the tiny checkpoint (seconds to minutes):
    python bench/video_fast_drift.py --profile tiny --device cpu --steps 10 --max-area 4096 --infer-frames 16
    # GPU, full-size random weights (writes, loads, then deletes the checkpoint):
    python bench/video_fast_drift.py --profile full --device cuda --workdir /tmp/ssb --out $OUT --steps 20

It prints a table and writes ``<out>/<date>-<gpu>-video-fast-drift.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.errors import StoryStudioError  # noqa: E402
from storystudio.fast_preset import SpeedKnobs  # noqa: E402
from storystudio.limits import FAST_STEP_CACHE_THRESHOLD  # noqa: E402
from storystudio.models import speed  # noqa: E402
from storystudio.models.video_generator import VideoRequest, WanS2VGenerator  # noqa: E402

log = logging.getLogger("bench.video_fast_drift")


def variants(step_cache: float = FAST_STEP_CACHE_THRESHOLD) -> dict[str, SpeedKnobs]:
    """The runs of a drift report, by name (``exact`` is the reference and always runs first)."""
    return {
        "exact_repeat": SpeedKnobs.resolve("exact"),
        "fp8": SpeedKnobs.resolve("exact", fp8=True),
        "attention_8bit": SpeedKnobs.resolve("exact", attention_8bit=True),
        "step_cache": SpeedKnobs.resolve("exact", step_cache=step_cache),
        "fast": SpeedKnobs.resolve("fast", step_cache=step_cache),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(engine: WanS2VGenerator, request: VideoRequest, plan: speed.SpeedPlan) -> tuple[list[torch.Tensor], dict, float]:
    latents: list[torch.Tensor] = []
    req = dataclasses.replace(request, speed=plan)
    _sync(engine.device)
    t0 = time.perf_counter()
    out = engine.generate(req, on_latents=lambda clip, lat: latents.append(lat.detach().float().cpu()))
    _sync(engine.device)
    return latents, out.speed or {}, time.perf_counter() - t0


def relative_l2(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all clips' latents (``bench_video_speed.py`` uses it for the fast scene too)."""
    fa, fb = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((fa - fb).norm() / fb.norm())


def drift_report(engine: WanS2VGenerator, request: VideoRequest, *,
                 runs: dict[str, SpeedKnobs] | None = None) -> dict[str, Any]:
    """Generate ``request`` exactly, then with each variant; relative L2 of the final latents.

    The FP8 copy of the weights is built on the engine first when a variant needs it and
    this device can run it. A variant the device refuses (fp8 demanded where unsupported)
    becomes a row with its error instead of a number.
    """
    runs = variants() if runs is None else runs
    exact_latents, exact_speed, exact_s = _run(engine, request, speed.EXACT)
    rows: list[dict[str, Any]] = [{"variant": "exact", "rel_l2": 0.0, "skipped_steps": exact_speed["skipped_steps"],
                                   "seconds": round(exact_s, 3), "fp8": "off", "attention_8bit": "off",
                                   "step_cache": 0.0}]
    for name, knobs in runs.items():
        try:
            plan = speed.resolve_plan(knobs, engine.device)
        except StoryStudioError as exc:
            rows.append({"variant": name, "error": f"{exc.code}: {exc.message}"})
            continue
        if plan.fp8 is not None and engine.transformer_fp8 is None:
            engine.build_fp8(plan.fp8.granularity)
        latents, sp, seconds = _run(engine, request, plan)
        rows.append({
            "variant": name,
            "rel_l2": relative_l2(latents, exact_latents),
            "rel_l2_per_clip": [relative_l2([a], [b]) for a, b in zip(latents, exact_latents, strict=True)],
            "skipped_steps": sp["skipped_steps"],
            "seconds": round(seconds, 3),
            "fp8": plan.fp8_detail,
            "attention_8bit": plan.attention_8bit_detail,
            "step_cache": plan.step_cache,
        })
        log.info("drift %s: rel L2 %.4g, skipped %s, %.1f s", name, rows[-1]["rel_l2"], sp["skipped_steps"], seconds)
    return {
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "steps": int(request.steps),
        "guidance": float(request.guidance),
        "infer_frames": int(request.infer_frames),
        "max_area": request.max_area,
        "seed": request.seed,
        "note": "random weights: drift of this network's latents, not a quality measure",
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = ["| variant | rel. L2 of final latents vs exact | steps skipped per clip | seconds | ran as |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | — | — | — | {r['error']} |")
            continue
        ran = f"fp8: {r['fp8']}; attention: {r['attention_8bit']}; step cache: {r['step_cache'] or 'off'}"
        lines.append(f"| {r['variant']} | {r['rel_l2']:.3g} | {r['skipped_steps']} of {report['steps']} | "
                     f"{r['seconds']:.1f} | {ran} |")
    return "\n".join(lines)


def _gpu_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([ahlbv]\d{2,3}|rtx\s?\d{4})\b", name)
    return (m.group(1) if m else name).replace(" ", "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["tiny", "full"], default="tiny",
                    help="random checkpoint to write when --wan-dir is not given")
    ap.add_argument("--wan-dir", type=Path, default=None, help="an existing Wan2.2-S2V folder (kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the random checkpoint (deleted after)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-area", type=int, default=480 * 832)
    ap.add_argument("--infer-frames", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=1.0, help="audio length (1 s = one clip)")
    ap.add_argument("--step-cache", type=float, default=FAST_STEP_CACHE_THRESHOLD)
    ap.add_argument("--variants", default=",".join(variants()), help="comma-separated subset of the variants")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)

    tmp = None
    wan_dir = args.wan_dir
    if wan_dir is None:
        from storystudio.synthetic.wan_s2v import write_wan_s2v_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="drift-", dir=args.workdir))
        wan_dir = tmp / "Wan2.2-S2V-14B"
        write_wan_s2v_checkpoint(wan_dir, args.profile, device=args.device)
    try:
        engine = WanS2VGenerator.from_pretrained(wan_dir, device=device)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # loaded: the files are not needed any more

    rng = np.random.default_rng(0)
    request = VideoRequest(
        image=Image.fromarray(rng.integers(0, 255, (480, 832, 3), dtype=np.uint8)),
        audio=(0.1 * rng.standard_normal(int(16000 * args.seconds))).astype(np.float32),
        prompt="a person talking to the camera", max_area=args.max_area, infer_frames=args.infer_frames,
        steps=args.steps, seed=args.seed,
    )
    chosen = {k: v for k, v in variants(args.step_cache).items() if k in args.variants.split(",")}
    report = drift_report(engine, request, runs=chosen)
    report.update(profile=args.profile if args.wan_dir is None else str(args.wan_dir), torch=torch.__version__,
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{dt.date.today().isoformat()}-{_gpu_slug(device)}-video-fast-drift.json"
    path.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"\nwritten: {path}")
    report["path"] = str(path)
    return report


if __name__ == "__main__":
    main()
