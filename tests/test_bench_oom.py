"""bench/bench_oom.py end to end in its simulated CPU mode (the GPU run is the real measurement)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from storystudio.errors import GenerationError
from storystudio.models.model_manager import ModelManager
from storystudio.models.weight_files import InMemory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_oom", ROOT / "bench" / "bench_oom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "bench/bench_oom.py", "--device", "cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1, (files, proc.stdout + proc.stderr)
    return proc, json.loads(files[0].read_text())


def test_bench_oom_simulated_run_loads_both_sets_then_retries_and_succeeds(tmp_path):
    out = tmp_path / "oom.json"
    proc, report = _run(tmp_path, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["retry_succeeded"] is True and report["mode"] == "simulated-cpu" and report["error"] is None
    # The scenario's precondition: both sets resident, loaded without an out-of-memory retry (the first H100
    # run's synthetic loader put every set on the device twice and the video load ran out of memory).
    assert report["both_sets_resident_after_load"] is True and report["load_oom_retries"] == 0
    assert report["attempts"] == 2 and report["oom_retries"] == 1
    assert report["image_set_parked_for_retry"] and report["image_weights_identical_after_restore"]
    # As in the worker on an 80 GB card: parking expected, the sets read into parking buffers.
    assert sorted(report["parking"]["host"]) == sorted(
        [f"video.{c}" for c in ("transformer", "text_encoder", "vae", "audio_encoder")]
        + [f"image.{c}" for c in ("transformer", "text_encoder", "vae")])
    # The job did not fit beside both sets, and fits only once the image set is parked and the failed half freed.
    assert report["free_with_both_sets"] < report["job_activations"]
    assert report["job_activations"] <= report["free_with_both_sets"] + report["image_set"]
    assert report["job_activations"] > report["free_with_both_sets"] + report["image_set"] - report["first_attempt_half"]
    assert "retry_succeeded" in proc.stdout and "simulated 80 MiB device" in proc.stdout


def test_bench_oom_out_folder_gets_the_dated_file(tmp_path):
    proc, report = _run(tmp_path, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / f"{report['date']}-cpu-oom.json").is_file()


def test_bench_oom_fails_without_running_the_job_when_the_sets_cannot_both_be_resident(tmp_path):
    proc, report = _run(tmp_path, "--out", str(tmp_path / "small.json"), "--sim-capacity-mib", "58")
    assert proc.returncode == 1
    assert report["retry_succeeded"] is False and report["both_sets_resident_after_load"] is False
    assert report["error"].startswith("scenario precondition failed") and "attempts" not in report


def test_gpu_run_writes_into_the_out_folder_with_the_gpu_in_the_name(bench, tmp_path):
    report = {"mode": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-26"}
    assert bench.output_path(tmp_path, report) == tmp_path / "2026-11-26-h100-oom.json"
    assert bench.output_path(tmp_path / "x.json", report) == tmp_path / "x.json"
    assert bench.output_path(None, report) == ROOT / "bench" / "results" / "2026-11-26-h100-oom.json"


def test_synthetic_sets_put_nothing_on_the_device_before_the_manager_does(bench):
    plan = bench.synthetic_plan({"transformer": 3 * 1024 + 10, "vae": 100}, seed=1, block=1024)
    params = [p for m in plan.engine.components().values() for p in m.parameters()]
    assert params and all(p.is_meta for p in params)
    srcs = [s for comp in plan.sources.values() for s in comp.values()]
    assert len(srcs) == len(params) == 5 and all(isinstance(s, InMemory) and s.tensor.device.type == "cpu"
                                                  for s in srcs)
    assert sum(p.numel() * 2 for p in params) == 3 * 1024 + 10 + 100
    firsts = [float(s.tensor[0]) for s in srcs]
    assert len(set(firsts)) == len(firsts), "every parameter holds its own window of the pool"


def test_the_simulated_device_also_refuses_the_managers_own_allocations(bench):
    """A load that does not fit the simulated device runs out of memory as it would on CUDA."""
    sim = bench.SimulatedDevice(4 * 2**20)
    mgr = ModelManager("cpu", free_memory=lambda d: None)  # no room check: only the allocation can refuse
    sim.guard(mgr)
    mgr.register("big", lambda d: bench.synthetic_plan({"a": 3 * 2**20, "b": 3 * 2**20}, 1, 2**20))
    with pytest.raises(GenerationError) as ei:
        mgr.ensure("big")
    assert ei.value.code == "out_of_memory" and "simulated: the manager tried to allocate 3.00 MiB" in ei.value.message
    assert not mgr.is_loaded("big") and mgr.stats().oom_retries == 1
    assert sim.used() == 0, "the failed loads' buffers are given back"
