"""bench/bench_oom.py end to end in its simulated CPU mode (the GPU run is the real measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_oom_simulated_run_retries_and_succeeds(tmp_path):
    out = tmp_path / "oom.json"
    proc = subprocess.run([sys.executable, "bench/bench_oom.py", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["retry_succeeded"] is True and report["mode"] == "simulated-cpu"
    assert report["attempts"] == 2 and report["oom_retries"] == 1
    assert report["image_set_parked_for_retry"] and report["image_weights_identical_after_restore"]
    # The job did not fit beside both sets, and fits only once the image set is parked.
    assert report["free_with_both_sets"] < report["job_activations"]
    assert report["job_activations"] <= report["free_with_both_sets"] + report["image_set"]
    assert "retry_succeeded" in proc.stdout and "simulated 80 MiB device" in proc.stdout
