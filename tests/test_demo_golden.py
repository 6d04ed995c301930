"""The demo's output for its fixed seed (7) matches the recorded golden fingerprint.

This pins the whole pipeline (checkpoint writers -> loaders -> engines -> PNG / MP4) so
that refactors which claim "no behaviour change" are held to it. See
``tests/demo_fingerprint.py`` for what is compared (PNG bytes; for MP4s the frames and
audio given to the encoder, the AAC track decoded back and the container metadata, as
libx264's bitstream is not reproducible between identical runs).

The demo runs in a fresh process with one intra-op thread: on CPU the Wan latents depend
on how torch splits its reductions across threads. The fingerprint belongs to the pinned
environment (``requirements.lock``: torch, av, Pillow) on x86-64; if one of those pins
changes on purpose, re-record with ``python -m tests.test_demo_golden``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "data" / "demo_golden.json"
ROOT = Path(__file__).resolve().parents[1]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fingerprint(models_dir: Path, output: Path) -> dict:
    env = {**os.environ, **THREAD_ENV}
    proc = subprocess.run([sys.executable, "-m", "tests.demo_fingerprint", str(models_dir), str(output)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FINGERPRINT "))
    return json.loads(line.removeprefix("FINGERPRINT "))


def test_demo_output_matches_golden_fingerprint(tiny_models, tmp_path):
    golden = json.loads(GOLDEN.read_text())["files"]
    got = fingerprint(tiny_models[0].parent, tmp_path / "out")  # the demo validates these and writes none
    assert sorted(got) == sorted(golden), "the demo wrote a different set of files"
    assert any(p.endswith(".png") for p in got) and any(p.endswith(".mp4") for p in got)
    changed = {p: {"golden": golden[p], "now": got[p]} for p in golden if got[p] != golden[p]}
    assert not changed, f"demo output changed: {json.dumps(changed, indent=1)}"


if __name__ == "__main__":  # re-record: python -m tests.test_demo_golden
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = fingerprint(Path(tmp) / "models", Path(tmp) / "out")
    GOLDEN.write_text(json.dumps({"command": "python -m storystudio.demo (seed 7)", "env": THREAD_ENV,
                                  "files": files}, indent=2, sort_keys=True) + "\n")
    print(GOLDEN.read_text())
