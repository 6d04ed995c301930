"""The ModelManager on a real CUDA device: parking and restoring, the budget, the measured room check,
and an out-of-memory job that succeeds on its retry. Skipped without CUDA (``gpu`` marker).

Sizes are fractions of what is free on the card when the test starts, after a *hog* tensor has
taken all but a few GiB, so the same tests run on an 80 GB H100 and a 141 GB H200.

Every manager is made through the ``managers`` fixture, which closes it after the test and checks
that no page-locked host memory is left registered: several managers live one after another in this
process, and a parking buffer freed while still registered made the next test's registrations and
device allocations fail (``cudaErrorHostMemoryAlreadyRegistered`` / ``cudaErrorAlreadyMapped``, first
H100 run of issue 13).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from storystudio.errors import GenerationError
from storystudio.models.host_memory import registered_bytes
from storystudio.models.model_manager import GiB, ModelManager, measured_free_bytes

pytestmark = pytest.mark.gpu

MiB = 1024**2
WORK_BYTES = 6 * GiB  # what the hog leaves free for each test


class Engine:
    """Components of given sizes with seeded values (bf16 blocks of 64 MiB)."""

    def __init__(self, sizes: dict[str, int], device: torch.device, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        self.mods: dict[str, nn.Module] = {}
        for name, n in sizes.items():
            m = nn.Module()
            left, i = n, 0
            while left > 0:
                elems = max(1, min(64 * MiB, left) // 2)
                t = torch.randn(elems, generator=g, device=device).to(torch.bfloat16)
                m.register_parameter(f"w{i}", nn.Parameter(t, requires_grad=False))
                left -= elems * 2
                i += 1
            m.register_buffer("scale", torch.full((7,), float(seed), device=device))
            self.mods[name] = m

    def components(self) -> dict[str, nn.Module]:
        return self.mods

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": t.detach().cpu().clone() for n, m in self.mods.items()
                for k, t in [*m.named_parameters(), *m.named_buffers()]}


@pytest.fixture
def device() -> Iterator[torch.device]:
    dev = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    free = measured_free_bytes(dev)
    assert free is not None and free > WORK_BYTES + GiB, f"needs {WORK_BYTES / GiB + 1:.0f} GiB free, has {free / GiB:.1f}"
    hog = torch.empty(free - WORK_BYTES, dtype=torch.uint8, device=dev)
    yield dev
    del hog
    gc.collect()
    torch.cuda.empty_cache()


MakeManager = Callable[..., ModelManager]


@pytest.fixture
def managers(device) -> Iterator[MakeManager]:
    """Makes the test's managers; closes them afterwards and checks that nothing stays page-locked."""
    made: list[ModelManager] = []
    assert registered_bytes() == 0, "an earlier test left host memory registered"

    def make(*, budget_gib: float | None, sizes: dict[str, dict[str, int]], reserve_gib: float = 0.25) -> ModelManager:
        mgr = ModelManager(device, budget_gib=budget_gib, reserve_gib=reserve_gib)
        for seed, (name, comps) in enumerate(sizes.items(), start=1):
            # Built on the host and adopted: the manager alone puts weights on the device (no second copy there
            # while a set loads, which would blur the memory figures these tests compare).
            mgr.register(name, lambda d, c=comps, s=seed: Engine(c, torch.device("cpu"), s),
                         size_hint_bytes=sum(comps.values()))
        made.append(mgr)
        return mgr

    yield make
    for mgr in made:
        mgr.close()
    made.clear()
    gc.collect()
    assert registered_bytes() == 0, "a closed manager left host memory registered"


SIZES = {"video": {"transformer": 1536 * MiB, "text_encoder": 512 * MiB, "vae": 64 * MiB},
         "image": {"transformer": 768 * MiB, "text_encoder": 512 * MiB, "vae": 32 * MiB}}


def _set_bytes(name: str) -> int:
    return sum(SIZES[name].values())


