"""ModelManager faults on CPU: an OOM retry that can succeed, OOM while loading, no half-loaded set,
and the room check that also trusts measured free memory (faked here: there is no CUDA)."""

from __future__ import annotations

import gc
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from storystudio.config import WorkerSettings
from storystudio.errors import GenerationError
from storystudio.models.model_manager import ModelManager
from storystudio.storage import StorageSettings
from storystudio.worker import Worker
from tests.test_model_manager import MiB, FakeEngine, make_manager


class _Activations:
    """Stands for the failed attempt's activations: referenced only from its frame."""


def test_oom_retry_runs_after_the_except_block_with_the_failed_frame_gone():
    mgr = make_manager(None, [])
    mgr.ensure("image")
    refs: list[weakref.ref] = []
    seen: dict[str, object] = {}

    def flaky(engine):
        if not refs:
            activations = _Activations()  # a local of this frame only: the traceback keeps it alive
            refs.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen["exc_info"] = sys.exc_info()
        seen["activations_alive"] = refs[0]() is not None
        seen["residency"] = mgr.component_residency()
        return "ok"

    assert mgr.run("video", flaky) == "ok"
    assert seen["exc_info"] == (None, None, None), "the retry ran inside the except block"
    assert seen["activations_alive"] is False, "the failed attempt's frame (and its tensors) outlived it"
    assert seen["residency"]["image.transformer"] is False, "the retry runs with every other set parked"
    assert mgr.stats().oom_retries == 1


def test_second_oom_is_out_of_memory_and_leaves_no_traceback_alive():
    mgr = make_manager(None, [])
    refs: list[weakref.ref] = []

    def always_oom(engine):
        activations = _Activations()
        refs.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    with pytest.raises(GenerationError) as ei:
        mgr.run("video", always_oom)
    assert ei.value.code == "out_of_memory" and "9.00 GiB" in ei.value.message
    assert ei.value.__cause__ is None and ei.value.__context__ is None, "the OOM's traceback rides along"
    gc.collect()
    assert len(refs) == 2 and all(r() is None for r in refs)


def test_oom_while_cold_loading_is_retried_then_reported_as_out_of_memory():
    mgr = make_manager(None, [])
    mgr.ensure("image")
    attempts = []

    def oom_loader(device):
        attempts.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory while loading")

    mgr.register("big", oom_loader)
    with pytest.raises(GenerationError) as ei:
        mgr.ensure("big")
    assert ei.value.code == "out_of_memory" and "model set big" in ei.value.message
    assert len(attempts) == 2, "one retry with everything else parked"
    assert not mgr.is_loaded("big")
    assert mgr.component_residency()["image.transformer"] is False, "the retry parked the other set"
    with pytest.raises(GenerationError, match="out_of_memory|out of memory"):
        mgr.run("big", lambda e: 1)


def test_oom_while_restoring_is_retried_with_the_other_set_parked(monkeypatch):
    mgr = make_manager(70, [])
    mgr.ensure("image")
    mgr.ensure("video")  # parks the image text encoder
    assert mgr.component_residency()["image.text_encoder"] is False
    real = mgr._alloc_device
    fails = [1]

    def alloc(nbytes):
        if fails:
            fails.pop()
            raise torch.OutOfMemoryError("CUDA out of memory (restore)")
        return real(nbytes)

    monkeypatch.setattr(mgr, "_alloc_device", alloc)
    img = mgr.ensure("image")
    res = mgr.component_residency()
    assert all(res[f"image.{c}"] for c in ("transformer", "text_encoder", "vae"))
    assert not any(res[f"video.{c}"] for c in ("transformer", "text_encoder", "vae")), "video parked for the retry"
    assert img.checksum() == FakeEngine(torch.device("cpu"), {"transformer": 14, "text_encoder": 8, "vae": 1},
                                        2).checksum()


class _BrokenComponents(FakeEngine):
    def components(self):
        raise RuntimeError("components() exploded")


class _MetaHalf(FakeEngine):
    """The second component is on ``meta`` with no sources: the load fails after the first one is on the device."""

    def __init__(self, device):
        super().__init__(device, {"a": 1}, 5)
        self.mods["b"] = nn.Linear(4, 4, device="meta")


