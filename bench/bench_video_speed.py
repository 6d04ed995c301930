"""Talking-video speed on one GPU: baseline vs exact vs fast, measured side by side (issue 10).

One process, one loaded model; the engine's options are switched between runs (no reload):

* ``steps``: per resolution (480p = 448x832, 720p; one 80-frame clip, 77 frames of audio),
  per path: the seconds of one CFG step (the DiT calls of one denoising step, timed one by
  one with a device sync; the first step is the warm-up and, on the exact path, the cold
  compile), and the peak VRAM of the denoising loop. ``compile_cold_s`` = exact's first
  step minus its steady step; ``compile_warm_s`` = the same in a new process that reads the
  compile cache this run wrote (a subprocess, started after this process freed the GPU).
  The attention self-check's per-backend timings are recorded too. All paths start from the
  same inputs and seed, so ``exact_vs_baseline_drift`` (relative L2 of the final latents; bf16
  kernel differences only) checks on the GPU that the exact path computes the same video, and
  ``fast_vs_exact_drift`` is the fast knobs' drift over the timed steps.
* ``short``: a line shorter than one clip (3 s: one 52-frame clip) at 480p on the exact path,
  compiled (the other-length graph of compile.py, after a 1-step full clip as a worker's
  warm-up would run) and eager: ``exact_short_cfg_step_s``, ``exact_short_eager_cfg_step_s``,
  ``short_compiled_speedup``, and the compiled-vs-eager drift. Before the scenes in ``all``,
  so the scenes' clips (84 frames) find that graph compiled.
* ``scenes``: one 5 s scene end to end through ``Worker.handle`` (data-URI inputs, local
  storage) at the default 40 steps, exact and fast, with the job's peak VRAM on a GPU.

``fast`` is the opt-in preset (``"preset": "fast"``: FP8 linears, 8-bit attention where it
passes its check, step cache) on top of the exact path. Its per-step figure is the time of a
*computed* step: the step cache never skips within the first and last two steps, so with a few
timed steps it cannot show; its effect is in ``scene_5s_480p_fast_s`` (40 steps) and
``scene_5s_480p_fast_skipped_steps``. Where the preset's code is missing the fast rows are
skipped and ``fast_note`` says why.

GPU (10 minutes per command; split like this)::

    python bench/bench_video_speed.py --parts steps --resolutions 480p --out $OUT
    python bench/bench_video_speed.py --parts steps --resolutions 720p --no-warm-compile --out $OUT
    python bench/bench_video_speed.py --parts scenes --out $OUT

Each run writes ``<out>/<date>-<gpu>-video-speed.json`` (merged into an existing file of that
name) and prints a table. ``--profile tiny --device cpu`` runs the same code in minutes on
a CPU (tiny shapes, compile through ``aot_eager``). Random weights: only time and memory mean
anything; outputs are noise.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as _dt
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.config import WorkerSettings  # noqa: E402
from storystudio.errors import CheckpointError  # noqa: E402
from storystudio.media import encode_audio, encode_png, synth_speech  # noqa: E402
from storystudio.models.checkpoints.wan_s2v import validate_wan_s2v  # noqa: E402
from storystudio.models.compile import COMPILE_CACHE_DIRNAME  # noqa: E402
from storystudio.models.footprint import video_working_bytes  # noqa: E402
from storystudio.models.model_manager import GiB, ModelManager  # noqa: E402
from storystudio.models.video_generator import VideoRequest, WanS2VGenerator  # noqa: E402
from storystudio.models.video_path import VideoPathOptions  # noqa: E402
from storystudio.render import VIDEO_SET  # noqa: E402
from storystudio.storage import StorageSettings  # noqa: E402
from storystudio.synthetic.wan_s2v import write_wan_s2v_checkpoint  # noqa: E402
from storystudio.worker import Worker  # noqa: E402
from bench.video_fast_drift import relative_l2  # noqa: E402

log = logging.getLogger("bench.video_speed")

PATHS = ("baseline", "exact", "fast")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark resolution: the reference image size (its aspect picks the output size) and area."""

    image_wh: tuple[int, int]
    max_area: int


