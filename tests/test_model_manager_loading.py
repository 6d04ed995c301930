"""The ModelManager's load protocol on real files: plans of meta modules + file spans, parking buffers
filled while loading, and the fallback to re-reading from disk when host memory is short.

Engines here are small stand-ins written to safetensors files; the real engines go
through the same path in tests/test_worker.py and tests/test_engines_loading.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from storystudio.errors import CheckpointError
from storystudio.models import weight_loader
from storystudio.models.host_limits import HostMemory
from storystudio.models.model_manager import GiB, ModelManager
from storystudio.models.weight_files import LoadPlan, bind, safetensors_sources

MiB = 1024**2


class Stack(nn.Module):
    """``n`` float32 matrices of ``mib`` MiB together, plus a buffer computed at construction."""

    def __init__(self, mib: float, n: int = 4) -> None:
        super().__init__()
        rows = max(1, int(mib * MiB) // 4 // n // 64)
        self.ws = nn.ParameterList([nn.Parameter(torch.empty(rows, 64), requires_grad=False) for _ in range(n)])
        self.register_buffer("scale", torch.linspace(0, 1, 7), persistent=False)


class StagedEngine:
    def __init__(self, mods: dict[str, nn.Module]) -> None:
        self.mods = mods

    def components(self) -> dict[str, nn.Module]:
        return self.mods


def write_set(folder, sizes: dict[str, float], seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """One safetensors file per component, random weights; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    written = {}
    for comp, mib in sizes.items():
        state = {k: torch.randn(v.shape, generator=g) for k, v in Stack(mib).state_dict().items()}
        save_file(state, str(folder / f"{comp}.safetensors"))
        written[comp] = state
    return written


def staged_loader(folder, sizes: dict[str, float], calls: list[str], name: str):
    def load(device: torch.device) -> LoadPlan:
        from accelerate import init_empty_weights

        calls.append(name)
        mods, sources = {}, {}
        for comp, mib in sizes.items():
            with init_empty_weights():
                mods[comp] = Stack(mib)
            sources[comp] = bind(mods[comp], safetensors_sources(folder / f"{comp}.safetensors"), what=comp,
                                 where=f"{comp}.safetensors")
        return LoadPlan(StagedEngine(mods), sources)

    return load


def assert_weights(engine: StagedEngine, written: dict[str, dict[str, torch.Tensor]]) -> None:
    for comp, state in written.items():
        mod = engine.components()[comp]
        for k, v in state.items():
            assert torch.equal(mod.get_parameter(k), v), (comp, k)
        assert torch.equal(mod.scale, torch.linspace(0, 1, 7))


VIDEO = {"transformer": 40, "text_encoder": 12, "vae": 2}
IMAGE = {"transformer": 14, "text_encoder": 8, "vae": 1}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {"video": (root / "video", write_set(root / "video", VIDEO, 1)),
            "image": (root / "image", write_set(root / "image", IMAGE, 2))}


def make(sets, calls, **kw) -> ModelManager:
    mgr = ModelManager("cpu", **kw)
    for name, sizes in (("video", VIDEO), ("image", IMAGE)):
        mgr.register(name, staged_loader(sets[name][0], sizes, calls, name), size_hint_bytes=int(sum(sizes.values()) * MiB))
    return mgr


def host_buffer_of(mgr: ModelManager, key: str):
    return next(c for ms in mgr._sets.values() for c in ms.components if c.key == key)


def test_files_are_read_into_parking_buffers_and_a_park_copies_nothing(sets, monkeypatch):
    calls: list[str] = []
    mgr = make(sets, calls, budget_gib=70 * MiB / GiB)  # 54 + 23 > 70: parking expected
    image = mgr.ensure("image")
    assert_weights(image, sets["image"][1])
    assert mgr.stats().parking["host"] == ["image.transformer", "image.text_encoder", "image.vae"]
    video = mgr.ensure("video")  # parks Z's text encoder (the smallest component that makes room)
    te = host_buffer_of(mgr, "image.text_encoder")
    assert not te.on_device
    host = te.host.tensor
    for p in image.components()["text_encoder"].parameters():
        assert host.data_ptr() <= p.data_ptr() < host.data_ptr() + host.numel(), "parked weights are host views"
    copies = []
    monkeypatch.setattr(type(te.host), "copy_from", lambda self, flat: copies.append(self.key))
    mgr.ensure("image")
    mgr.ensure("video")
    assert copies == [], "the parking buffer already holds the weights: parking copies nothing"
    assert_weights(mgr.ensure("image"), sets["image"][1])
    assert_weights(mgr.ensure("video"), sets["video"][1])
    assert calls == ["image", "video"], "each set is read from disk once"
    assert video is mgr.ensure("video")