@pytest.mark.parametrize("broken", [_BrokenComponents, _MetaHalf], ids=["components-raises", "half-way"])
def test_a_failing_load_leaves_the_set_unloaded_and_the_next_load_is_clean(broken):
    mgr = ModelManager("cpu", budget_gib=64 * MiB / 2**30)
    calls = []

    def loader(device):
        calls.append(1)
        if len(calls) == 1:
            return broken(device) if broken is _MetaHalf else broken(device, {"a": 1}, 5)
        return FakeEngine(device, {"a": 1, "b": 2}, 6)

    mgr.register("x", loader, size_hint_bytes=3 * MiB)
    with pytest.raises((RuntimeError, ValueError)):
        mgr.ensure("x")
    assert not mgr.is_loaded("x")
    assert mgr.component_residency() == {}, "nothing of the failed load is counted as on the device"
    assert mgr._device_bytes() == 0
    eng = mgr.ensure("x")
    assert set(mgr.component_residency()) == {"x.a", "x.b"} and all(mgr.component_residency().values())
    assert eng.checksum() == FakeEngine(torch.device("cpu"), {"a": 1, "b": 2}, 6).checksum()


def test_room_check_uses_measured_free_memory_not_bookkeeping_alone():
    """Unlimited budget (bookkeeping never parks), but the device says it is nearly full."""
    device_total = 120 * MiB
    used_by_others = 40 * MiB  # another process, a leaked tensor: invisible to the bookkeeping
    queried = []

    def free_memory(device):
        queried.append(device.type)
        return device_total - used_by_others - mgr._device_bytes()

    mgr = ModelManager("cpu", reserve_gib=2 * MiB / 2**30, free_memory=free_memory)
    for name, sizes, seed in (("video", {"transformer": 40, "text_encoder": 12, "vae": 2}, 1),
                              ("image", {"transformer": 14, "text_encoder": 8, "vae": 1}, 2)):
        mgr.register(name, lambda d, s=sizes, k=seed: FakeEngine(d, s, k), size_hint_bytes=sum(sizes.values()) * MiB)
    vid = mgr.ensure("video")  # 54 MiB: 80 free, fits
    vsum = vid.checksum()
    assert all(mgr.component_residency().values())
    mgr.ensure("image", working_bytes=10 * MiB)  # needs 23 + 10 + 2 reserve = 35, free 26: park >= 9 MiB
    res = mgr.component_residency()
    assert res["video.text_encoder"] is False and res["video.transformer"] is True, res
    assert all(res[f"image.{c}"] for c in ("transformer", "text_encoder", "vae"))
    assert queried and set(queried) == {"cpu"}
    assert mgr.ensure("video").checksum() == vsum


def test_room_check_without_a_measurement_is_unchanged():
    mgr = make_manager(None, [])
    mgr.ensure("video")
    mgr.ensure("image", working_bytes=10**12)
    assert all(mgr.component_residency().values())


def test_oom_while_loading_is_an_out_of_memory_job_result(tiny_models, tmp_path: Path, monkeypatch):
    zdir, wdir = tiny_models
    settings = replace(
        WorkerSettings.from_env({"STORYSTUDIO_DEVICE": "cpu"}), zimage_dir=zdir, wan_dir=wdir,
        storage=StorageSettings.from_env({"STORYSTUDIO_OUTPUT_DIR": str(tmp_path / "out")}),
    )
    worker = Worker.from_settings(settings)

    def no_room(nbytes):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(worker.manager, "_alloc_device", no_room)
    r = worker.handle({"id": "j1", "input": {"task": "image", "prompt": "x", "width": 256, "height": 256,
                                             "steps": 1}})
    assert r["code"] == "out_of_memory", r
    assert r["error"].startswith("out_of_memory: GPU out of memory while making model set image resident")
    assert not worker.manager.is_loaded("image")
    monkeypatch.undo()
    ok = worker.handle({"id": "j2", "input": {"task": "image", "prompt": "x", "width": 256, "height": 256,
                                              "steps": 1}})
    assert "error" not in ok and Path(ok["image_url"]).stat().st_size > 0