PROFILES: dict[str, dict[str, Any]] = {
    # Official sizes: 480p -> 448x832 and 720p -> 704x1280 from a 16:9 reference; 80-frame clips.
    "full": {"shapes": {"480p": Shape((832, 448), 480 * 832), "720p": Shape((1280, 720), 720 * 1280)},
             "infer_frames": 80, "scene_steps": 40, "scene_seconds": 5.0, "short_clip_frames": 52,
             "compile_backend": "inductor"},
    "tiny": {"shapes": {"480p": Shape((80, 48), 64 * 64), "720p": Shape((128, 72), 96 * 96)},
             "infer_frames": 16, "scene_steps": 2, "scene_seconds": 0.75, "short_clip_frames": 8,
             "compile_backend": "aot_eager"},
}


# ----------------------------------------------------------------------------- helpers
def gpu_slug(device: torch.device) -> str:
    """``h100``, ``h200``, ``a100``... from the device name; ``cpu`` on the CPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_support() -> str | None:
    """None when the fast preset exists in this checkout, else why not (its rows are then skipped)."""
    try:
        from storystudio.fast_preset import SpeedKnobs  # noqa: F401
        from storystudio.models import speed  # noqa: F401
    except ImportError as exc:
        return f"fast preset code not present: {exc}"
    if "speed" not in {f.name for f in dataclasses.fields(VideoRequest)}:
        return "fast preset code not present: VideoRequest has no 'speed' field"
    return None


def request_for(path: str, req: VideoRequest, device: torch.device) -> VideoRequest:
    """The job's request on ``path``: fast = the ``"preset": "fast"`` knobs resolved for this device."""
    if path != "fast":
        return req
    from storystudio.fast_preset import SpeedKnobs
    from storystudio.models import speed

    return replace(req, speed=speed.resolve_plan(SpeedKnobs.resolve("fast"), device))


def run_on_manager(manager: ModelManager, req: VideoRequest):
    """What a video job does: through the ModelManager (the fast path builds its FP8 copy first)."""
    area = req.max_area
    work = video_working_bytes(area, req.infer_frames)
    if fast_support() is None:
        from storystudio.models import speed

        return speed.run_video(manager, VIDEO_SET, req, working_bytes=work)
    return manager.run(VIDEO_SET, lambda engine: engine.generate(req), working_bytes=work)


def options_for(path: str, compile_backend: str) -> VideoPathOptions:
    if path == "baseline":
        return VideoPathOptions.baseline()
    return VideoPathOptions(compile="on", compile_backend=compile_backend)


class DenoiseWrapper:
    """Replaces ``engine._denoise`` for a ``with`` block and puts back what was there (another
    wrapper when nested, else the class method)."""

    def __init__(self, engine: WanS2VGenerator) -> None:
        self.engine = engine
        self._real = engine._denoise
        self._nested = "_denoise" in engine.__dict__

    def __exit__(self, *exc: object) -> None:
        if self._nested:
            self.engine._denoise = self._real
        else:
            del self.engine._denoise


class StepTimer(DenoiseWrapper):
    """Wraps ``engine._denoise`` so that each DiT call (one CFG step) is timed, per clip, and (with
    ``peak``) the denoising loop's peak VRAM read; a whole job's peak is read by its caller."""

    def __init__(self, engine: WanS2VGenerator, *, peak: bool = True) -> None:
        super().__init__(engine)
        self.step_s: list[float] = []
        self.clip_step_s: list[list[float]] = []
        self.peak = peak
        self.peak_gib: float | None = None

    def __enter__(self) -> StepTimer:
        device = self.engine.device

        def denoise(latents, timesteps, scheduler, call_model, generator):
            clip: list[float] = []
            self.clip_step_s.append(clip)

            def timed(x, t, i):
                sync(device)
                t0 = time.perf_counter()
                out = call_model(x, t, i)
                sync(device)
                clip.append(time.perf_counter() - t0)
                self.step_s.append(clip[-1])
                return out

            if self.peak and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = self._real(latents, timesteps, scheduler, timed, generator)
            if self.peak and device.type == "cuda":
                self.peak_gib = torch.cuda.max_memory_allocated(device) / GiB
            return out

        self.engine._denoise = denoise
        return self


