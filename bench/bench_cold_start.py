"""A fresh worker, measured: start-up, cold and cached loads, first vs steady jobs and swaps, and loaders.

Every measurement that is about a *fresh* worker runs in a new Python process
started by this script (the parent only writes checkpoints, drops page caches and
collects results):

* ``worker`` child — the page cache of every weight file is dropped first
  (``posix_fadvise(POSIX_FADV_DONTNEED)`` after ``fdatasync``), then the child does
  what ``handler.py`` does with ``STORYSTUDIO_PREWARM=both``: imports, finds the
  models, pre-flight, loads and warms up both sets → ``process_start_to_ready_s``
  (from the parent's spawn). Then ``first_image_s`` and ``steady_image_s`` (median of
  the next ones), ``first_video_s`` / ``steady_video_s``, and, with a VRAM budget
  that holds one set only, ``first_swap_fresh_worker_s`` (the first time the
  process moves the sets: restore Wan, park Z-Image) and ``steady_swap_s``;
* ``load`` child per set — ``load_<set>_set_cold_s`` (page cache dropped; the
  fraction of the files still cached is recorded, via ``mincore``) and
  ``load_<set>_set_cached_s`` (files read once before), through the production
  ModelManager with parking buffers (pin while loading);
* ``compare`` child — the same bytes onto the device by each loader, cold and
  cached: the Wan DiT shards with today's ``safetensors.safe_open(device=...)``, the
  production reader into a pinned parking buffer, the production reader through its
  staging ring, ``fastsafetensors`` and ``runai-model-streamer`` when importable; the
  Z-Image transformer (float32 files, bf16 weights) with diffusers'
  ``from_pretrained(device_map=...)`` and the production reader.

The compiled DiT blocks are cached in ``<workdir>/compile-cache``: a first run measures a
worker on a fresh volume (cold compiles), a re-run one whose volume already holds them.

Writes ``<out>/<date>-<gpu>-cold-start.json`` and prints a table. Random weights
(profile ``full`` = the real sizes): timings only.

GPU: ``python bench/bench_cold_start.py --profile full --device cuda --workdir /tmp/ssc --out $OUT``. The
checkpoints must sit on a real disk (not tmpfs: ``/dev/shm`` cannot be made cold): ~78 GB with the
release's float32 Z-Image transformer, ~62 GB with ``--zimage-transformer-dtype bfloat16``.
``fastsafetensors`` and ``runai-model-streamer`` are compared when importable (bench-only, not
requirements of the worker).
CPU smoke test of the same code: ``python bench/bench_cold_start.py --profile tiny --device cpu --out /tmp/x``.
Targets (H100): ``first_swap_fresh_worker_s`` ≤ 1.5 s; ``first_image_s`` ≤ 1.5 × ``steady_image_s``.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import datetime
import gc
import json
import logging
import mmap
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("bench.cold_start")
GiB = 1024**3


# ----------------------------------------------------------------------------- page cache


def weight_files(folder: Path) -> list[Path]:
    return sorted(p.resolve() for p in folder.rglob("*") if p.is_file())


def drop_cache(files: list[Path]) -> None:
    """Flush and evict the files from the page cache (clean pages only can be dropped)."""
    from storystudio.models.weight_loader import drop_page_cache

    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    drop_page_cache(files)


def warm_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def prepare_cache(files: list[Path], mode: str) -> float | None:
    """Make ``files`` cold (dropped from the page cache) or cached (read once); returns the resident fraction."""
    if mode == "cold":
        drop_cache(files)
    else:
        warm_cache(files)
    return resident_fraction(files)


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (``mincore``); None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    total = cached = 0
    for f in files:
        size = f.stat().st_size
        if size == 0:
            continue
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                buf = (ctypes.c_char * size).from_buffer(mm)
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
                    return None
                cached += sum(v & 1 for v in vec)
                total += pages
                del buf
            finally:
                mm.close()
    return cached / total if total else None


# ----------------------------------------------------------------------------- helpers


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_slug(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    m = re.search(r"\b(h100|h200|h20|a100|a10g?|l40s|l40|l4|b200|b100|gh200|rtx ?pro ?6000|rtx ?\d{4})\b", name)
    return re.sub(r"[^a-z0-9]+", "", m.group(1)) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def settings_for(args, *, prewarm=(), budget_gib=None):
    from storystudio.config import WorkerSettings
    from storystudio.storage import StorageSettings

    base = WorkerSettings.from_env({"STORYSTUDIO_DEVICE": args.device})
    tiny = args.profile == "tiny"
    return replace(
        base,
        zimage_dir=args.zimage_dir,
        wan_dir=args.wan_dir,
        prewarm=tuple(prewarm),
        vram_budget_gib=budget_gib,
        warmup_image=(256, 256) if tiny else (1024, 1024),
        warmup_video=(64, 64, 16) if tiny else (832, 480, 80),
        storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(args.workdir / "output")}),
        compile_cache_dir=args.workdir / "compile-cache",  # a fresh worker on a fresh volume: cold compiles
    )


def image_job(args, i: int) -> dict:
    size = {"width": 256, "height": 256, "steps": 2} if args.profile == "tiny" else \
        {"width": 1024, "height": 1024, "steps": 8}
    return {"id": f"img-{i}", "input": {"task": "image", "prompt": f"a lighthouse keeper, take {i}", "seed": i,
                                        **size}}


def video_job(args, i: int) -> dict:
    from PIL import Image

    from storystudio.media import encode_audio, encode_png, synth_speech

    tiny = args.profile == "tiny"
    w, h = (64, 64) if tiny else (832, 480)
    png = encode_png(Image.new("RGB", (w, h), (90, 120, 150)))
    audio = encode_audio(synth_speech(0.5 if tiny else 1.0, seed=i), "wav")  # one clip either way
    params = {"max_area": 64 * 64, "infer_frames": 16} if tiny else {"resolution": "480p"}
    return {"id": f"vid-{i}", "input": {
        "task": "video", "image": base64.b64encode(png).decode(), "seed": i, "steps": args.video_steps,
        "audio": "data:audio/wav;base64," + base64.b64encode(audio).decode(), **params}}


def timed(fn, *a, **kw) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- children


def child_worker(args, spawned_at: float) -> dict:
    """A fresh worker: ready time, first vs steady images and videos, first vs steady swaps."""
    t_main = time.time()
    import torch

    from storystudio.models.footprint import video_working_bytes
    from storystudio.worker import Worker

    t_imported = time.time()
    device = torch.device(args.device)
    worker = Worker.from_settings(settings_for(args, prewarm=("image", "video")))
    worker.prewarm()
    sync(worker.manager.device)
    ready = time.time()
    res: dict = {
        "process_start_to_ready_s": ready - spawned_at,
        "ready_breakdown_s": {"interpreter_start": t_main - spawned_at, "imports": t_imported - t_main,
                              **{k: round(v, 3) for k, v in worker.startup_seconds.items()}},
        "preflight": worker.preflight.as_dict() if worker.preflight else None,
    }
    for name in ("image", "video"):
        if not worker.manager.is_loaded(name):
            raise RuntimeError(f"pre-warming {name} failed; see the log")

    def job(j: dict) -> float:
        r, dt = timed(worker.handle, j)
        if "error" in r:
            raise RuntimeError(f"{j['id']}: {r['error']}")
        return dt

    res["first_image_s"] = job(image_job(args, 0))
    steady = [job(image_job(args, i)) for i in range(1, args.rounds + 1)]
    res["steady_image_s"] = statistics.median(steady)
    res["image_runs_s"] = steady
    res["first_video_s"] = job(video_job(args, 0))
    steady = [job(video_job(args, i)) for i in range(1, args.video_rounds + 1)]
    res["steady_video_s"] = statistics.median(steady) if steady else None

    # One set at a time: the budget holds the larger set and a 480p clip, not both sets.
    mgr = worker.manager
    sizes = {ms: sum(c.nbytes for c in mgr._sets[ms].components) for ms in ("image", "video")}
    clip = video_working_bytes(480 * 832) if args.profile == "full" else 0
    mgr.budget_bytes = max(sizes.values()) + clip + (1 << 20)
    res["swap_budget_gib"] = mgr.budget_bytes / GiB
    res["set_gib"] = {k: v / GiB for k, v in sizes.items()}
    _, res["first_park_s"] = timed(mgr.ensure, "image")  # parks Wan (pure bookkeeping: its copy is in RAM)
    sync(mgr.device)
    before = mgr.stats()
    _, res["first_swap_fresh_worker_s"] = timed(mgr.ensure, "video")  # restores Wan, parks Z-Image
    sync(mgr.device)
    after = mgr.stats()
    res["first_swap_moved_gib"] = {"parked": after.parked_gib - before.parked_gib,
                                   "restored": after.restored_gib - before.restored_gib}
    to_video, to_image = [], []
    for _ in range(args.rounds):
        _, dt = timed(mgr.ensure, "image")
        to_image.append(dt)
        _, dt = timed(mgr.ensure, "video")
        to_video.append(dt)
    res["steady_swap_s"] = statistics.median(to_video)
    res["steady_swap_to_image_s"] = statistics.median(to_image)
    res["manager"] = mgr.stats().as_dict()
    if device.type == "cuda":
        res["peak_vram_gib"] = torch.cuda.max_memory_allocated() / GiB
    return res


def child_load(args, name: str) -> dict:
    """One set through the production ModelManager (parking buffers pinned while loading), cold then cached."""
    import torch

    from storystudio.preflight import run_preflight
    from storystudio.worker import ModelFolders, build_manager

    device = torch.device(args.device)
    folders = ModelFolders(settings_for(args))
    located = folders.get(name)
    files = weight_files(located.path)
    itemsize = 4 if device.type == "cpu" else 2
    # A budget holding this set only: parking is expected, so the parking buffers are made (the H100 case).
    budget_gib = (folders.weight_bytes(name, itemsize=itemsize) + (1 << 30)) / GiB
    settings = settings_for(args, budget_gib=budget_gib)
    report = run_preflight(device, budget_override_bytes=int(budget_gib * GiB), reserve_bytes=0, wan_bytes=None,
                           image_bytes=None)
    res: dict = {"files_gb": sum(f.stat().st_size for f in files) / 1e9}
    for mode in ("cold", "cached"):
        res[f"{mode}_resident_fraction"] = prepare_cache(files, mode)
        mgr = build_manager(settings, folders, report)
        mgr.ensure(name)
        sync(device)
        ms = mgr._sets[name]
        res[f"{mode}_s"] = ms.load_seconds
        res[f"{mode}_pinned_gib"] = mgr.stats().pinned_gib
        res["weights_gib"] = sum(c.nbytes for c in ms.components) / GiB
        for comp in ms.components:
            comp.release()
        del mgr, ms
        free_device(device)
    return res


def _meta_dit(wan_dir: Path, dtype):
    from storystudio.models.checkpoints.common import read_json
    from storystudio.models.checkpoints.wan_s2v import CONFIG_FILE, meta_transformer
    from storystudio.models.weight_files import bind, sharded_safetensors_sources

    module = meta_transformer(read_json(wan_dir / CONFIG_FILE))
    sources = bind(module, sharded_safetensors_sources(wan_dir, "diffusion_pytorch_model"), what="dit",
                   where="shards", dtype=dtype)
    return module, sources


def _meta_ztransformer(z_dir: Path, dtype):
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    from storystudio.models.weight_files import bind, sharded_safetensors_sources

    with init_empty_weights():
        module = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(z_dir / "transformer"))
    sources = bind(module, sharded_safetensors_sources(z_dir / "transformer", "diffusion_pytorch_model"),
                   what="z", where="transformer", dtype=dtype)
    return module, sources


def _ours(device, build, *, host: bool, threads: int):
    import torch

    from storystudio.models.host_memory import HostBuffer
    from storystudio.models.weight_loader import Layout, StagingRing, fill

    module, sources = build()
    layout = Layout(module)
    sources = layout.complete(sources)
    flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    pin = device.type == "cuda"
    if host:
        buf = HostBuffer("bench", layout.nbytes, layout.host_chunks(), device=device)
        fill(layout, sources, flat, host=buf, pin=pin, threads=threads)
        sync(device)
        buf.release()
    else:
        ring = StagingRing(pin=pin, device=device) if device.type == "cuda" else StagingRing(pin=False)
        fill(layout, sources, flat, ring=ring, threads=threads)
        sync(device)
        ring.buffer.release()
    return flat


def _safe_open(device, files, dtype):
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k).to(dtype)
    sync(device)
    return out


def _fastsafetensors(device, files):
    from fastsafetensors import SafeTensorsFileLoader

    loader = SafeTensorsFileLoader(None, str(device), nogds=True)
    loader.add_filenames({0: [str(f) for f in files]})
    fb = loader.copy_files_to_device()
    out = {k: fb.get_tensor(k) for k in loader.get_keys()}
    sync(device)
    fb.close()
    loader.close()
    return out


def _runai(device, files):
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(f) for f in files])
        for name, t in streamer.get_tensors():
            out[name] = t.to(device, non_blocking=True)
    sync(device)
    return out


def child_compare(args) -> dict:
    """The same files onto the device by each loader, cold and cached."""
    import importlib.util

    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # "cuda" has no index
        torch.empty(1, device=device)  # the context is not part of any loader's time
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Imports and class construction are not part of any loader's time: pay them once here.
    _meta_dit(args.wan_dir, dtype)
    _meta_ztransformer(args.zimage_dir, dtype)
    dit_files = sorted(p for p in args.wan_dir.glob("diffusion_pytorch_model-*.safetensors"))
    z_files = sorted((args.zimage_dir / "transformer").glob("*.safetensors"))
    groups = {
        "wan_dit": (dit_files, [
            ("safetensors.safe_open(device) [before]", lambda: _safe_open(device, dit_files, dtype)),
            ("storystudio: pinned parking buffer [production]",
             lambda: _ours(device, lambda: _meta_dit(args.wan_dir, dtype), host=True, threads=args.threads)),
            ("storystudio: staging ring, no parking buffer",
             lambda: _ours(device, lambda: _meta_dit(args.wan_dir, dtype), host=False, threads=args.threads)),
            ("fastsafetensors (nogds)", lambda: _fastsafetensors(device, dit_files)),
            ("runai-model-streamer", lambda: _runai(device, dit_files)),
        ]),
        "zimage_transformer": (z_files, [
            ("diffusers from_pretrained(device_map) [before]", lambda: _diffusers_z(device, args.zimage_dir, dtype)),
            ("storystudio: pinned parking buffer [production]",
             lambda: _ours(device, lambda: _meta_ztransformer(args.zimage_dir, dtype), host=True, threads=args.threads)),
        ]),
    }
    modules = {"fastsafetensors (nogds)": "fastsafetensors", "runai-model-streamer": "runai_model_streamer"}
    rows = []
    for group, (files, methods) in groups.items():
        gb = sum(f.stat().st_size for f in files) / 1e9
        for method, fn in methods:
            row: dict = {"files": group, "method": method, "files_gb": gb}
            mod = modules.get(method)
            if mod and importlib.util.find_spec(mod) is None:
                row["skipped"] = f"{mod} is not installed"
                rows.append(row)
                continue
            try:
                for mode in ("cold", "cached"):
                    row[f"{mode}_resident_fraction"] = prepare_cache(files, mode)
                    out, dt = timed(fn)
                    del out
                    free_device(device)
                    row[f"{mode}_s"] = dt
                    row[f"{mode}_gbps"] = gb / dt if dt > 0 else None
            except Exception as exc:  # noqa: BLE001 - a loader that fails here is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {exc}"
                free_device(device)
            rows.append(row)
    return {"loader_comparison": rows}


def _diffusers_z(device, z_dir: Path, dtype):
    from diffusers import ZImageTransformer2DModel

    kw = {"device_map": str(device)} if device.type != "cpu" else {}
    model = ZImageTransformer2DModel.from_pretrained(z_dir, subfolder="transformer", dtype=dtype, **kw)
    sync(device)
    return model


# ----------------------------------------------------------------------------- parent


def spawn(args, role: str, extra: list[str] | None = None) -> dict:
    out = args.workdir / f"child-{role}{'-' + extra[-1] if extra else ''}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role, "--result", str(out),
           "--spawned-at", repr(time.time()), *forward(args), *(extra or [])]
    log.info("fresh process: %s", " ".join(cmd[2:5]))
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def forward(args) -> list[str]:
    return ["--profile", args.profile, "--device", args.device, "--workdir", str(args.workdir),
            "--zimage-dir", str(args.zimage_dir), "--wan-dir", str(args.wan_dir), "--rounds", str(args.rounds),
            "--video-rounds", str(args.video_rounds), "--video-steps", str(args.video_steps),
            "--threads", str(args.threads)]


def ensure_checkpoints(args) -> dict:
    import torch

    from storystudio.errors import CheckpointError
    from storystudio.models.checkpoints.wan_s2v import validate_wan_s2v
    from storystudio.models.checkpoints.zimage import validate_zimage
    from storystudio.synthetic.wan_s2v import write_wan_s2v_checkpoint
    from storystudio.synthetic.zimage import write_zimage_checkpoint

    out = {}
    gen_device = args.device
    for path, validate, write, kw in (
        (args.zimage_dir, validate_zimage, write_zimage_checkpoint,
         {"transformer_dtype": getattr(torch, args.zimage_transformer_dtype)}),
        (args.wan_dir, validate_wan_s2v, write_wan_s2v_checkpoint, {}),
    ):
        try:
            validate(path)
            out[path.name] = "reused"
        except CheckpointError:
            _, dt = timed(write, path, args.profile, device=gen_device, **kw)
            out[path.name] = f"written in {dt:.1f} s"
    return out


def table(res: dict) -> str:
    keys = ["process_start_to_ready_s", "load_image_set_cold_s", "load_image_set_cached_s", "load_video_set_cold_s",
            "load_video_set_cached_s", "first_image_s", "steady_image_s", "first_video_s", "steady_video_s",
            "first_swap_fresh_worker_s", "steady_swap_s"]
    lines = ["| measure | s |", "|---|---|"]
    lines += [f"| {k} | {res[k]:.3f} |" for k in keys if isinstance(res.get(k), (int, float))]
    lines += ["", "| files | loader | cold s (GB/s) | cached s (GB/s) |", "|---|---|---|---|"]
    for r in res.get("loader_comparison", []):
        if "cold_s" in r:
            lines.append(f"| {r['files']} | {r['method']} | {r['cold_s']:.2f} ({r['cold_gbps']:.2f}) | "
                         f"{r['cached_s']:.2f} ({r['cached_gbps']:.2f}) |")
        else:
            lines.append(f"| {r['files']} | {r['method']} | {r.get('skipped') or r.get('error')} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["tiny", "full"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ss-cold"))
    ap.add_argument("--zimage-dir", type=Path, default=None, help="default: <workdir>/Z-Image-Turbo (a real disk)")
    ap.add_argument("--wan-dir", type=Path, default=None, help="default: <workdir>/Wan2.2-S2V-14B (a real disk)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--rounds", type=int, default=3, help="steady images and swaps")
    ap.add_argument("--video-rounds", type=int, default=1, help="steady videos")
    ap.add_argument("--video-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="reader threads (default: the production value)")
    ap.add_argument("--skip-compare", action="store_true", help="no loader comparison")
    ap.add_argument("--zimage-transformer-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the written Z-Image transformer files (the release: float32, 24.6 GB; "
                         "bfloat16 saves 12 GB of disk)")
    ap.add_argument("--child", choices=["worker", "load", "compare"], help=argparse.SUPPRESS)
    ap.add_argument("--set", choices=["image", "video"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.zimage_dir = args.zimage_dir or args.workdir / "Z-Image-Turbo"
    args.wan_dir = args.wan_dir or args.workdir / "Wan2.2-S2V-14B"
    if args.threads is None:
        from storystudio.models.weight_loader import READ_THREADS

        args.threads = READ_THREADS

    if args.child:
        if args.child == "worker":
            res = child_worker(args, args.spawned_at)
        elif args.child == "load":
            res = child_load(args, args.set)
        else:
            res = child_compare(args)
        args.result.write_text(json.dumps(res, indent=2, default=str))
        return 0

    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": datetime.date.today().isoformat(), "gpu": gpu_slug(args.device), "device": args.device,
                 "profile": args.profile, "torch": torch.__version__,
                 "gpu_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                 "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    res["checkpoints"] = ensure_checkpoints(args)
    try:
        res["transparent_hugepage"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        res["transparent_hugepage"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{res['date']}-{res['gpu']}-cold-start.json"

    def save_partial(phase: str) -> None:
        """A run cut off by a time limit still leaves every phase it finished."""
        path.write_text(json.dumps({**res, "partial": True, "finished_phases": phase}, indent=2, default=str))

    drop_cache(weight_files(args.zimage_dir) + weight_files(args.wan_dir))
    res["worker_start_resident_fraction"] = resident_fraction(weight_files(args.zimage_dir) + weight_files(args.wan_dir))
    res.update(spawn(args, "worker"))
    save_partial("worker")
    for name in ("image", "video"):
        load = spawn(args, "load", ["--set", name])
        res[f"load_{name}_set_cold_s"] = load["cold_s"]
        res[f"load_{name}_set_cached_s"] = load["cached_s"]
        res[f"load_{name}_set_detail"] = load
        save_partial(f"worker, load {name}")
    if not args.skip_compare:
        res.update(spawn(args, "compare"))
        timed_rows = [r for r in res["loader_comparison"] if r["files"] == "wan_dit" and "cold_s" in r]
        if timed_rows:
            res["loader_winner"] = min(timed_rows, key=lambda r: r["cold_s"])["method"]
    res["targets"] = {
        "first_swap_fresh_worker_le_1_5_s": res["first_swap_fresh_worker_s"] <= 1.5,
        "first_image_le_1_5x_steady": res["first_image_s"] <= 1.5 * res["steady_image_s"],
    }
    path.write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
