"""The main job on the embedded default: a two-scene story, offline, on tiny synthetic checkpoints.

``python -m storystudio.demo`` writes tiny random-weight checkpoints in the official
layouts (once, under ``./models/tiny``), synthesises speech-like audio for each scene,
and runs a ``batch`` job through the same :class:`~storystudio.worker.Worker` that
RunPod calls — images first, one swap, then videos — writing PNGs and MP4s to a local
folder. No network, no GPU needed. Random weights: the pictures are noise; the
point is that every stage of the real pipeline runs and produces valid files.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
from dataclasses import replace
from pathlib import Path

from storystudio.config import WorkerSettings
from storystudio.errors import CheckpointError
from storystudio.media import encode_audio, synth_speech
from storystudio.storage import StorageSettings
from storystudio.worker import Worker

logger = logging.getLogger("storystudio.demo")


def ensure_tiny_checkpoints(models_dir: Path) -> tuple[Path, Path]:
    """Write the tiny checkpoints unless a valid copy is already there."""
    from storystudio.models.checkpoints.wan_s2v import validate_wan_s2v
    from storystudio.models.checkpoints.zimage import validate_zimage
    from storystudio.synthetic.wan_s2v import write_wan_s2v_checkpoint
    from storystudio.synthetic.zimage import write_zimage_checkpoint

    zdir, wdir = models_dir / "Z-Image-Turbo", models_dir / "Wan2.2-S2V-14B"
    for path, validate, write in ((zdir, validate_zimage, write_zimage_checkpoint), (wdir, validate_wan_s2v, write_wan_s2v_checkpoint)):
        try:
            validate(path)
        except CheckpointError:
            logger.info("writing tiny synthetic checkpoint to %s", path)
            write(path, "tiny")
            validate(path)
    return zdir, wdir


def story_job(seconds: tuple[float, ...] = (1.5, 2.5)) -> dict:
    """A two-scene story whose audio is embedded as data URIs (MP3 and WAV)."""
    scenes = []
    prompts = ["a lighthouse keeper waves from the balcony", "the keeper's cat explains the tides"]
    for i, (secs, prompt, fmt, mime) in enumerate(zip(seconds, prompts, ("mp3", "wav"), ("audio/mpeg", "audio/wav"), strict=False)):
        audio = encode_audio(synth_speech(secs, seed=i), fmt)
        scenes.append(
            {
                "scene_id": f"scene-{i + 1}",
                "prompt": prompt,
                "video_prompt": "a person talking to the camera",
                "audio": f"data:{mime};base64,{base64.b64encode(audio).decode('ascii')}",
            }
        )
    return {
        "id": "demo-job",
        "input": {
            "task": "batch",
            "project_id": "demo-story",
            "scenes": scenes,
            "image": {"width": 256, "height": 256, "steps": 4},
            "video": {"max_area": 64 * 64, "steps": 3, "infer_frames": 16},
            "seed": 7,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=Path("models/tiny"))
    ap.add_argument("--output", type=Path, default=Path("output"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    zdir, wdir = ensure_tiny_checkpoints(args.models_dir)
    settings = replace(
        WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}),
        models_dir=args.models_dir,
        zimage_dir=zdir,
        wan_dir=wdir,
        storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(args.output.resolve())}),
    )
    worker = Worker.from_settings(settings)
    result = worker.handle(story_job())
    print(json.dumps(result, indent=2))
    if "error" in result or result.get("scenes_failed"):
        logger.error("the story did not render completely")
        return 1
    for scene in result["scenes"]:
        logger.info("%s: %s, %s", scene["scene_id"], scene["image_url"], scene["video_url"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