def measure_steps(manager: ModelManager, req: VideoRequest, path: str, compile_backend: str,
                  options: VideoPathOptions | None = None) -> dict[str, Any]:
    """One single-clip generation on ``path`` (or ``options``): per-step seconds, steady CFG step, peak VRAM."""
    engine = manager.ensure(VIDEO_SET)
    engine.options = options or options_for(path, compile_backend)
    with StepTimer(engine) as timer, LatentRecorder(engine) as rec:
        t0 = time.perf_counter()
        result = run_on_manager(manager, request_for(path, req, engine.device))
        wall = time.perf_counter() - t0
    steps = timer.step_s
    steady = float(np.mean(steps[1:])) if len(steps) > 1 else steps[0]
    return {"step_s": [round(s, 4) for s in steps], "cfg_step_s": round(steady, 4),
            "first_step_s": round(steps[0], 4), "peak_gib": None if timer.peak_gib is None else round(timer.peak_gib, 2),
            "generate_s": round(wall, 3), "size": f"{result.width}x{result.height}", "engine": result.engine,
            "speed": result.speed, "latents": rec.latents}


def steps_request(shape: Shape, infer_frames: int, steps: int, clip_frames: int | None = None) -> VideoRequest:
    """One clip of ``clip_frames`` (default: a full clip): ``clip_frames - 3`` frames of audio (the first
    clip drops 3)."""
    rng = np.random.default_rng(0)
    w, h = shape.image_wh
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    seconds = ((clip_frames or infer_frames) - 3) / 16
    audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
    return VideoRequest(image=image, audio=audio, prompt="a person talking", max_area=shape.max_area,
                        infer_frames=infer_frames, steps=steps, guidance=4.5, seed=1)


def ensure_checkpoint(wan_dir: Path, profile: str, device: str, res: dict[str, Any]) -> None:
    """Reuse a valid checkpoint (a warm machine keeps its files), else write one with random weights."""
    try:
        validate_wan_s2v(wan_dir)
        res.setdefault("wan_write_s", 0.0)
        log.info("reusing the checkpoint at %s", wan_dir)
        return
    except CheckpointError:
        pass
    shutil.rmtree(wan_dir, ignore_errors=True)
    t0 = time.perf_counter()
    write_wan_s2v_checkpoint(wan_dir, profile, device=device)
    res["wan_write_s"] = round(time.perf_counter() - t0, 1)


def pick_workdir(preferred: Path | None, need_gib: float) -> Path:
    """``preferred``, else the first of /dev/shm, /tmp, /root, /var/tmp with room for the checkpoint."""
    cands = [preferred] if preferred else []
    cands += [Path("/dev/shm/ss-video-speed"), Path(tempfile.gettempdir()) / "ss-video-speed",
              Path("/root/ss-video-speed"), Path("/var/tmp/ss-video-speed")]
    for cand in cands:
        try:
            cand.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(cand).free / GiB >= need_gib or (cand / "Wan2.2-S2V-14B").is_dir():
                return cand
        except OSError:
            continue
    raise SystemExit(f"no folder with {need_gib} GiB free for the checkpoint")


