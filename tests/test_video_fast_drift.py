"""The drift report (bench/video_fast_drift.py) end to end on the tiny checkpoint, on CPU: the same
code the GPU bench runs, so the JSON it writes is checked field by field."""

from __future__ import annotations

import json

from bench import video_fast_drift
from storystudio.models import attention_fp8

# What a fast job reports where no 8-bit kernel runs: cuDNN FP8's reason depends on whether the
# frontend wheel is installed here (CI installs it, it then needs CUDA), SageAttention is never installed.
UNAVAILABLE_8BIT = f"unavailable: {attention_fp8.load()[1]}; sageattention is not installed"


def test_drift_report_on_the_tiny_checkpoint(tiny_models, tmp_path, capsys):
    report = video_fast_drift.main([
        "--wan-dir", str(tiny_models[1]), "--device", "cpu", "--out", str(tmp_path), "--steps", "6",
        "--max-area", "4096", "--infer-frames", "16", "--seconds", "0.5", "--step-cache", "1.0",
    ])
    saved = json.loads(next(tmp_path.glob("*-cpu-video-fast-drift.json")).read_text())
    assert saved["rows"] == report["rows"] and saved["steps"] == 6 and "random weights" in saved["note"]
    rows = {r["variant"]: r for r in saved["rows"]}
    assert list(rows) == ["exact", "exact_repeat", "fp8", "attention_8bit", "step_cache", "fast"]
    assert rows["exact"]["rel_l2"] == 0.0 and rows["exact_repeat"]["rel_l2"] == 0.0  # CPU is deterministic
    assert 0 < rows["fp8"]["rel_l2"] < 0.2 and rows["fp8"]["fp8"] == "emulated (row-wise scales)"
    assert rows["fp8"]["skipped_steps"] == [0]
    # Not installed here: the knob reports it and exact attention runs, so no drift at all.
    assert rows["attention_8bit"]["rel_l2"] == 0.0
    assert rows["attention_8bit"]["attention_8bit"] == UNAVAILABLE_8BIT
    assert rows["step_cache"]["skipped_steps"] == [2] and rows["step_cache"]["rel_l2"] > 0
    assert rows["fast"]["skipped_steps"] == [2] and rows["fast"]["rel_l2"] > 0
    assert rows["fast"]["fp8"] == "emulated (row-wise scales)"
    out = capsys.readouterr().out
    assert "| fp8 |" in out and "of 6" in out
