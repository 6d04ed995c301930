"""ModelManager behaviour on CPU: the parking mechanics are the same code as on CUDA.

A budget is forced so that parking really happens; the weights must survive every
round trip bit for bit, Parameter objects must keep their identity (engines hold
them), and the policy must move the fewest bytes.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from storystudio.errors import GenerationError
from storystudio.models.model_manager import GiB, ModelManager

MiB = 1024**2


class FakeEngine:
    """An engine with named components of known sizes (float32: 4 bytes/param)."""

    def __init__(self, device: torch.device, sizes_mib: dict[str, float], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mods: dict[str, nn.Module] = {}
        for name, mib in sizes_mib.items():
            n = int(mib * MiB) // 4
            lin = nn.Linear(1, 1, bias=False)
            lin.weight = nn.Parameter(torch.randn(n, 1, generator=g).to(device))
            lin.register_buffer("scale", torch.full((3,), float(seed)).to(device))
            self.mods[name] = lin
        self.device = device

    def components(self) -> dict[str, nn.Module]:
        return self.mods

    def checksum(self) -> float:
        return float(sum(m.weight.detach().double().sum() + m.scale.double().sum() for m in self.mods.values()))


def make_manager(budget_mib: float | None, loads: list[str]) -> ModelManager:
    mgr = ModelManager("cpu", budget_gib=None if budget_mib is None else budget_mib * MiB / GiB)

    def loader(name: str, sizes: dict[str, float], seed: int):
        def load(device: torch.device) -> FakeEngine:
            loads.append(name)
            return FakeEngine(device, sizes, seed)

        return load

    # "video": like Wan (big transformer + smaller parts); "image": like Z-Image.
    mgr.register("video", loader("video", {"transformer": 40, "text_encoder": 12, "vae": 2}, 1), size_hint_bytes=54 * MiB)
    mgr.register("image", loader("image", {"transformer": 14, "text_encoder": 8, "vae": 1}, 2), size_hint_bytes=23 * MiB)
    return mgr


def test_unlimited_budget_never_parks_and_loads_once():
    loads: list[str] = []
    mgr = make_manager(None, loads)
    img = mgr.ensure("image")
    vid = mgr.ensure("video")
    assert mgr.ensure("image") is img and mgr.ensure("video") is vid
    assert loads == ["image", "video"]
    st = mgr.stats()
    assert st.swaps == 0 and st.parked == [] and sorted(st.resident) == ["image", "video"]
    assert set(st.loads) == {"image", "video"}


def test_park_and_restore_preserve_weights_and_identity():
    loads: list[str] = []
    mgr = make_manager(70, loads)  # 54 + 23 > 70: something must move
    img = mgr.ensure("image")
    img_sum = img.checksum()
    params = {n: m.weight for n, m in img.components().items()}
    vid = mgr.ensure("video")
    vid_sum = vid.checksum()
    res = mgr.component_residency()
    # deficit 23+54-70 = 7 MiB: the image text encoder (8 MiB) is the smallest component that covers it
    assert res["image.text_encoder"] is False and res["image.transformer"] is True, res
    assert all(res[f"video.{c}"] for c in ("transformer", "text_encoder", "vae"))
    # Parked weights live in the component's host buffer, same Parameter object.
    for name, p in params.items():
        assert img.components()[name].weight is p
    assert mgr.ensure("image") is img
    assert img.checksum() == img_sum
    assert mgr.ensure("video") is vid and vid.checksum() == vid_sum
    assert loads == ["image", "video"], "a parked set must never be re-read from disk"
    st = mgr.stats()
    assert st.swaps >= 2 and st.parked_gib > 0 and st.restored_gib > 0


def test_policy_parks_smallest_sufficient_component_of_lru_set():
    loads: list[str] = []
    mgr = make_manager(80, loads)
    mgr.ensure("video")  # 54 MiB resident
    # image needs 23 MiB + 10 working = 33; free = 26 -> deficit 7 MiB: the vae (2) is too small,
    # the text encoder (12) is the smallest component that covers it.
    mgr.ensure("image", working_bytes=10 * MiB)
    res = mgr.component_residency()
    assert res == {
        "video.transformer": True,
        "video.text_encoder": False,
        "video.vae": True,
        "image.transformer": True,
        "image.text_encoder": True,
        "image.vae": True,
    }


def test_policy_parks_largest_first_when_no_single_component_suffices():
    loads: list[str] = []
    mgr = make_manager(60, loads)
    mgr.ensure("video")
    mgr.ensure("image", working_bytes=30 * MiB)  # needs 53, free 6: deficit 47 > 40 -> transformer, then 12
    res = mgr.component_residency()
    assert res["video.transformer"] is False and res["video.text_encoder"] is False and res["video.vae"] is True


def test_working_bytes_make_more_room():
    loads: list[str] = []
    mgr = make_manager(100, loads)
    mgr.ensure("image")
    mgr.ensure("video", working_bytes=0)
    assert all(mgr.component_residency().values()), "77 MiB fits in 100"
    mgr.ensure("video", working_bytes=30 * MiB)
    res = mgr.component_residency()
    assert res["image.text_encoder"] is False and res["image.transformer"] is True, res


def test_cache_cleanup_runs_only_when_something_left_the_device(monkeypatch):
    import storystudio.models.model_manager as mm

    collects: list[int] = []
    monkeypatch.setattr(mm.gc, "collect", lambda *a: collects.append(1) or 0)
    loads: list[str] = []
    mgr = make_manager(100, loads)  # both sets fit (77 MiB): scenes after scenes, nothing moves
    for _ in range(3):
        assert mgr.run("image", lambda e: 1, working_bytes=MiB) == 1
        assert mgr.run("video", lambda e: 2, working_bytes=MiB) == 2
    assert mgr.stats().swaps == 0 and collects == [], "no park, so no gc.collect / empty_cache per scene"
    mgr.run("video", lambda e: 3, working_bytes=30 * MiB)  # now the image text encoder must leave
    assert mgr.component_residency()["image.text_encoder"] is False
    assert collects == [1], "one cleanup for the one park"


def test_oom_retry_parks_others_then_succeeds():
    loads: list[str] = []
    mgr = make_manager(None, loads)
    mgr.ensure("image")
    calls = []

    def flaky(engine):
        calls.append(dict(mgr.component_residency()))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "ok"

    assert mgr.run("video", flaky) == "ok"
    assert calls[1]["image.transformer"] is False, "the retry must run with every other set parked"
    assert mgr.stats().oom_retries == 1


def test_second_oom_fails_job_with_code_and_worker_stays_usable():
    loads: list[str] = []
    mgr = make_manager(None, loads)

    def always_oom(engine):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(GenerationError) as ei:
        mgr.run("video", always_oom)
    assert ei.value.code == "out_of_memory"
    assert "out of memory" in ei.value.message.lower() and "video" in ei.value.message
    assert mgr.run("image", lambda e: e.checksum()) == mgr.ensure("image").checksum()


def test_loader_failure_propagates_and_can_be_retried():
    mgr = ModelManager("cpu")
    attempts = []

    def bad(device):
        attempts.append(1)
        if len(attempts) == 1:
            raise FileNotFoundError("missing shard")
        return FakeEngine(device, {"m": 1}, 3)

    mgr.register("x", bad)
    with pytest.raises(FileNotFoundError):
        mgr.ensure("x")
    assert not mgr.is_loaded("x")
    assert mgr.ensure("x").checksum() != 0 and len(attempts) == 2


def test_unknown_set_and_duplicate_registration():
    mgr = make_manager(None, [])
    with pytest.raises(KeyError, match="unknown model set 'audio'"):
        mgr.ensure("audio")
    with pytest.raises(ValueError, match="already registered"):
        mgr.register("image", lambda d: None)


def test_one_generation_at_a_time():
    mgr = make_manager(70, [])
    active = []
    overlap = []

    def work(engine):
        active.append(1)
        if len(active) > 1:
            overlap.append(1)
        time.sleep(0.01)
        active.pop()
        return engine.checksum()

    threads = [threading.Thread(target=mgr.run, args=(n, work)) for n in ["image", "video"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap


def test_tied_weights_share_one_slot():
    class Tied:
        def __init__(self, device):
            emb = nn.Embedding(10, 4).to(device)
            head = nn.Linear(4, 10, bias=False).to(device)
            head.weight = emb.weight
            self.m = nn.ModuleDict({"emb": emb, "head": head})

        def components(self):
            return {"lm": self.m}

    mgr = ModelManager("cpu", budget_gib=1e-9)
    mgr.register("a", Tied)
    mgr.register("b", lambda d: FakeEngine(d, {"m": 0.001}, 5))
    a = mgr.ensure("a")
    w = a.m["emb"].weight.detach().clone()
    mgr.ensure("b")
    assert mgr.component_residency()["a.lm"] is False
    mgr.ensure("a")
    assert a.m["head"].weight is a.m["emb"].weight
    assert torch.equal(a.m["head"].weight, w)


def test_parking_buffers_are_pinned_while_loading_never_at_a_park(monkeypatch):
    """Pinning stalls the GPU and cost 11.6 s on a fresh worker's first swap: it must happen at load only.

    CPU torch cannot page-lock, so the registration itself is recorded instead.
    """
    from storystudio.models.host_memory import HostBuffer

    pinned: list[str] = []
    monkeypatch.setattr(HostBuffer, "pin", lambda self: pinned.append(self.key))
    mgr = ModelManager("cpu", budget_gib=60 * MiB / GiB, pin_memory=True)
    mgr.register("a", lambda d: FakeEngine(d, {"big": 40}, 1))
    mgr.register("b", lambda d: FakeEngine(d, {"big": 30}, 2), size_hint_bytes=30 * MiB)
    a = mgr.ensure("a")
    s = a.checksum()
    assert pinned == ["a.big"], "the parking buffer is made and pinned during the cold load"
    mgr.ensure("b")
    assert pinned == ["a.big", "b.big"]
    for _ in range(2):
        mgr.ensure("a")
        mgr.ensure("b")
    assert pinned == ["a.big", "b.big"], "no park or restore pins anything"
    assert mgr.component_residency()["a.big"] is False
    assert mgr.ensure("a").checksum() == s
    assert mgr.stats().parking == {"host": ["a.big", "b.big"], "disk": []}


def test_plan_chunks_never_splits_a_tensor():
    from storystudio.models.host_memory import plan_chunks

    ranges = [(0, 100), (128, 300), (512, 2000), (2048, 2100), (2304, 2400)]
    chunks = plan_chunks(ranges, 2560, chunk_bytes=256)
    assert chunks == [(0, 300), (300, 2000), (2000, 2400), (2400, 2560)]
    for a, b in ranges:
        assert any(ca <= a and b <= cb for ca, cb in chunks), (a, b)
    assert plan_chunks([], 0) == [(0, 0)]
    assert plan_chunks([(0, 10)], 256, chunk_bytes=1 << 20) == [(0, 256)]


# ---------------------------------------------------------------- two copies of some weights (fast preset)
class TwoCopyEngine:
    """Like the video engine: a ``linears`` group listed before the ``transformer`` that also holds
    those Parameter objects, and an FP8-like copy (float8 buffers) added after loading."""

    def __init__(self, device: torch.device) -> None:
        g = torch.Generator().manual_seed(5)
        self.transformer = nn.Module()
        self.transformer.lin = nn.Linear(1024, 1024, bias=False)  # 4 MiB (float32)
        self.transformer.other = nn.Linear(512, 1024, bias=False)  # 2 MiB
        with torch.no_grad():
            for p in self.transformer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.transformer.to(device)
        self.linears = nn.Module()
        self.linears.register_parameter("lin", self.transformer.lin.weight)
        self.copy: nn.Module | None = None

    def build_copy(self) -> None:
        self.copy = nn.Module()
        w = self.transformer.lin.weight.detach()
        self.copy.register_buffer("q", (w / w.abs().max() * 448).to(torch.float8_e4m3fn))  # 1 MiB
        self.copy.register_buffer("scale", w.abs().max().reshape(1, 1) / 448)

    def components(self) -> dict[str, nn.Module]:
        comps = {"linears": self.linears, "transformer": self.transformer}
        if self.copy is not None:
            comps["copy"] = self.copy
        return comps


def _two_copy_manager(budget_mib: float | None) -> ModelManager:
    mgr = ModelManager("cpu", budget_gib=None if budget_mib is None else budget_mib * MiB / GiB)
    mgr.register("video", TwoCopyEngine)
    mgr.register("image", lambda d: FakeEngine(d, {"transformer": 3}, 2), size_hint_bytes=3 * MiB)
    return mgr


def _nbytes(mgr: ModelManager, key: str) -> int:
    set_name, comp = key.split(".")
    return next(c.nbytes for c in mgr._get(set_name).components if c.name == comp)


def test_a_tensor_listed_by_two_components_belongs_to_the_first():
    mgr = _two_copy_manager(None)
    mgr.ensure("video")
    assert _nbytes(mgr, "video.linears") == 4 * MiB
    assert _nbytes(mgr, "video.transformer") == 2 * MiB  # lin.weight is not laid out twice


def test_components_added_after_load_are_adopted_and_park_bit_exactly():
    mgr = _two_copy_manager(None)
    eng = mgr.ensure("video")
    assert "video.copy" not in mgr.component_residency()
    eng.build_copy()
    q_before = eng.copy.q.clone()
    assert mgr.adopt_components("video") == ["copy"] and mgr.adopt_components("video") == []
    assert mgr.component_residency()["video.copy"] is True and _nbytes(mgr, "video.copy") == MiB + 256
    buf = eng.copy.q
    mgr.park("video")
    assert mgr.component_residency()["video.copy"] is False
    mgr.ensure("video")
    assert eng.copy.q is buf and eng.copy.q.dtype == torch.float8_e4m3fn
    assert torch.equal(eng.copy.q.view(torch.uint8), q_before.view(torch.uint8))


def test_adopting_refuses_a_replaced_component_and_an_unloaded_set():
    mgr = _two_copy_manager(None)
    with pytest.raises(RuntimeError, match="not loaded"):
        mgr.adopt_components("video")
    eng = mgr.ensure("video")
    eng.linears = nn.Module()
    with pytest.raises(RuntimeError, match="video.linears was removed or replaced"):
        mgr.adopt_components("video")


def test_idle_components_are_not_restored_and_are_parked_first():
    mgr = _two_copy_manager(8.5)  # linears 4 + transformer 2 + copy 1 + image 3 = 10 > 8.5
    eng = mgr.ensure("video")
    eng.build_copy()
    mgr.adopt_components("video")
    mgr.ensure("image")  # 7 + 3 > 8.5: the LRU video set gives up its smallest sufficient component
    assert mgr.component_residency()["video.transformer"] is False
    # A job on the copy: the bf16 linears are idle, so they are parked (not the image set)
    # and the rest is restored.
    mgr.ensure("video", idle={"linears"})
    res = mgr.component_residency()
    assert res == {"video.linears": False, "video.transformer": True, "video.copy": True, "image.transformer": True}
    assert mgr.stats().resident == ["video", "image"]  # ready for the kind of job it last ran
    # An exact job: the copy is idle now, the linears come back, the copy makes room first.
    mgr.ensure("video", idle={"copy"})
    res = mgr.component_residency()
    assert res["video.linears"] is True and res["video.copy"] is False and res["video.transformer"] is True
    assert torch.equal(eng.linears.lin, eng.transformer.lin.weight)


def test_park_idle_frees_only_the_running_jobs_idle_components():
    mgr = _two_copy_manager(None)  # unlimited: nothing is parked unless asked
    eng = mgr.ensure("video")
    eng.build_copy()
    mgr.adopt_components("video")
    mgr.ensure("image")
    q_before = eng.copy.q.clone()
    seen = []

    def job(engine):
        # An exact job (the copy is idle) asks for room mid-job, e.g. for its CFG batch of two.
        seen.append(mgr.park_idle("video", 1))
        seen.append(mgr.park_idle("video", 1))  # nothing idle is left on the device
        return mgr.component_residency()

    res = mgr.run("video", job, idle={"copy"})
    assert seen == [_nbytes(mgr, "video.copy"), 0]
    assert res == {"video.linears": True, "video.transformer": True, "video.copy": False, "image.transformer": True}
    # A job with nothing idle parks nothing, and other sets never move for it.
    assert mgr.run("image", lambda e: mgr.park_idle("image", 10**9)) == 0
    assert mgr.component_residency()["video.linears"] is True
    # The copy comes back intact for the next job that reads it.
    mgr.ensure("video", idle={"linears"})
    assert mgr.component_residency()["video.copy"] is True and torch.equal(eng.copy.q, q_before)


def test_oom_retry_also_parks_the_jobs_idle_components():
    mgr = _two_copy_manager(None)
    eng = mgr.ensure("video")
    eng.build_copy()
    mgr.adopt_components("video")
    seen = []

    def flaky(engine):
        seen.append(mgr.component_residency())
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "ok"

    assert mgr.run("video", flaky, idle={"linears"}) == "ok"
    assert seen[1]["video.linears"] is False and seen[1]["video.copy"] is True