# ----------------------------------------------------------------------------- parts
def run_steps(manager: ModelManager, args: argparse.Namespace, prof: dict[str, Any], res: dict[str, Any],
              dump) -> None:
    fast_note = fast_support()
    if fast_note:
        res["fast_note"] = fast_note
    for label in args.resolutions:
        suffix = "" if label == "480p" else f"_{label}"
        req = steps_request(prof["shapes"][label], prof["infer_frames"], args.steps)
        latents: dict[str, list[torch.Tensor]] = {}
        for path in args.paths:
            if path == "fast" and fast_note:
                continue
            log.info("steps: %s on the %s path", label, path)
            try:
                m = measure_steps(manager, req, path, prof["compile_backend"])
            except Exception as exc:  # noqa: BLE001 - one failing path must not cost the others' figures
                log.exception("steps: %s on the %s path failed", label, path)
                res[f"{path}_error{suffix}"] = f"{type(exc).__name__}: {exc}"[:1000]
                dump()
                gc.collect()
                if manager.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            latents[path] = m.pop("latents")
            res[f"{path}_cfg_step_s{suffix}"] = m["cfg_step_s"]
            res[f"{path}_peak_gib{suffix}"] = m["peak_gib"]
            res.setdefault("steps_detail", {})[f"{path}{suffix}"] = m
            if path == "exact" and m["engine"].get("compiled"):
                res[f"compile_cold_s{suffix}"] = round(m["first_step_s"] - m["cfg_step_s"], 2)
            dump()
        base, exact = res.get(f"baseline_cfg_step_s{suffix}"), res.get(f"exact_cfg_step_s{suffix}")
        if base and exact:
            res[f"exact_speedup{suffix}"] = round(base / exact, 3)
        if base and res.get(f"fast_cfg_step_s{suffix}"):
            res[f"fast_speedup{suffix}"] = round(base / res[f"fast_cfg_step_s{suffix}"], 3)
        # Same inputs and seed on every path: the exact path must land where the baseline does
        # (float tolerance; the GPU's bf16 kernels differ), the fast path's drift is its knobs'.
        if "baseline" in latents and "exact" in latents:
            res[f"exact_vs_baseline_drift{suffix}"] = scene_drift(latents["exact"], latents["baseline"])
        if "exact" in latents and "fast" in latents:
            res[f"fast_vs_exact_drift{suffix}"] = scene_drift(latents["fast"], latents["exact"])
        dump()


