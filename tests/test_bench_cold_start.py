"""bench/bench_cold_start.py end to end on CPU with the tiny profile: fresh child processes, every field.

The numbers say nothing on a CPU; the test holds the script to running the production
path start to finish and writing the JSON the GPU run will fill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "process_start_to_ready_s",
    "load_image_set_cold_s",
    "load_image_set_cached_s",
    "load_video_set_cold_s",
    "load_video_set_cached_s",
    "first_image_s",
    "steady_image_s",
    "first_swap_fresh_worker_s",
    "steady_swap_s",
)


def test_tiny_cpu_run_writes_every_field(tiny_models, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_cold_start.py"), "--profile", "tiny", "--device", "cpu",
           "--workdir", str(tmp_path / "work"), "--zimage-dir", str(tiny_models[0]), "--wan-dir", str(tiny_models[1]),
           "--out", str(out), "--rounds", "1", "--video-rounds", "0", "--threads", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    files = list(out.glob("*-cpu-cold-start.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    for key in FIELDS:
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert res["process_start_to_ready_s"] > res["ready_breakdown_s"]["load_image"]
    assert {"warmup_image", "warmup_video", "locate_and_preflight"} <= set(res["ready_breakdown_s"])
    assert res["first_swap_moved_gib"]["restored"] > 0, "the first swap must move the sets"
    assert res["checkpoints"] == {"Z-Image-Turbo": "reused", "Wan2.2-S2V-14B": "reused"}
    assert set(res["targets"]) == {"first_swap_fresh_worker_le_1_5_s", "first_image_le_1_5x_steady"}
    rows = {(r["files"], r["method"]): r for r in res["loader_comparison"]}
    ours = rows[("wan_dit", "storystudio: pinned parking buffer [production]")]
    before = rows[("wan_dit", "safetensors.safe_open(device) [before]")]
    for row in (ours, before, rows[("zimage_transformer", "diffusers from_pretrained(device_map) [before]")]):
        assert row["cold_s"] > 0 and row["cached_s"] > 0, row
    for row in res["loader_comparison"]:
        assert "cold_s" in row or row.get("skipped", "").endswith("is not installed"), row
    assert res["loader_winner"] in {m for f, m in rows if f == "wan_dit"}
    assert "| first_swap_fresh_worker_s |" in done.stdout
