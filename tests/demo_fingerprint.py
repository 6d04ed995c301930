"""Run ``storystudio.demo`` and print a JSON fingerprint of everything it wrote.

Run as ``python -m tests.demo_fingerprint MODELS_DIR OUTPUT_DIR`` in a fresh process
(``tests/test_demo_golden.py`` does, with one intra-op thread). The fingerprint holds:

* every PNG's sha256 (PNG encoding is byte-deterministic);
* the story manifest's map of scenes and pieces to their files (its times vary);
* for every MP4: the sha256 of the exact frames and audio samples handed to
  ``encode_mp4`` (the pipeline's output), the sha256 of the AAC track decoded back, and
  the container's probed metadata. Not the MP4 bytes: libx264 runs frame-threaded and
  the same frames do not always give the same bitstream (observed on this 2-core
  machine: 1 frame in 40 coded differently between identical runs), so the bytes are
  not a reliable fingerprint of the pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(models_dir: str, output: str) -> None:
    import storystudio.render as render
    from storystudio import demo
    from storystudio.media import decode_audio, probe_media

    inputs: dict[str, dict[str, str]] = {}
    encode = render.encode_mp4

    def recording_encode(frames, fps, audio, out_path, **kwargs):
        path = encode(frames, fps, audio, out_path, **kwargs)
        inputs[sha(Path(path).read_bytes())] = {
            "frames_sha256": sha(np.ascontiguousarray(frames).tobytes()) + f" {tuple(frames.shape)} {frames.dtype}",
            "audio_sha256": sha(np.ascontiguousarray(audio.samples).tobytes()) + f" {audio.sample_rate} Hz",
            "fps": str(fps),
        }
        return path

    render.encode_mp4 = recording_encode
    rc = demo.main(["--models-dir", models_dir, "--output", output])
    if rc != 0:
        raise SystemExit(rc)
    files: dict[str, object] = {}
    for p in sorted(Path(output).rglob("*")):
        if not p.is_file():
            continue
        rel, data = p.relative_to(output).as_posix(), p.read_bytes()
        if p.name == "manifest.json":  # the story's manifest (storystudio/manifest.py): which file holds which piece;
            # its input hashes are checked by tests/test_story_resume.py, its times are not fingerprintable
            scenes = json.loads(data)["scenes"]
            files[rel] = {sid: {kind: part["key"] for kind, part in parts.items()} for sid, parts in scenes.items()}
        elif p.suffix == ".mp4":
            files[rel] = {**inputs[sha(data)], "decoded_audio_sha256": sha(decode_audio(data).samples.tobytes()),
                          "probe": dataclasses.asdict(probe_media(data))}
        else:
            files[rel] = sha(data)
    sys.stdout.write("FINGERPRINT " + json.dumps(files, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