def test_small_host_memory_drops_the_largest_components_and_rereads_them(sets, monkeypatch, caplog):
    calls: list[str] = []
    # Room for 20 MiB of parking buffers: video's vae (2) and text encoder (12) fit, its transformer (40) does not.
    small = HostMemory(mem_total=64 * GiB, mem_available=64 * GiB, cgroup_version=2,
                       cgroup_limit=2 * GiB + 20 * MiB, cgroup_usage=2 * GiB)
    mgr = make(sets, calls, budget_gib=60 * MiB / GiB, host_headroom_gib=0, host_memory=lambda: small)
    with caplog.at_level(logging.WARNING):
        mgr.ensure("video")
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "video.transformer" in warning and "re-read from disk" in warning and "limit 2.0 GiB" in warning
    assert mgr.stats().parking["disk"] == ["video.transformer"]
    reads: list[int] = []
    original = weight_loader._pread_into
    monkeypatch.setattr(weight_loader, "_pread_into", lambda fd, dst, off, path: reads.append(dst.numel()) or
                        original(fd, dst, off, path))
    mgr.ensure("image", working_bytes=20 * MiB)  # 54 + 23 + 20 > 60: the video transformer must go
    engine = mgr._sets["video"].engine
    assert all(p.is_meta for p in engine.components()["transformer"].parameters()), "dropped, not parked"
    reads.clear()  # (the image set's own cold load read its files)
    assert_weights(mgr.ensure("video"), sets["video"][1])
    assert sum(reads) >= 40 * MiB - 1024, "the transformer came back from its file"
    assert calls == ["video", "image"], "the loader itself runs once; only the bytes are re-read"


def test_host_limit_read_from_a_cgroup_v1_tree(sets, tmp_path):
    from storystudio.models.host_limits import read_host_memory

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 67108864 kB\nMemAvailable: 60000000 kB\n")
    cg = tmp_path / "sys" / "fs" / "cgroup" / "memory"
    cg.mkdir(parents=True)
    (cg / "memory.limit_in_bytes").write_text(str(1 * GiB + 10 * MiB))
    (cg / "memory.usage_in_bytes").write_text(str(1 * GiB + 100 * MiB))
    (cg / "memory.stat").write_text(f"total_inactive_file {100 * MiB}\n")
    calls: list[str] = []
    mgr = make(sets, calls, budget_gib=60 * MiB / GiB, host_headroom_gib=0, host_memory=lambda: read_host_memory(tmp_path))
    mgr.ensure("video")
    assert mgr.stats().parking == {"host": ["video.vae"], "disk": ["video.transformer", "video.text_encoder"]}


def test_no_parking_buffers_when_every_set_and_the_largest_job_fit(sets):
    calls: list[str] = []
    mgr = make(sets, calls, budget_gib=200 * MiB / GiB)
    mgr.ensure("video")
    mgr.ensure("image")
    st = mgr.stats()
    assert st.parking["host"] == [] and st.swaps == 0
    mgr.park_all(except_name="image")  # what an out-of-memory retry does
    assert_weights(mgr.ensure("video"), sets["video"][1])
    assert calls == ["video", "image"]


def test_exclusive_mode_always_parks_the_other_set_whole(sets):
    calls: list[str] = []
    mgr = make(sets, calls, budget_gib=1.0, exclusive=True)
    mgr.ensure("video")
    mgr.ensure("image")
    res = mgr.component_residency()
    assert not any(v for k, v in res.items() if k.startswith("video.")) and all(
        v for k, v in res.items() if k.startswith("image."))
    assert mgr.stats().exclusive and len(mgr.stats().parking["host"]) == 6


def test_an_unreadable_file_fails_the_load_and_leaves_the_set_unloaded(sets, tmp_path):
    folder = tmp_path / "broken"
    write_set(folder, {"m": 1}, 3)
    good = (folder / "m.safetensors").read_bytes()
    calls: list[str] = []
    load = staged_loader(folder, {"m": 1}, calls, "x")

    def truncating(device):
        plan = load(device)
        (folder / "m.safetensors").write_bytes(good[: len(good) // 2])  # the file shrinks after planning
        return plan

    mgr = ModelManager("cpu", budget_gib=1.0)
    mgr.register("x", truncating)
    with pytest.raises(CheckpointError) as ei:
        mgr.ensure("x")
    assert ei.value.code == "checkpoint_corrupt" and "x.m: weights could not be read" in ei.value.message
    assert "unexpected end of file" in ei.value.message and not mgr.is_loaded("x")
    (folder / "m.safetensors").write_bytes(good)
    mgr2 = ModelManager("cpu", budget_gib=1.0)
    mgr2.register("x", load)
    assert mgr2.ensure("x").components()["m"].ws[0].shape[1] == 64