def run_short(manager: ModelManager, args: argparse.Namespace, prof: dict[str, Any], res: dict[str, Any],
              dump) -> None:
    """A line shorter than one clip (3 s at the full profile: one 52-frame clip) on the exact path,
    compiled and eager, at 480p. Such a clip runs on the other-length graph (compile.py); a
    1-step full clip first stands for a worker that has run one (or its warm-up), as in
    production. ``exact_short_first_step_s`` holds that graph's compile (cold unless the cache
    was kept)."""
    shape, infer = prof["shapes"]["480p"], prof["infer_frames"]
    frames = prof["short_clip_frames"]
    res["short_clip_frames"] = frames
    compiled_opts = options_for("exact", prof["compile_backend"])
    try:
        measure_steps(manager, steps_request(shape, infer, 1), "exact", prof["compile_backend"])
        req = steps_request(shape, infer, args.steps, clip_frames=frames)
        runs = {"compiled": measure_steps(manager, req, "exact", prof["compile_backend"], compiled_opts),
                "eager": measure_steps(manager, req, "exact", prof["compile_backend"],
                                       replace(compiled_opts, compile="off"))}
    except Exception as exc:  # noqa: BLE001 - a failure is a finding; the other parts still run
        log.exception("short clip failed")
        res["short_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        dump()
        return
    latents = {k: m.pop("latents") for k, m in runs.items()}
    res["short_detail"] = runs
    c, e = runs["compiled"], runs["eager"]
    res.update(exact_short_cfg_step_s=c["cfg_step_s"], exact_short_first_step_s=c["first_step_s"],
               exact_short_eager_cfg_step_s=e["cfg_step_s"], exact_short_peak_gib=c["peak_gib"],
               exact_short_eager_peak_gib=e["peak_gib"],
               short_compiled_speedup=round(e["cfg_step_s"] / c["cfg_step_s"], 3),
               short_compiled_vs_eager_drift=scene_drift(latents["compiled"], latents["eager"]))
    dump()


def run_warm_compile(args: argparse.Namespace, wan_dir: Path, res: dict[str, Any]) -> None:
    """A new process loads the model and runs the exact path once more: its first step reads the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "warm.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-warm-compile", "--profile", args.profile,
               "--device", args.device, "--wan-dir", str(wan_dir), "--child-out", str(out),
               "--resolutions", args.resolutions[0]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        res["warm_process_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0 or not out.exists():
            res["compile_warm_error"] = proc.stderr[-2000:]
            log.error("warm-compile child failed: %s", proc.stderr[-2000:])
            return
        child = json.loads(out.read_text())
    res["compile_warm_s"] = child["compile_warm_s"]
    res["compile_warm_detail"] = child


def child_warm_compile(args: argparse.Namespace) -> None:
    prof = PROFILES[args.profile]
    manager = ModelManager(args.device)
    manager.register(VIDEO_SET, lambda device: WanS2VGenerator.from_pretrained(
        args.wan_dir, device=device, options=options_for("exact", prof["compile_backend"])))
    req = steps_request(prof["shapes"][args.resolutions[0]], prof["infer_frames"], 2)
    m = measure_steps(manager, req, "exact", prof["compile_backend"])
    m.pop("latents")
    m["compile_warm_s"] = round(m["first_step_s"] - m["cfg_step_s"], 2)
    m["inductor_cache"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    Path(args.child_out).write_text(json.dumps(m))


def scene_job(job_id: str, prof: dict[str, Any], shape: Shape, preset: str | None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    w, h = shape.image_wh
    png = encode_png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    wav = encode_audio(synth_speech(prof["scene_seconds"], seed=1), "wav")
    inp: dict[str, Any] = {
        "task": "video", "image": "data:image/png;base64," + base64.b64encode(png).decode(),
        "audio": "data:audio/wav;base64," + base64.b64encode(wav).decode(), "prompt": "a person talking",
        "max_area": shape.max_area, "infer_frames": prof["infer_frames"], "steps": prof["scene_steps"], "seed": 1,
    }
    if preset:
        inp["preset"] = preset
    return {"id": job_id, "input": inp}


class LatentRecorder(DenoiseWrapper):
    """Keeps each clip's final latents (a CPU copy) while a job runs: the paths' drift."""

    def __init__(self, engine: WanS2VGenerator) -> None:
        super().__init__(engine)
        self.latents: list[torch.Tensor] = []

    def __enter__(self) -> LatentRecorder:
        def denoise(*args, **kwargs):
            out = self._real(*args, **kwargs)
            self.latents.append(out.detach().float().cpu())
            return out

        self.engine._denoise = denoise
        return self


def scene_drift(got: list[torch.Tensor], want: list[torch.Tensor]) -> float | None:
    """The drift report's relative L2 over all clips; None when the two scenes' clip plans differ."""
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return None
    return round(relative_l2(got, want), 4)


def attention_8bit_check(device: torch.device, heads: int, head_dim: int, tokens: int) -> dict[str, Any]:
    """The 8-bit kernel the fast preset uses, and every importable candidate (chosen or refused),
    against exact SDPA at the DiT's real attention shape: error and milliseconds side by side."""
    from storystudio.models import attention8

    status = attention8.attention8_status(device)
    out: dict[str, Any] = {"available": status.available, "kernel": status.kernel, "detail": status.detail}
    if device.type != "cuda":
        return out
    shape = (1, tokens, heads, head_dim)
    g = torch.Generator(device="cpu").manual_seed(2)
    q, k, v = (torch.randn(*shape, generator=g).to(device, torch.bfloat16) for _ in range(3))
    want = attention8._exact_nhd(q, k, v).float()
    out.update(shape=list(shape), exact_ms=round(attention8.time_kernel(attention8._exact_nhd, device, shape), 2))
    candidates: dict[str, Any] = {}
    for name, loader in attention8._loaders().items():
        kernel, detail = loader()
        if kernel is None:
            candidates[name] = {"loaded": False, "detail": detail}
            continue
        try:
            got = kernel(q, k, v, tensor_layout="NHD", is_causal=False).float()
            candidates[name] = {"loaded": True, "detail": detail,
                                "rel_error": round(float((got - want).norm() / want.norm()), 4),
                                "ms": round(attention8.time_kernel(kernel, device, shape), 2)}
            del got
        except Exception as exc:  # noqa: BLE001 - a refused or failing kernel is a finding, not a crash
            candidates[name] = {"loaded": True, "detail": detail, "error": f"{type(exc).__name__}: {exc}"[:300]}
    out["candidates"] = candidates
    if status.available and status.kernel in candidates:
        out.update({k: candidates[status.kernel].get(k) for k in ("rel_error", "ms")})
    del q, k, v, want
    return out


def run_scenes(worker: Worker, args: argparse.Namespace, prof: dict[str, Any], res: dict[str, Any], dump) -> None:
    fast_note = fast_support()
    if fast_note:
        res["fast_note"] = fast_note
    shape = prof["shapes"]["480p"]
    latents: dict[str, list[torch.Tensor]] = {}
    for path in ("exact", "fast"):
        if path not in args.paths or (path == "fast" and fast_note):
            continue
        engine = worker.manager.ensure(VIDEO_SET)
        engine.options = options_for(path, prof["compile_backend"])
        log.info("scene: 5 s at 480p on the %s path", path)
        cuda = engine.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)
        t0 = time.perf_counter()
        with StepTimer(engine, peak=False) as timer, LatentRecorder(engine) as rec:
            r = worker.handle(scene_job(f"scene-{path}", prof, shape, "fast" if path == "fast" else None))
        wall = time.perf_counter() - t0
        if cuda:  # the whole job's peak (weights included, as the steps' peaks), VAE decode and all
            res[f"scene_5s_480p_{path}_peak_gib"] = round(torch.cuda.max_memory_allocated(engine.device) / GiB, 2)
        latents[path] = rec.latents
        if "error" in r:
            res[f"scene_5s_480p_{path}_error"] = r["error"]
            log.error("scene on %s failed: %s", path, r["error"])
            continue
        res[f"scene_5s_480p_{path}_s"] = round(wall, 2)
        detail = res.setdefault("scenes_detail", {})[path] = {k: r.get(k) for k in (
            "frames", "fps", "width", "height", "num_clips", "duration_s", "audio_duration_s", "timings", "engine",
            "speed")}
        # Per clip: its frames, steps, first step (a compile shows there) and median step; a step the
        # cache reused is short, so the median is of the steps that ran the DiT only while most did.
        detail["clips"] = [{"frames": frames, "steps": len(steps), "first_step_s": round(steps[0], 3),
                            "median_step_s": round(float(np.median(steps)), 3), "total_step_s": round(sum(steps), 2)}
                           for frames, steps in zip(r["engine"]["clip_frames"], timer.clip_step_s) if steps]
        if r.get("speed"):
            res[f"scene_5s_480p_{path}_skipped_steps"] = r["speed"].get("skipped_steps")
        if path == "fast" and "exact" in latents:
            # The whole preset's drift at the default steps: relative L2 of the final latents.
            res["scene_5s_480p_fast_drift"] = scene_drift(latents["fast"], latents["exact"])
        dump()


