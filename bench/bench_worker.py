"""The real worker on a GPU: story batches through ``Worker.handle`` on full-size random weights.

What the story app would see, phase by phase (``images_time``, ``swap_time``,
``videos_time``), for:

1. a cold batch: nothing loaded; Z-Image loads for the images, Wan for the videos;
2. the same batch again with a VRAM budget that forces a real swap in the middle
   (``--forced-budget-gib``; 56 GiB fits one set plus 480p activations, not both);
3. a single image job right after it (swaps back to Z-Image).

Outputs go to a local folder; each result's MP4 is probed (frames, fps, audio stream).
Usage on the lent GPU: ``python bench/bench_worker.py --out $OUT``. With ``--profile tiny
--device cpu`` it is a smoke test of the same code path. Random weights: noise, not quality.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storystudio.config import WorkerSettings  # noqa: E402
from storystudio.media import encode_audio, probe_media, synth_speech  # noqa: E402
from storystudio.synthetic.wan_s2v import write_wan_s2v_checkpoint  # noqa: E402
from storystudio.synthetic.zimage import write_zimage_checkpoint  # noqa: E402
from storystudio.models.model_manager import GiB  # noqa: E402
from storystudio.storage import StorageSettings  # noqa: E402
from storystudio.worker import Worker  # noqa: E402

log = logging.getLogger("bench.worker")


def batch_job(job_id: str, *, image: dict, video: dict, seconds=(1.0, 1.5)) -> dict:
    scenes = []
    for i, secs in enumerate(seconds):
        audio = encode_audio(synth_speech(secs, seed=i), "mp3")
        scenes.append({
            "scene_id": f"s{i + 1}",
            "prompt": f"scene {i + 1}: a lighthouse keeper at dawn",
            "video_prompt": "a person talking",
            "audio": "data:audio/mpeg;base64," + base64.b64encode(audio).decode(),
        })
    return {"id": job_id, "input": {"task": "batch", "project_id": "bench", "scenes": scenes,
                                    "image": image, "video": video, "seed": 1}}


def summarize(result: dict) -> dict:
    keys = ("images_time", "swap_time", "video_load_time", "videos_time", "total_time", "scenes_ok", "scenes_failed")
    out = {k: result.get(k) for k in keys}
    out["manager"] = result.get("manager")
    out["scenes"] = []
    for s in result.get("scenes", []):
        row = {k: s.get(k) for k in ("scene_id", "frames", "fps", "width", "height", "num_clips", "error")}
        row["image_generate_s"] = (s.get("image_timings") or {}).get("generate")
        row["video_generate_s"] = (s.get("timings") or {}).get("generate")
        if s.get("video_url"):
            info = probe_media(s["video_url"])
            row["probe"] = {"frames": info.video.frame_count, "fps": round(info.video.fps, 3),
                            "video_s": round(info.video.duration, 3),
                            "audio": info.audio.codec if info.audio else None,
                            "audio_s": round(info.audio.duration, 3) if info.audio else None}
        out["scenes"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["tiny", "full"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--zimage-dir", type=Path, default=Path("/dev/shm/ss/Z-Image-Turbo"))
    ap.add_argument("--wan-dir", type=Path, default=Path("/tmp/ss/Wan2.2-S2V-14B"))
    ap.add_argument("--output", type=Path, default=Path("/tmp/ss-output"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--forced-budget-gib", type=float, default=56.0)
    ap.add_argument("--video-steps", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = args.profile == "tiny"
    image = {"width": 256, "height": 256, "steps": 2} if tiny else {"width": 1024, "height": 1024, "steps": 8}
    video = {"max_area": 64 * 64, "infer_frames": 16} if tiny else {"resolution": "480p"}
    video["steps"] = args.video_steps

    res: dict = {"profile": args.profile, "device": args.device, "torch": torch.__version__}
    for d, write in ((args.zimage_dir, write_zimage_checkpoint), (args.wan_dir, write_wan_s2v_checkpoint)):
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        write(d, args.profile, device=args.device)
        res[f"write_{d.name}_s"] = round(time.perf_counter() - t0, 1)

    settings = replace(
        WorkerSettings.from_env({"STORYSTUDIO_DEVICE": args.device}),
        zimage_dir=args.zimage_dir,
        wan_dir=args.wan_dir,
        storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(args.output)}),
    )
    worker = Worker.from_settings(settings)

    def dump() -> None:
        (args.out / "bench_worker.json").write_text(json.dumps(res, indent=2, default=str))

    r = worker.handle(batch_job("cold", image=image, video=video))
    res["cold_batch"] = summarize(r)
    dump()
    worker.manager.budget_bytes = int(args.forced_budget_gib * GiB)
    res["forced_budget_gib"] = args.forced_budget_gib
    r = worker.handle(batch_job("forced-swap", image=image, video=video))
    res["forced_swap_batch"] = summarize(r)
    dump()
    t0 = time.perf_counter()
    r = worker.handle({"id": "image-after", "input": {"task": "image", "prompt": "a fox", **image, "seed": 3}})
    res["image_after_videos"] = {"wall_s": round(time.perf_counter() - t0, 3), "timings": r.get("timings"),
                                 "manager": r.get("manager"), "error": r.get("error")}
    if args.device.startswith("cuda"):
        res["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    dump()
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
