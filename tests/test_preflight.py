"""The start-up pre-flight on CPU: a faked card size decides the policy or refuses the worker.

The CUDA checks (context, kernels, attention) need a GPU; their logic that does not,
the architecture check and the attention self-check on the CPU backend, runs here.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from storystudio.config import WorkerSettings
from storystudio.errors import PreflightError
from storystudio.models.footprint import folder_weight_bytes
from storystudio.preflight import GpuFacts, attention_self_check, check_arch, check_kernels, plan_policy
from storystudio.storage import StorageSettings
from storystudio.worker import Worker

GiB = 1024**3
WAN = int(42.6 * GiB)  # full Wan2.2-S2V set, bf16 (bench/RESULTS.md)
ZIMAGE = int(19.1 * GiB)


@pytest.mark.parametrize(
    ("name", "total_gib", "policy"),
    [("NVIDIA H200", 141, "keep-both"), ("NVIDIA H100 80GB HBM3", 80, "keep-both"),
     ("NVIDIA RTX PRO 6000", 60, "always-swap")],
)
def test_policy_by_card_size(name, total_gib, policy):
    gpu = GpuFacts(name, total_gib * GiB)
    assert plan_policy(gpu, budget_bytes=int((total_gib - 1.5) * GiB), wan_bytes=WAN, image_bytes=ZIMAGE) == policy


def test_a_card_too_small_for_wan_is_refused_with_the_numbers():
    gpu = GpuFacts("NVIDIA L40S", int(44.5 * GiB))
    with pytest.raises(PreflightError) as ei:
        plan_policy(gpu, budget_bytes=43 * GiB, wan_bytes=WAN, image_bytes=ZIMAGE)
    msg = ei.value.message
    assert ei.value.code == "preflight_failed"
    assert "NVIDIA L40S is too small for Wan2.2-S2V: 44.5 GiB of VRAM leaves a budget of 43.0 GiB" in msg
    assert "its weights take 42.6 GiB" in msg and "480p clip of 80 frames needs 12.1 GiB" in msg
    assert "at least 56 GiB" in msg


def test_an_unknown_wan_size_does_not_refuse():
    assert plan_policy(GpuFacts("small", 8 * GiB), budget_bytes=6 * GiB, wan_bytes=None, image_bytes=ZIMAGE) == \
        "always-swap"


@pytest.mark.parametrize(
    ("capability", "archs", "ok"),
    [((9, 0), ("sm_80", "sm_90", "sm_100"), True),
     ((8, 9), ("sm_80", "sm_86", "sm_90"), True),  # same major, older minor: binary compatible
     ((12, 0), ("sm_80", "sm_90", "compute_90"), True),  # PTX JIT
     ((12, 0), ("sm_80", "sm_90", "sm_100"), False),
     ((7, 0), ("sm_80", "sm_90"), False)],
)
def test_architecture_must_be_in_the_build(capability, archs, ok):
    facts = GpuFacts("GPU", 80 * GiB, capability, archs)
    if ok:
        check_arch(facts)
    else:
        with pytest.raises(PreflightError, match=f"sm_{capability[0]}{capability[1]}.*cannot run on this GPU"):
            check_arch(facts)


def test_kernel_and_attention_checks_run_on_the_cpu_backend():
    from storystudio.models.attention import CANDIDATES

    assert check_kernels(torch.device("cpu")) >= 0
    sel = attention_self_check(torch.device("cpu"), heads=2, head_dim=16)
    assert sel.backend in CANDIDATES and any(c.ok and c.name == sel.backend for c in sel.checks)


def test_no_correct_attention_kernel_refuses_the_worker(monkeypatch):
    from storystudio.models import attention

    # Every candidate now disagrees with the reference, as on a GPU whose kernels are broken.
    monkeypatch.setattr(attention, "reference_attention", lambda q, k, v, **kw: torch.zeros(q.shape, dtype=torch.float64))
    with pytest.raises(PreflightError, match="no attention kernel passes its self-check on cpu: ") as ei:
        attention_self_check(torch.device("cpu"), heads=2, head_dim=16)
    assert "math: " in ei.value.message and ei.value.code == "preflight_failed"


def settings_for(tiny_models, tmp_path, **kw) -> WorkerSettings:
    z, w = tiny_models
    base = replace(WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}), zimage_dir=z, wan_dir=w,
                   storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(tmp_path / "out")}))
    return replace(base, **kw)


def test_the_worker_refuses_to_start_on_a_card_too_small_for_wan(tiny_models, tmp_path):
    wan = folder_weight_bytes(tiny_models[1], itemsize=2)
    tiny_card = GpuFacts("Tiny GPU", wan)  # holds the weights, not a 480p clip
    with pytest.raises(PreflightError, match="Tiny GPU is too small for Wan2.2-S2V"):
        Worker.from_settings(settings_for(tiny_models, tmp_path, vram_reserve_gib=0.0), gpu=tiny_card)


def test_the_worker_always_swaps_on_a_card_that_holds_one_set(tiny_models, tmp_path):
    from storystudio.preflight import MIN_VIDEO_AREA, MIN_VIDEO_FRAMES
    from storystudio.models.footprint import video_working_bytes

    clip = video_working_bytes(MIN_VIDEO_AREA, MIN_VIDEO_FRAMES)
    wan = folder_weight_bytes(tiny_models[1], itemsize=2)
    card = GpuFacts("Mid GPU", wan + clip + 1024)
    worker = Worker.from_settings(settings_for(tiny_models, tmp_path, vram_reserve_gib=0.0), gpu=card)
    assert worker.preflight.policy == "always-swap" and worker.manager.exclusive
    assert worker.manager.budget_bytes == card.total_bytes
    big = Worker.from_settings(settings_for(tiny_models, tmp_path, vram_reserve_gib=0.0),
                               gpu=GpuFacts("Big GPU", 200 * GiB))
    assert big.preflight.policy == "keep-both" and not big.manager.exclusive


def test_init_cuda_accepts_a_device_without_index(monkeypatch):
    """``STORYSTUDIO_DEVICE=cuda`` (no index) is the default: ``torch.cuda.set_device`` refuses
    a device without an index, which failed every worker's start on the H100. The CUDA calls
    are faked here (no GPU on CI); ``set_device`` refuses an index-less device as torch does."""
    from storystudio import preflight

    calls = []

    def set_device(dev):
        if isinstance(dev, torch.device) and dev.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        calls.append(dev)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: calls.append(("sync", dev)))
    monkeypatch.setattr(preflight.torch, "empty", lambda *a, device=None, **k: calls.append(("empty", device)))
    assert preflight.init_cuda(torch.device("cuda")) >= 0
    assert calls[0] == torch.device("cuda", 0)
    assert calls[1] == ("empty", torch.device("cuda", 0))