# ----------------------------------------------------------------------------- main
def print_table(res: dict[str, Any]) -> None:
    print(f"\nvideo speed on {res.get('gpu', res.get('device'))}, torch {res.get('torch')}, "
          f"attention {res.get('attention_backend')}")
    print("\n| metric | 480p | 720p |\n|---|---|---|")
    for key in ("baseline_cfg_step_s", "exact_cfg_step_s", "fast_cfg_step_s", "exact_speedup", "fast_speedup",
                "baseline_peak_gib", "exact_peak_gib", "fast_peak_gib", "compile_cold_s", "exact_vs_baseline_drift",
                "fast_vs_exact_drift"):
        a, b = res.get(key), res.get(f"{key}_720p")
        if a is None and b is None:
            continue
        print(f"| {key} | {'' if a is None else a} | {'' if b is None else b} |")
    print("\n| metric | value |\n|---|---|")
    for key in ("compile_warm_s", "scene_5s_480p_exact_s", "scene_5s_480p_fast_s", "scene_5s_480p_exact_peak_gib",
                "scene_5s_480p_fast_peak_gib", "scene_5s_480p_fast_skipped_steps",
                "scene_5s_480p_fast_drift", "short_clip_frames", "exact_short_cfg_step_s",
                "exact_short_first_step_s", "exact_short_eager_cfg_step_s", "short_compiled_speedup",
                "short_compiled_vs_eager_drift", "attention_8bit_check", "fast_note"):
        if key in res:
            print(f"| {key} | {res[key]} |")
    checks = (res.get("attention_selfcheck") or {}).get("checks") or {}
    if checks:
        print("\n| attention candidate | ok | rel. error | ms | note |\n|---|---|---|---|---|")
        for name, c in checks.items():
            print(f"| {name} | {c['ok']} | {c['rel_error']} | {c['ms']} | {c['note'][:60]} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", choices=["steps", "short", "scenes", "all"], default="all")
    ap.add_argument("--resolutions", type=lambda s: s.split(","), default=["480p", "720p"])
    ap.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS))
    ap.add_argument("--steps", type=int, default=3, help="denoising steps per timed run (first = warm-up)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint is written (or reused)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--no-warm-compile", action="store_true", help="skip the warm-compile subprocess")
    ap.add_argument("--keep-compile-cache", action="store_true", help="do not clear the cache first (cold = warm)")
    ap.add_argument("--child-timeout", type=int, default=300)
    ap.add_argument("--child-warm-compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--wan-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for r in args.resolutions:
        if r not in ("480p", "720p"):
            ap.error(f"unknown resolution {r!r}")
    for p in args.paths:
        if p not in PATHS:
            ap.error(f"unknown path {p!r}")
    if args.child_warm_compile:
        child_warm_compile(args)
        return {}

    device = torch.device(args.device)
    prof = PROFILES[args.profile]
    slug = gpu_slug(device)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"{_dt.date.today().isoformat()}-{slug}-video-speed.json"
    res: dict[str, Any] = json.loads(out_file.read_text()) if out_file.exists() else {}
    res.update({"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "gpu_slug": slug,
                "device": str(device), "torch": torch.__version__, "profile": args.profile,
                "infer_frames": prof["infer_frames"], "timed_steps": args.steps})
    res.setdefault("commands", []).append(" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])))

    def dump() -> None:
        out_file.write_text(json.dumps(res, indent=2, default=str))

    workdir = pick_workdir(args.workdir, need_gib=50 if args.profile == "full" else 1)
    wan_dir = workdir / "Wan2.2-S2V-14B"
    ensure_checkpoint(wan_dir, args.profile, args.device, res)
    cache = workdir / COMPILE_CACHE_DIRNAME
    if not args.keep_compile_cache and args.parts in ("steps", "short", "all"):
        shutil.rmtree(cache, ignore_errors=True)  # a cold compile must really be cold
    dump()

    settings = replace(
        WorkerSettings.from_env({"STORYSTUDIO_DEVICE": args.device, "STORYSTUDIO_MODELS_DIR": str(workdir)}),
        storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(workdir / "output")}),
        video_path=options_for("exact", prof["compile_backend"]),
    )
    worker = Worker.from_settings(settings)
    t0 = time.perf_counter()
    engine = worker.manager.ensure(VIDEO_SET)  # loads once; the attention self-check runs here
    res["wan_load_s"] = round(time.perf_counter() - t0, 1)
    assert engine.attention is not None
    res["attention_backend"] = engine.attention.backend
    res["attention_selfcheck"] = engine.attention.as_dict()
    if "fast" in args.paths and fast_support() is None:
        cfg = engine.transformer.config
        heads = int(cfg["num_heads"])
        tokens = 32768 if args.profile == "full" else 256
        res["attention_8bit_check"] = attention_8bit_check(torch.device(args.device), heads,
                                                           int(cfg["dim"]) // heads, tokens)
    dump()

    if args.parts in ("steps", "all"):
        run_steps(worker.manager, args, prof, res, dump)
    if args.parts in ("short", "all") and "exact" in args.paths:
        run_short(worker.manager, args, prof, res, dump)
    if args.parts in ("scenes", "all"):
        run_scenes(worker, args, prof, res, dump)
    if args.parts in ("steps", "all") and not args.no_warm_compile and "exact" in args.paths:
        del engine, worker  # the child needs the GPU memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run_warm_compile(args, wan_dir, res)
    dump()
    print_table(res)
    print(f"\nwrote {out_file}")
    return res


if __name__ == "__main__":
    main()
