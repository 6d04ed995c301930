"""ModelManager: which model set lives in VRAM, and how the other one is parked.

The worker serves two model sets on one GPU: Wan2.2-S2V (≈45 GB with T5, VAE and
wav2vec2) and Z-Image-Turbo (≈21 GB with its text encoder). On an 80 GB card they
do not always fit together with a video's activations, so one of them sometimes
has to leave VRAM. The naive way, ``module.to("cpu")``, measured 39 s for the Wan
DiT alone (pageable memory, one allocation per tensor); copying into a
preallocated *pinned* host buffer measured 0.6 s. That is the whole idea here:

* every component (an ``nn.Module`` the engine registers) gets one flat pinned
  host buffer, allocated once; its parameters and buffers are views into that
  buffer while parked and views into one flat device buffer while resident;
* parking = one device→host copy per component, restoring = one host→device
  copy; the modules themselves are never re-created, only ``tensor.data`` is
  re-pointed, so engines keep working without knowing anything happened;
* only as many bytes as needed are parked (smallest sufficient component of the
  least recently used set first), so on a 141 GB H200 nothing moves at all;
* a set is read from disk once per process; parked sets never touch disk again;
* a job may leave some components of its own set *idle* (``run(..., idle=...)``):
  they are not restored for it and are the first to be parked when room is needed.
  The video engine uses this for its two copies of the DiT linears (bf16 for exact
  jobs, FP8 for fast ones), the FP8 copy being added to the loaded set later
  (:meth:`ModelManager.adopt_components`). A tensor listed by several components of
  a set belongs to the first that lists it.

On CPU the same code runs with ordinary host memory and, by default, an
unlimited budget, so the whole worker runs in tests; tests can set a budget to
exercise parking for real.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from storystudio.errors import GenerationError
from storystudio.models.engine import resolve_device
from storystudio.models.host_memory import HostBuffer, plan_chunks

logger = logging.getLogger(__name__)

GiB = 1024**3
_ALIGN = 256  # byte alignment of every tensor inside a flat buffer (any dtype view is legal)
_T = TypeVar("_T")


@dataclass
class _Slot:
    """One weight tensor's place inside its component's flat buffers."""

    tensor: torch.Tensor  # the Parameter or buffer object itself; its .data is re-pointed
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


class _Component:
    """One registered module: its tensors, where they live, and its two flat buffers."""

    def __init__(self, set_name: str, name: str, module: nn.Module, device: torch.device,
                 seen: set[int] | None = None) -> None:
        self.set_name = set_name
        self.name = name
        self.module = module
        self.slots: list[_Slot] = []
        # ``seen`` is shared by the components of one set: a tensor already owned by an
        # earlier component (or tied within this one) is not laid out twice.
        seen = set() if seen is None else seen
        offset = 0
        for t in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)):
            if id(t) in seen:  # tied weights: one slot, both names follow it
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            self.slots.append(_Slot(t, offset, nbytes, t.dtype, t.shape))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.host: HostBuffer | None = None  # flat host copy, kept for the life of the process
        # Freshly loaded weights are scattered allocations; after the first restore they are
        # views into one flat device buffer, and parking becomes a single copy.
        self.device_flat: torch.Tensor | None = None
        self.on_device = all(s.tensor.device == device for s in self.slots) if self.slots else True

    @property
    def key(self) -> str:
        return f"{self.set_name}.{self.name}"


@dataclass
class _ModelSet:
    name: str
    loader: Callable[[torch.device], Any]
    size_hint_bytes: int
    engine: Any = None
    components: list[_Component] = field(default_factory=list)
    last_used: float = 0.0
    load_seconds: float | None = None
    idle: frozenset[str] = frozenset()  # components the last job of this set did not need

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def device_bytes(self) -> int:
        return sum(c.nbytes for c in self.components if c.on_device)

    def missing_bytes(self, idle: frozenset[str] = frozenset()) -> int:
        if not self.loaded:
            return self.size_hint_bytes
        return sum(c.nbytes for c in self.components if not c.on_device and c.name not in idle)

    def ready(self) -> bool:
        """Every component its last job needed is on the device."""
        return all(c.on_device for c in self.components if c.name not in self.idle)


@dataclass
class ManagerStats:
    """Cumulative counters, reported in every job result."""

    device: str
    budget_gib: float | None
    resident: list[str]
    parked: list[str]
    loads: dict[str, float]
    swaps: int
    swap_seconds: float
    parked_gib: float
    restored_gib: float
    oom_retries: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "budget_gib": self.budget_gib,
            "resident": self.resident,
            "parked": self.parked,
            "load_seconds": self.loads,
            "swaps": self.swaps,
            "swap_seconds": round(self.swap_seconds, 3),
            "parked_gib": round(self.parked_gib, 3),
            "restored_gib": round(self.restored_gib, 3),
            "oom_retries": self.oom_retries,
        }


def device_budget_bytes(device: torch.device, *, override_gib: float | None, reserve_gib: float) -> int | None:
    """VRAM the manager may fill with weights plus one job's activations.

    ``None`` means unlimited (CPU without an explicit override). On CUDA the total
    is read from the device and a reserve is kept for the CUDA context, cuBLAS
    workspaces and allocator fragmentation.
    """
    if override_gib is not None:
        return int(override_gib * GiB)
    if device.type != "cuda":
        return None
    _free, total = torch.cuda.mem_get_info(device)
    return int(total - reserve_gib * GiB)


class ModelManager:
    """Keeps the needed model set in VRAM and parks others in pinned host memory.

    Register each set with a loader; ``run(name, fn, working_bytes=...)`` makes it
    resident and calls ``fn(engine)`` under the generation lock (one generation at a
    time per GPU), retrying once on CUDA out-of-memory. ``ensure`` alone makes a set
    resident (the batch uses it to time its one swap).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        budget_gib: float | None = None,
        reserve_gib: float = 1.5,
        pin_memory: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.budget_bytes = device_budget_bytes(self.device, override_gib=budget_gib, reserve_gib=reserve_gib)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else pin_memory
        self._sets: dict[str, _ModelSet] = {}
        self._lock = threading.RLock()
        self._clock = 0.0
        self._swaps = 0
        self._swap_seconds = 0.0
        self._parked_bytes = 0
        self._restored_bytes = 0
        self._oom_retries = 0
        self._move_seconds = 0.0  # time inside park/restore copies only (not cold loads)
        logger.info(
            "ModelManager on %s, budget %s, pinned host buffers: %s",
            self.device,
            "unlimited" if self.budget_bytes is None else f"{self.budget_bytes / GiB:.1f} GiB",
            self.pin_memory,
        )

    # ------------------------------------------------------------------ registry
    def register(self, name: str, loader: Callable[[torch.device], Any], *, size_hint_bytes: int = 0) -> None:
        """Declare a model set. ``loader(device)`` builds the engine; it runs at most once."""
        with self._lock:
            if name in self._sets:
                raise ValueError(f"model set {name!r} is already registered")
            self._sets[name] = _ModelSet(name, loader, size_hint_bytes)

    def is_loaded(self, name: str) -> bool:
        return self._get(name).loaded

    def _get(self, name: str) -> _ModelSet:
        try:
            return self._sets[name]
        except KeyError:
            raise KeyError(f"unknown model set {name!r}; registered: {sorted(self._sets)}") from None

    # ------------------------------------------------------------------ residency
    def ensure(self, name: str, *, working_bytes: int = 0, idle: Iterable[str] = ()) -> Any:
        """Make set ``name`` resident (loading it once if needed) and return its engine.

        ``working_bytes`` is the activation memory the coming job needs; room for it
        is made too, so a 720p video may push out more of the other set than a 480p one.
        Components named in ``idle`` are not needed by the coming job: they are not
        restored, and they are parked first when room is needed.
        """
        idle = frozenset(idle)
        with self._lock:
            ms = self._get(name)
            self._clock += 1
            ms.last_used = self._clock
            ms.idle = idle
            moved_before = (self._parked_bytes, self._restored_bytes)
            move_before = self._move_seconds
            self._make_room(ms, ms.missing_bytes(idle) + working_bytes)
            if not ms.loaded:
                self._cold_load(ms)
            else:
                for comp in ms.components:
                    if not comp.on_device and comp.name not in idle:
                        self._restore(comp)
            moved = (self._parked_bytes, self._restored_bytes) != moved_before
            if moved:
                self._sync()
                dt = self._move_seconds - move_before
                self._swaps += 1
                self._swap_seconds += dt
                logger.info("model set %s resident after %.3f s of parking/restoring", name, dt)
            return ms.engine

    def run(self, name: str, fn: Callable[[Any], _T], *, working_bytes: int = 0, idle: Iterable[str] = ()) -> _T:
        """Run ``fn(engine)`` with the set resident; on CUDA OOM park everything else and retry once.

        ``idle``: components of this set the job does not need (see :meth:`ensure`).
        A second OOM fails the job with ``out_of_memory`` and leaves the worker
        usable: caches are emptied and no set is left half-moved.
        """
        idle = frozenset(idle)
        with self._lock:
            engine = self.ensure(name, working_bytes=working_bytes, idle=idle)
            try:
                return fn(engine)
            except torch.OutOfMemoryError as first:
                logger.warning("out of memory in %s (%s); parking every other set and retrying once", name, first)
                self._oom_retries += 1
                self._free_cuda_cache()
                self.park_all(except_name=name)
                for comp in self._get(name).components:
                    if comp.on_device and comp.name in idle:
                        self._park(comp)
                self._free_cuda_cache()
                engine = self.ensure(name, working_bytes=working_bytes, idle=idle)
                try:
                    return fn(engine)
                except torch.OutOfMemoryError as second:
                    self._free_cuda_cache()
                    raise GenerationError(
                        f"GPU out of memory in {name} even with every other model parked: {second}. "
                        "Use a lower resolution or fewer frames per clip.",
                        code="out_of_memory",
                    ) from None

    def park(self, name: str) -> None:
        """Park every component of one set (no-op for sets not loaded)."""
        with self._lock:
            ms = self._get(name)
            for comp in ms.components:
                if comp.on_device:
                    self._park(comp)
            self._sync()

    def park_all(self, *, except_name: str | None = None) -> None:
        with self._lock:
            for ms in self._sets.values():
                if ms.name != except_name:
                    self.park(ms.name)

    def adopt_components(self, name: str) -> list[str]:
        """Manage the components the loaded engine of ``name`` has added since it was loaded.

        For weights an engine builds after loading (the video engine's FP8 copy of its
        linears). Existing components must stay as they are; a new one may only hold
        tensors no earlier component holds (shared ones stay with their first owner).
        Returns the names adopted.
        """
        with self._lock:
            ms = self._get(name)
            if not ms.loaded:
                raise RuntimeError(f"model set {name!r} is not loaded")
            current = ms.engine.components()
            known = {c.name: c for c in ms.components}
            for cname, comp in known.items():
                if current.get(cname) is not comp.module:
                    raise RuntimeError(f"component {name}.{cname} was removed or replaced after loading")
            seen = {id(s.tensor) for c in ms.components for s in c.slots}
            added = []
            for cname, module in current.items():
                if cname in known:
                    continue
                comp = _Component(name, cname, module, self.device, seen)
                ms.components.append(comp)
                if not comp.on_device:
                    self._restore(comp)
                added.append(cname)
                logger.info("adopted component %s: %.2f GiB", comp.key, comp.nbytes / GiB)
            return added

    def warm_host_buffers(self, name: str) -> None:
        """Allocate and pin a set's host buffers now rather than at its first park (benchmarks)."""
        with self._lock:
            for comp in self._get(name).components:
                self._host_buffer(comp)

    # ------------------------------------------------------------------ stats
    def stats(self) -> ManagerStats:
        with self._lock:
            resident, parked, loads = [], [], {}
            for ms in self._sets.values():
                if not ms.loaded:
                    continue
                loads[ms.name] = round(ms.load_seconds or 0.0, 3)
                (resident if ms.ready() else parked).append(ms.name)
            return ManagerStats(
                device=str(self.device),
                budget_gib=None if self.budget_bytes is None else round(self.budget_bytes / GiB, 2),
                resident=resident,
                parked=parked,
                loads=loads,
                swaps=self._swaps,
                swap_seconds=self._swap_seconds,
                parked_gib=self._parked_bytes / GiB,
                restored_gib=self._restored_bytes / GiB,
                oom_retries=self._oom_retries,
            )

    def component_residency(self) -> dict[str, bool]:
        """``{"set.component": on_device}`` for every loaded component (logs, tests, bench)."""
        with self._lock:
            return {c.key: c.on_device for ms in self._sets.values() for c in ms.components}

    # ------------------------------------------------------------------ internals
    def _device_bytes(self) -> int:
        return sum(ms.device_bytes() for ms in self._sets.values())

    def _make_room(self, target: _ModelSet, need: int) -> None:
        """Park the fewest bytes of least-recently-used sets so that ``need`` more fits."""
        if self.budget_bytes is None:
            return
        deficit = self._device_bytes() + need - self.budget_bytes
        if deficit <= 0:
            return  # nothing moves, so there is nothing to synchronise or give back
        # The target's own idle components first: the coming job does not read them.
        own = [c for c in target.components if c.on_device and c.name in target.idle]
        while deficit > 0 and own:
            victim = self._pick_victim(own, deficit)
            own.remove(victim)
            self._park(victim)
            deficit -= victim.nbytes
        while deficit > 0:
            others = [ms for ms in self._sets.values() if ms is not target and ms.device_bytes() > 0]
            if not others:
                logger.warning(
                    "model set %s needs %.1f GiB more than the budget even with everything else parked; "
                    "trying anyway",
                    target.name,
                    deficit / GiB,
                )
                return
            lru = min(others, key=lambda ms: ms.last_used)
            victim = self._pick_victim([c for c in lru.components if c.on_device], deficit)
            self._park(victim)
            deficit -= victim.nbytes
        self._sync()
        self._free_cuda_cache()

    @staticmethod
    def _pick_victim(comps: list[_Component], deficit: int) -> _Component:
        """The smallest component that covers the deficit alone, else the largest."""
        enough = [c for c in comps if c.nbytes >= deficit]
        return min(enough, key=lambda c: c.nbytes) if enough else max(comps, key=lambda c: c.nbytes)

    def _cold_load(self, ms: _ModelSet) -> None:
        logger.info("loading model set %s from disk onto %s", ms.name, self.device)
        t0 = time.perf_counter()
        engine = ms.loader(self.device)
        self._sync()
        ms.load_seconds = time.perf_counter() - t0
        ms.engine = engine
        seen: set[int] = set()
        ms.components = [_Component(ms.name, n, m, self.device, seen) for n, m in engine.components().items()]
        off = [c.key for c in ms.components if not c.on_device]
        if off:
            # The engine left something on the host (e.g. loaded on CPU first): bring it over
            # through the same path so it ends in a flat device buffer.
            for comp in ms.components:
                if not comp.on_device:
                    self._restore(comp)
        gib = sum(c.nbytes for c in ms.components) / GiB
        logger.info("loaded model set %s: %.2f GiB of weights in %.2f s", ms.name, gib, ms.load_seconds)

    def _new_host_buffer(self, comp: _Component) -> HostBuffer:
        ranges = [(s.offset, s.offset + s.nbytes) for s in comp.slots]
        return HostBuffer(comp.key, comp.nbytes, plan_chunks(ranges, comp.nbytes))

    def _host_buffer(self, comp: _Component) -> HostBuffer:
        """The component's host buffer, made (and page-locked) the first time it is needed.

        Pinning costs ~0.55 s per GiB once per process (30 GiB DiT: 16 s on the H100
        host) and stalls the GPU while it runs, measured both as one cudaHostAlloc and
        as chunked cudaHostRegister done in the background during a job (the first video
        took 38.6 s instead of 17 s). So nothing is pinned ahead of time: only a
        component that actually gets parked pays, once, at its first park — on an H100
        serving 480p, or on an H200, nothing is ever parked and nothing is pinned.
        """
        if comp.host is None:
            comp.host = self._new_host_buffer(comp)
            if self.pin_memory:
                comp.host.pin()
        return comp.host

    @staticmethod
    def _view(flat: torch.Tensor, slot: _Slot) -> torch.Tensor:
        raw = flat[slot.offset : slot.offset + slot.nbytes]
        if slot.nbytes == 0:
            return torch.empty(slot.shape, dtype=slot.dtype, device=flat.device)
        return raw.view(slot.dtype).view(slot.shape)

    def _park(self, comp: _Component) -> None:
        t0 = time.perf_counter()
        host = self._host_buffer(comp)
        if comp.device_flat is not None:
            host.copy_from(comp.device_flat)
        else:
            for slot in comp.slots:
                if slot.nbytes:
                    self._view(host.tensor, slot).copy_(slot.tensor.data, non_blocking=True)
        self._sync()  # the copies must land before the device memory can be reused
        for slot in comp.slots:
            slot.tensor.data = self._view(host.tensor, slot)
        comp.device_flat = None
        comp.on_device = False
        self._parked_bytes += comp.nbytes
        dt = time.perf_counter() - t0
        self._move_seconds += dt
        logger.info("parked %s: %.2f GiB in %.3f s", comp.key, comp.nbytes / GiB, dt)

    def _restore(self, comp: _Component) -> None:
        t0 = time.perf_counter()
        fresh = comp.host is None  # weights that never lived on the device (engine loaded them on the host)
        host = self._host_buffer(comp)
        if fresh:
            for slot in comp.slots:
                if slot.nbytes:
                    self._view(host.tensor, slot).copy_(slot.tensor.data)
        try:
            flat = torch.empty(comp.nbytes, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:
            self._free_cuda_cache()
            flat = torch.empty(comp.nbytes, dtype=torch.uint8, device=self.device)
        host.copy_to(flat)
        for slot in comp.slots:
            slot.tensor.data = self._view(flat, slot)
        comp.device_flat = flat
        comp.on_device = True
        self._restored_bytes += comp.nbytes
        self._sync()  # honest timings; the next kernel would wait for the copy anyway
        dt = time.perf_counter() - t0
        self._move_seconds += dt
        logger.info("restored %s: %.2f GiB in %.3f s", comp.key, comp.nbytes / GiB, dt)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free_cuda_cache(self) -> None:
        """Drop garbage and hand cached blocks back to CUDA, so freed weights are reusable.

        Called only after something actually left the device (parking, an OOM): otherwise
        it costs time and throws away the allocator cache the next job would reuse.
        """
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
