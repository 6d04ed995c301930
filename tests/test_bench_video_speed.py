"""bench/bench_video_speed.py end to end on the tiny profile (CPU): every part runs and the JSON holds the figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_video_speed", ROOT / "bench" / "bench_video_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_video_speed"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tiny_profile_runs_every_part(bench, tmp_path, capsys):
    out = tmp_path / "results"
    res = bench.main(["--profile", "tiny", "--device", "cpu", "--parts", "all", "--resolutions", "480p",
                      "--paths", "baseline,exact,fast", "--steps", "2", "--workdir", str(tmp_path / "work"),
                      "--out", str(out)])
    files = list(out.glob("*-cpu-video-speed.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved == json.loads(json.dumps(res, default=str))
    for key in ("baseline_cfg_step_s", "exact_cfg_step_s", "exact_speedup", "compile_cold_s", "compile_warm_s",
                "scene_5s_480p_exact_s", "wan_load_s"):
        assert isinstance(saved[key], float) and saved[key] == saved[key], key  # a number, not NaN
    assert saved["baseline_cfg_step_s"] > 0 and saved["exact_cfg_step_s"] > 0
    detail = saved["steps_detail"]
    assert len(detail["baseline"]["step_s"]) == len(detail["exact"]["step_s"]) == 2
    assert detail["baseline"]["engine"]["path"] == "baseline" and not detail["baseline"]["engine"]["compiled"]
    assert detail["exact"]["engine"]["compiled"] and detail["exact"]["engine"]["cfg_batched"]
    assert detail["baseline"]["engine"]["rope"] == "official" and detail["exact"]["engine"]["rope"] == "fused"
    assert saved["compile_warm_detail"]["engine"]["compiled"]
    # Same inputs and seed: the exact path lands where the baseline does (float32 on the CPU),
    # the fast path's FP8 linears move it measurably.
    assert saved["exact_vs_baseline_drift"] < 1e-3
    assert saved["fast_vs_exact_drift"] > saved["exact_vs_baseline_drift"]
    assert saved["attention_backend"] == saved["attention_selfcheck"]["backend"]
    assert set(saved["attention_selfcheck"]["checks"]) >= {"math", "cudnn", "fa2"}
    scene = saved["scenes_detail"]["exact"]
    assert scene["frames"] == 12 and scene["engine"]["clip_frames"] == [16]  # 0.75 s: 12 + 3 frames, one clip
    # Per clip: its frames and step times (2 steps at the tiny profile).
    (clip,) = scene["clips"]
    assert clip["frames"] == 16 and clip["steps"] == 2 and clip["first_step_s"] > 0 and clip["median_step_s"] > 0
    assert clip["total_step_s"] >= clip["first_step_s"]
    assert "fast_note" not in saved
    assert saved["fast_cfg_step_s"] > 0 and saved["scene_5s_480p_fast_s"] > 0
    # The preset's drift against the exact scene (same inputs and seed): FP8 moves the latents a little.
    assert 0 < saved["scene_5s_480p_fast_drift"] < 1
    # The short line: one 8-frame clip, compiled on the other-length graph and eager; same math.
    short = saved["short_detail"]
    assert saved["short_clip_frames"] == 8
    assert short["compiled"]["engine"]["clip_frames"] == short["eager"]["engine"]["clip_frames"] == [8]
    assert short["compiled"]["engine"]["compiled_clips"] == 1 and short["compiled"]["engine"]["notes"] == []
    assert short["eager"]["engine"]["compiled_clips"] == 0
    assert saved["exact_short_cfg_step_s"] > 0 and saved["exact_short_eager_cfg_step_s"] > 0
    assert saved["short_compiled_speedup"] > 0 and saved["short_compiled_vs_eager_drift"] < 1e-3
    check = saved["attention_8bit_check"]
    assert check["available"] is False and "sageattention is not installed" in check["detail"]
    table = capsys.readouterr().out
    assert "| baseline_cfg_step_s |" in table and "| attention candidate |" in table