def test_park_and_restore_round_trip_is_bit_identical_and_frees_vram(device, managers):
    budget = (_set_bytes("video") + _set_bytes("image") - 256 * MiB) / GiB  # both do not fit
    mgr = managers(budget_gib=budget, sizes=SIZES)
    img = mgr.ensure("image")
    before = img.snapshot()
    params = {n: p for n, m in img.components().items() for n2, p in m.named_parameters() if n2 == "w0"}
    allocated = torch.cuda.memory_allocated(device)
    mgr.ensure("video")
    res = mgr.component_residency()
    parked = [k for k, on in res.items() if k.startswith("image.") and not on]
    assert parked, res
    for key in parked:  # parked weights live in pinned host memory, same Parameter objects
        comp = img.components()[key.split(".", 1)[1]]
        p = next(comp.parameters())
        assert p.device.type == "cpu" and p.is_pinned()
    assert torch.cuda.memory_allocated(device) <= allocated + _set_bytes("video") - 256 * MiB + 64 * MiB
    assert mgr.ensure("image") is img
    assert all(next(m.parameters()).device.type == "cuda" for m in img.components().values())
    after = img.snapshot()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a park/restore round trip changed weights"
    for n, p in params.items():
        assert next(img.components()[n].parameters()) is p, "parameter identity must survive parking"
    stats = mgr.stats()
    assert stats.swaps >= 2 and stats.pinned_gib > 0 and stats.parked_gib > 0 and stats.restored_gib > 0


def test_budget_bounds_the_resident_weights(device, managers):
    budget_bytes = _set_bytes("video") + 512 * MiB
    mgr = managers(budget_gib=budget_bytes / GiB, sizes=SIZES)
    base = torch.cuda.memory_allocated(device)
    for name in ("image", "video", "image", "video"):
        mgr.ensure(name, working_bytes=256 * MiB)
        resident = sum(n for k, n in _component_sizes().items() if mgr.component_residency().get(k, False))
        assert resident + 256 * MiB <= budget_bytes, (name, resident)
        # What the allocator holds follows the bookkeeping (±64 MiB of rounding and small buffers).
        assert abs(torch.cuda.memory_allocated(device) - base - resident) <= 64 * MiB
    assert mgr.stats().swaps >= 3


def _component_sizes() -> dict[str, int]:
    return {f"{s}.{c}": n for s, comps in SIZES.items() for c, n in comps.items()}


def test_room_check_trusts_measured_free_memory(device, managers):
    """A budget too large to ever park by bookkeeping; memory taken behind the manager's back is seen."""
    mgr = managers(budget_gib=10_000, sizes=SIZES)
    mgr.ensure("video")
    free = measured_free_bytes(device)
    assert free is not None
    stranger = torch.empty(free - _set_bytes("image") // 2, dtype=torch.uint8, device=device)  # another tenant
    mgr.ensure("image")
    res = mgr.component_residency()
    assert not all(res[f"video.{c}"] for c in SIZES["video"]), "the video set had to make room"
    assert all(res[f"image.{c}"] for c in SIZES["image"])
    del stranger


def test_oom_job_succeeds_on_retry_after_the_failed_attempt_is_freed(device, managers):
    """Both sets resident, a job needing more than is free: the first attempt holds half of its activations
    when it runs out of memory. The retry fits only if the image set is parked AND that half is freed,
    i.e. only if the retry runs after leaving the ``except`` block."""
    mgr = managers(budget_gib=10_000, sizes=SIZES)  # bookkeeping never parks: the job was underestimated
    img = mgr.ensure("image")
    before = img.snapshot()
    mgr.ensure("video")
    free = measured_free_bytes(device)
    assert free is not None
    need = free + _set_bytes("image") * 3 // 4
    half = need // 2
    assert half > _set_bytes("image") * 3 // 4, "sizes must make a leaked half fatal for the retry"
    attempts = []

    def job(engine):
        attempts.append(1)
        first = torch.ones(half, dtype=torch.uint8, device=device)
        second = torch.ones(need - half, dtype=torch.uint8, device=device)
        return int(first[-1]) + int(second[-1])

    assert mgr.run("video", job) == 2
    assert len(attempts) == 2 and mgr.stats().oom_retries == 1
    assert not any(on for k, on in mgr.component_residency().items() if k.startswith("image."))
    assert mgr.ensure("image") is img
    after = img.snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_oom_twice_is_out_of_memory_and_the_manager_stays_usable(device, managers):
    mgr = managers(budget_gib=10_000, sizes=SIZES)
    mgr.ensure("image")

    def too_big(engine):
        return torch.empty(64 * GiB * 1024, dtype=torch.uint8, device=device)

    with pytest.raises(GenerationError) as ei:
        mgr.run("video", too_big)
    assert ei.value.code == "out_of_memory" and "even with every other model parked" in ei.value.message
    assert mgr.run("image", lambda e: 1) == 1
    assert all(mgr.component_residency()[f"image.{c}"] for c in SIZES["image"])
