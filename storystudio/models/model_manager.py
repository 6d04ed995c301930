"""ModelManager: which model set lives in VRAM, and how the other one is parked.

The worker serves two model sets on one GPU: Wan2.2-S2V (≈45 GB with T5, VAE and
wav2vec2) and Z-Image-Turbo (≈21 GB with its text encoder). On an 80 GB card they
do not always fit together with a video's activations, so one of them sometimes
has to leave VRAM. The naive way, ``module.to("cpu")``, measured 39 s for the Wan
DiT alone (pageable memory, one allocation per tensor); copying into a
preallocated *pinned* host buffer measured 0.6 s. That is the whole idea here:

* every component (an ``nn.Module`` the engine registers) has one flat device
  buffer while resident and, where host memory allows, one flat page-locked host
  buffer (its *parking buffer*) for the life of the process; its parameters and
  buffers are views into one or the other;
* restoring = one host→device copy per component. Parking copies nothing: the
  parking buffer already holds the weights, because the weights were read into it
  from the files (inference never writes to weights), so parking only re-points the
  views and frees the device buffer;
* only as many bytes as needed are parked (smallest sufficient component of the
  least recently used set first), so on a 141 GB H200 nothing moves at all; with
  ``exclusive=True`` (a card too small for both sets, see :mod:`storystudio.preflight`)
  the other set is always parked whole;
* a set is read from disk once per process, unless host memory could not hold its
  parking buffers (below);
* a job may leave some components of its own set *idle* (``run(..., idle=...)``):
  they are not restored for it and are the first to be parked when room is needed.
  The video engine uses this for its two copies of the DiT linears (bf16 for exact
  jobs, FP8 for fast ones), the FP8 copy being added to the loaded set later
  (:meth:`ModelManager.adopt_components`). A tensor listed by several components of
  a set belongs to the first that lists it.

Load protocol (manager ↔ engine loaders)
----------------------------------------
``register(name, loader)``; ``loader(device)`` returns a
:class:`~storystudio.models.weight_files.LoadPlan`: the engine with its weight
components built on ``meta`` (architecture only) plus, per component, where each
tensor's bytes are in the files. The manager then, per component:

1. lays out one flat byte buffer from the module's tensor shapes and dtypes
   (:class:`~storystudio.models.weight_loader.Layout`);
2. decides where its parking copy lives (:meth:`ModelManager._plan_parking`): a host
   buffer, or none — the component is then dropped when parked and re-read from the
   files when it comes back;
3. has the weight loader read the files straight into the host buffer in parallel,
   page-locking each ~256 MiB chunk (``cudaHostRegister``) as soon as it is filled
   and copying it to the device buffer while the next chunks are read — so pinning
   happens while loading, never on a job's critical path (it used to cost ≈0.55 s
   per GiB at a component's first park, 11.6 s on a fresh worker's first swap);
   without a host buffer the files stream through a small pinned staging ring;
4. points every parameter at its view of the device buffer.

A loader may also return a ready engine (or leave a component out of the plan's
sources): those real tensors are *adopted* — copied into a pinned parking buffer and
one flat device buffer at load, through the same bookkeeping.

Parking buffers and host memory
-------------------------------
Page-locked memory cannot be reclaimed, and a container that exceeds its memory
limit is killed by the kernel. So before a set's buffers are made, the container's
limit (cgroup v2/v1) and the host's ``MemAvailable`` are read
(:mod:`storystudio.models.host_limits`), minus a headroom for the jobs themselves.
Components whose parking buffers do not fit (the largest first) park by being
dropped and are re-read from disk when needed; this is logged with the numbers.
No parking buffers are made at all when the device budget holds every set plus the
largest planned job (an H200): nothing would ever be parked, and pinning would only
cost load time and RAM.

On CPU the same code runs with ordinary host memory and, by default, an unlimited
budget, so the whole worker runs in tests; tests can set a budget to exercise
parking for real, and inject a host memory reading to exercise the disk fallback.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from storystudio.errors import CheckpointError, GenerationError
from storystudio.models.engine import resolve_device
from storystudio.models.host_limits import HostMemory, read_host_memory
from storystudio.models.host_memory import HostBuffer
from storystudio.models.weight_files import LoadPlan, TensorSource
from storystudio.models.weight_loader import READ_THREADS, Layout, StagingRing, fill

logger = logging.getLogger(__name__)

GiB = 1024**3
_T = TypeVar("_T")


class ManagedEngine(Protocol):
    """What an engine must expose to be managed: its weight-holding modules by name."""

    def components(self) -> dict[str, nn.Module]: ...


class _Component:
    """One registered module: its layout, where its weights come from, and its two flat buffers."""

    def __init__(self, set_name: str, name: str, module: nn.Module, layout: Layout,
                 sources: dict[str, TensorSource] | None) -> None:
        self.set_name = set_name
        self.name = name
        self.module = module
        self.layout = layout
        self.sources = sources  # None: adopted (real tensors at load, no files to re-read)
        self.host: HostBuffer | None = None  # parking buffer, kept for the life of the process
        self.device_flat: torch.Tensor | None = None
        self.on_device = False
        self.parks_to_host = True  # decided at load by ModelManager._plan_parking
        self.late = False  # adopted after its set was loaded: parking buffer made at the first park

    @property
    def key(self) -> str:
        return f"{self.set_name}.{self.name}"

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def release(self) -> None:
        """Give back both buffers (a load that failed half-way)."""
        if self.host is not None:
            self.host.release()
            self.host = None
        self.device_flat = None
        self.on_device = False


@dataclass
class _ModelSet:
    name: str
    loader: Callable[[torch.device], Any]
    size_hint_bytes: int
    max_working_bytes: int = 0
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

    def weight_bytes(self) -> int:
        return sum(c.nbytes for c in self.components) if self.loaded else self.size_hint_bytes


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
    pinned_gib: float = 0.0
    parking: dict[str, list[str]] = field(default_factory=dict)  # "host" / "disk" -> component keys
    exclusive: bool = False

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
            "pinned_gib": round(self.pinned_gib, 3),
            "parking": self.parking,
            "exclusive": self.exclusive,
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


def measured_free_bytes(device: torch.device) -> int | None:
    """Device memory a new allocation can get now, measured: ``None`` off CUDA.

    ``torch.cuda.mem_get_info`` sees what the driver has free (other processes, the
    CUDA context, cuBLAS workspaces and fragmentation included, which bookkeeping of
    weights cannot see); blocks PyTorch's caching allocator holds but does not use are
    free for this process too, so they are added back.
    """
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


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
        exclusive: bool = False,
        host_headroom_gib: float = 8.0,
        host_memory: Callable[[], HostMemory] = read_host_memory,
        read_threads: int = READ_THREADS,
        free_memory: Callable[[torch.device], int | None] = measured_free_bytes,
    ) -> None:
        """``exclusive``: always park the other sets whole (cards that cannot hold both).
        ``host_headroom_gib``: host RAM never given to parking buffers (the jobs' own
        memory: decoded media, frames, encoders' outputs). ``host_memory`` reads the
        host's and the container's memory (tests inject small limits)."""
        self.device = resolve_device(device)
        self.budget_bytes = device_budget_bytes(self.device, override_gib=budget_gib, reserve_gib=reserve_gib)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else pin_memory
        self.exclusive = exclusive
        self.host_headroom_bytes = int(host_headroom_gib * GiB)
        self._host_memory = host_memory
        self._free_memory = free_memory
        self.reserve_bytes = int(reserve_gib * GiB)
        self.read_threads = read_threads
        self._staging: StagingRing | None = None
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
            "ModelManager on %s, budget %s, pinned host buffers: %s, %s",
            self.device,
            "unlimited" if self.budget_bytes is None else f"{self.budget_bytes / GiB:.1f} GiB",
            self.pin_memory,
            "always swapping whole sets" if exclusive else "parking the fewest bytes",
        )

    # ------------------------------------------------------------------ registry
    def register(
        self,
        name: str,
        loader: Callable[[torch.device], Any],
        *,
        size_hint_bytes: int = 0,
        max_working_bytes: int = 0,
    ) -> None:
        """Declare a model set. ``loader(device)`` returns a :class:`LoadPlan` (or a ready engine); it runs once.

        ``size_hint_bytes``: its weights once loaded (room is made before the cold load).
        ``max_working_bytes``: activations of the largest job planned for (decides
        whether parking is expected at all, hence whether parking buffers are made).
        """
        with self._lock:
            if name in self._sets:
                raise ValueError(f"model set {name!r} is already registered")
            self._sets[name] = _ModelSet(name, loader, size_hint_bytes, max_working_bytes)

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
        restored, and they are parked first when room is needed. A CUDA OOM while
        restoring or loading is retried once with everything else parked, then
        reported as :class:`GenerationError` ``out_of_memory``.
        """
        idle = frozenset(idle)
        with self._lock:
            return self._with_oom_retry(
                name, idle, lambda: self._ensure(name, working_bytes=working_bytes, idle=idle),
                what=lambda: f"GPU out of memory while making model set {name} resident",
            )

    def _ensure(self, name: str, *, working_bytes: int, idle: frozenset[str]) -> Any:
        """:meth:`ensure` without the OOM handling (a raw ``torch.OutOfMemoryError`` escapes)."""
        with self._lock:
            ms = self._get(name)
            self._clock += 1
            ms.last_used = self._clock
            ms.idle = idle
            moved_before = (self._parked_bytes, self._restored_bytes)
            move_before = self._move_seconds
            if self.exclusive:
                for other in self._sets.values():
                    if other is not ms:
                        for comp in other.components:
                            if comp.on_device:
                                self._park(comp)
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
        An OOM while making the set resident counts as the first attempt too. A second
        OOM fails the job with ``out_of_memory`` and leaves the worker usable: caches
        are emptied and no set is left half-moved.
        """
        idle = frozenset(idle)
        in_job = [False]  # where the last attempt was: making the set resident, or the job itself

        def attempt() -> _T:
            in_job[0] = False
            engine = self._ensure(name, working_bytes=working_bytes, idle=idle)
            in_job[0] = True
            return fn(engine)

        with self._lock:
            return self._with_oom_retry(
                name, idle, attempt,
                what=lambda: f"GPU out of memory in {name}" if in_job[0]
                else f"GPU out of memory while making model set {name} resident",
            )

    def _with_oom_retry(self, name: str, idle: frozenset[str], attempt: Callable[[], _T], *,
                        what: Callable[[], str]) -> _T:
        """``attempt()``; after a CUDA OOM, once more with every other set (and this job's idle parts) parked.

        The retry runs *after* leaving the ``except`` block, never inside it: while an
        exception is being handled, it and its traceback are alive, and the traceback
        holds every frame of the failed attempt with their locals — the activations
        that ran out of memory. Retrying inside the block starts with all of them
        still allocated, so the retry of a job that only just failed to fit fails too.
        Only the message is kept; ``gc.collect`` (in :meth:`_free_cuda_cache`) then
        breaks the cycles that frames and tracebacks form, and ``empty_cache`` hands
        the freed blocks back before anything is parked or restored.
        """
        first: str | None = None
        try:
            return attempt()
        except torch.OutOfMemoryError as exc:
            first = str(exc)
            del exc
        logger.warning("out of memory in %s (%s); parking every other set and retrying once", name, first)
        self._oom_retries += 1
        self._free_cuda_cache()
        self.park_all(except_name=name)
        for comp in self._get(name).components:
            if comp.on_device and comp.name in idle:
                self._park(comp)
        self._free_cuda_cache()
        second: str | None = None
        try:
            return attempt()
        except torch.OutOfMemoryError as exc:
            second = str(exc)
            del exc
        self._free_cuda_cache()
        raise GenerationError(
            f"{what()} even with every other model parked: {second}. "
            "Use a lower resolution or fewer frames per clip.",
            code="out_of_memory",
        )

    def park(self, name: str) -> None:
        """Park every component of one set (no-op for sets not loaded)."""
        with self._lock:
            ms = self._get(name)
            for comp in ms.components:
                if comp.on_device:
                    self._park(comp)
            self._sync()

    def park_idle(self, name: str, need_bytes: int) -> int:
        """Park components of set ``name`` that its running job does not read, fewest bytes first
        covering ``need_bytes``; returns the bytes parked (0 when none is idle or resident).

        Why: an engine may find room for a faster plan mid-job (the video engine's CFG batch
        of two) once a copy its job does not use leaves the device, e.g. the fast preset's FP8
        weights during an exact job. Other sets and the job's own components never move here.
        """
        with self._lock:
            parked = self._park_own_idle(self._get(name), need_bytes)
            if parked:
                self._sync()  # the freed blocks stay in the allocator's cache: the job allocates next
                logger.info("parked %.2f GiB of %s's idle components for the running job", parked / GiB, name)
            return parked

    def park_all(self, *, except_name: str | None = None) -> None:
        with self._lock:
            for ms in self._sets.values():
                if ms.name != except_name:
                    self.park(ms.name)

    def close(self) -> None:
        """Give back everything this manager holds: device buffers, and its page-locked host memory unregistered.

        Unregistering is not left to the garbage collector so that a process making one
        manager after another (the GPU tests, tools) never maps new host memory while an
        old registration may still be alive (see :mod:`storystudio.models.host_memory`).
        Every set becomes unloaded: engines returned before lose their weights (their
        tensors become ``meta``), and a later :meth:`ensure` loads a set afresh.
        """
        with self._lock:
            self._sync()
            for ms in self._sets.values():
                for comp in ms.components:
                    try:
                        comp.layout.drop()
                    except RuntimeError as exc:  # a tensor someone else still holds: its memory goes with it
                        logger.warning("closing: %s keeps its weights (%s)", comp.key, exc)
                    comp.release()
                ms.engine = None
                ms.components = []
                ms.load_seconds = None
            if self._staging is not None:
                self._staging.buffer.release()
                self._staging = None
            self._free_cuda_cache()

    def adopt_components(self, name: str) -> list[str]:
        """Manage the components the loaded engine of ``name`` has added since it was loaded.

        For weights an engine builds after loading (the video engine's FP8 copy of its
        linears). Existing components must stay as they are; a new one may only hold
        tensors no earlier component holds (shared ones stay with their first owner).
        Such a component is built inside a job, so its parking buffer is made at its
        first park and is not page-locked: pinning there would stall that job
        (≈0.55 s per GiB); its parks and restores run at pageable-copy speed instead.
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
            seen = {id(s.tensor) for c in ms.components for s in c.layout.slots}
            added = []
            for cname, module in current.items():
                if cname in known:
                    continue
                comp = _Component(name, cname, module, Layout(module, seen), None)
                comp.late = True
                comp.on_device = all(s.tensor.device == self.device for s in comp.layout.slots)
                ms.components.append(comp)
                if not comp.on_device:
                    self._restore(comp)
                added.append(cname)
                logger.info("adopted component %s: %.2f GiB", comp.key, comp.nbytes / GiB)
            return added

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
                pinned_gib=sum(c.host.pinned_bytes for ms in self._sets.values() for c in ms.components if c.host)
                / GiB,
                parking={
                    "host": [c.key for ms in self._sets.values() for c in ms.components if c.parks_to_host],
                    "disk": [c.key for ms in self._sets.values() for c in ms.components if not c.parks_to_host],
                },
                exclusive=self.exclusive,
            )

    def component_residency(self) -> dict[str, bool]:
        """``{"set.component": on_device}`` for every loaded component (logs, tests, bench)."""
        with self._lock:
            return {c.key: c.on_device for ms in self._sets.values() for c in ms.components}

    # ------------------------------------------------------------------ internals
    def _device_bytes(self) -> int:
        return sum(ms.device_bytes() for ms in self._sets.values())

    def _make_room(self, target: _ModelSet, need: int) -> None:
        """Park the fewest bytes of least-recently-used sets so that ``need`` more fits.

        Two checks, the larger deficit wins: the bookkeeping (weights on the device plus
        ``need`` against the budget) and the measured free memory (``need`` plus the
        reserve against what the device has free now), which also sees memory the
        bookkeeping cannot: other processes, leftovers of a failed job, fragmentation.
        """
        deficit = self._deficit(need)
        if deficit <= 0:
            return  # nothing moves, so there is nothing to synchronise or give back
        # The target's own idle components first: the coming job does not read them.
        deficit -= self._park_own_idle(target, deficit)
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

    def _deficit(self, need: int) -> int:
        """Bytes that must leave the device so that ``need`` more fits (<= 0: it fits already)."""
        book = -1 if self.budget_bytes is None else self._device_bytes() + need - self.budget_bytes
        free = self._free_memory(self.device)
        measured = -1 if free is None or need <= 0 else need + self.reserve_bytes - free
        if measured > 0 and measured > book:
            logger.info("measured free memory %.2f GiB is less than the bookkeeping assumes: %.2f GiB more to park",
                        (free or 0) / GiB, (measured - max(book, 0)) / GiB)
        return max(book, measured)

    def _park_own_idle(self, ms: _ModelSet, need: int) -> int:
        """Park ``ms``'s idle components on the device, the fewest bytes covering ``need``; bytes parked."""
        own = [c for c in ms.components if c.on_device and c.name in ms.idle]
        parked = 0
        while parked < need and own:
            victim = self._pick_victim(own, need - parked)
            own.remove(victim)
            self._park(victim)
            parked += victim.nbytes
        return parked

    @staticmethod
    def _pick_victim(comps: list[_Component], deficit: int) -> _Component:
        """The smallest component that covers the deficit alone, else the largest."""
        enough = [c for c in comps if c.nbytes >= deficit]
        return min(enough, key=lambda c: c.nbytes) if enough else max(comps, key=lambda c: c.nbytes)

    def _cold_load(self, ms: _ModelSet) -> None:
        logger.info("loading model set %s from disk onto %s", ms.name, self.device)
        t0 = time.perf_counter()
        result = ms.loader(self.device)
        plan = result if isinstance(result, LoadPlan) else LoadPlan(result)
        # Sources go by tensor, not by name: an engine may group the same tensors into
        # components other than the modules it named them in (the video engine's linears).
        by_tensor = plan.by_tensor()
        seen: set[int] = set()
        comps = []
        for cname, module in plan.engine.components().items():
            layout = Layout(module, seen)
            sources = {s.name: by_tensor[id(s.tensor)] for s in layout.slots if id(s.tensor) in by_tensor}
            comps.append(_Component(ms.name, cname, module, layout, sources or None))
        self._plan_parking(ms, comps)
        read = 0
        try:
            for comp in comps:
                read += self._load_component(comp)
            if plan.after_load is not None:
                self._sync()
                plan.after_load(plan.engine)
                owned = {id(s.tensor) for c in comps for s in c.layout.slots}
                known = {c.name for c in comps}
                for cname, module in plan.engine.components().items():
                    if cname not in known:  # built from the loaded weights: adopted as part of the load
                        comp = _Component(ms.name, cname, module, Layout(module, owned), None)
                        self._load_component(comp)
                        comps.append(comp)
        except BaseException:
            for comp in comps:
                comp.release()
            self._free_cuda_cache()
            raise
        self._sync()
        ms.load_seconds = time.perf_counter() - t0
        ms.engine = plan.engine
        ms.components = comps
        gib = sum(c.nbytes for c in comps) / GiB
        logger.info(
            "loaded model set %s: %.2f GiB of weights in %.2f s (%.2f GB read from files, %.2f GiB pinned)",
            ms.name,
            gib,
            ms.load_seconds,
            read / 1e9,
            sum(c.host.pinned_bytes for c in comps if c.host) / GiB,
        )

    def _parking_expected(self, loading: _ModelSet, loading_bytes: int) -> bool:
        """Whether any set may have to leave VRAM: every set's weights plus the largest job exceed the budget."""
        if self.budget_bytes is None:
            return False
        weights = sum(loading_bytes if ms is loading else ms.weight_bytes() for ms in self._sets.values())
        working = max((ms.max_working_bytes for ms in self._sets.values()), default=0)
        return self.exclusive or weights + working > self.budget_bytes

    def _plan_parking(self, ms: _ModelSet, comps: list[_Component]) -> None:
        """Decide, per component of a set being loaded, whether it gets a parking buffer in host RAM.

        Adopted components always do (there is no file to re-read them from). The
        others do when parking is expected at all and the buffer fits the host's and
        the container's free memory minus the headroom, smallest first: what does not
        fit (the largest components) is dropped when parked and re-read from disk.
        """
        total = sum(c.nbytes for c in comps)
        if not self._parking_expected(ms, total):
            for c in comps:
                c.parks_to_host = c.sources is None
            logger.info(
                "model set %s: %s, so no parking buffers are made (a set pushed out by an out-of-memory "
                "retry is re-read from disk)",
                ms.name,
                "the budget is unlimited" if self.budget_bytes is None
                else "every set and the largest planned job fit the VRAM budget",
            )
            return
        reading = self._host_memory()
        available = reading.available()
        room = None if available is None else available - self.host_headroom_bytes
        for c in sorted(comps, key=lambda c: (c.sources is not None, c.nbytes)):
            fits = c.sources is None or room is None or c.nbytes <= room
            c.parks_to_host = fits
            if fits and room is not None:
                room -= c.nbytes
        dropped = [c for c in comps if not c.parks_to_host]
        if dropped:
            logger.warning(
                "host memory (%s, headroom %.1f GiB) cannot hold parking buffers for all of model set %s "
                "(%.2f GiB): %s (%.2f GiB) will be dropped when parked and re-read from disk when needed",
                reading.describe(),
                self.host_headroom_bytes / GiB,
                ms.name,
                total / GiB,
                ", ".join(c.key for c in dropped),
                sum(c.nbytes for c in dropped) / GiB,
            )

    def _load_component(self, comp: _Component) -> int:
        """Bring one component's weights onto the device (and into its parking buffer); returns file bytes read."""
        flat = self._alloc_device(comp.nbytes)
        read = 0
        if comp.sources is not None:
            try:
                comp.sources = comp.layout.complete(comp.sources)
                if comp.parks_to_host:
                    comp.host = HostBuffer(comp.key, comp.nbytes, comp.layout.host_chunks(), device=self.device)
                    stats = fill(comp.layout, comp.sources, flat, host=comp.host, pin=self.pin_memory,
                                 threads=self.read_threads)
                else:
                    stats = fill(comp.layout, comp.sources, flat, ring=self._ring(), threads=self.read_threads)
            except OSError as exc:
                raise CheckpointError(
                    f"{comp.key}: weights could not be read: {type(exc).__name__}: {exc}", code="checkpoint_corrupt"
                ) from exc
            read = stats.file_bytes
            logger.info("read %s: %.2f GB in %.2f s (%.2f GB/s)", comp.key, stats.file_bytes / 1e9, stats.seconds,
                        stats.gbps)
        else:
            if any(s.tensor.is_meta for s in comp.layout.slots):
                raise ValueError(f"{comp.key} has meta tensors but the loader gave no sources for them")
            target = flat
            if comp.parks_to_host:
                comp.host = HostBuffer(comp.key, comp.nbytes, comp.layout.host_chunks(), device=self.device)
                if self.pin_memory:
                    comp.host.pin()  # before the copies: device→host at full speed
                target = comp.host.tensor
            for slot in comp.layout.slots:
                if slot.nbytes:
                    Layout.view(target, slot).copy_(slot.tensor.data, non_blocking=True)
            self._sync()
            if comp.host is not None:
                comp.host.copy_to(flat)
        self._sync()
        comp.layout.point(flat)
        comp.device_flat = flat
        comp.on_device = True
        return read

    def _ring(self) -> StagingRing | None:
        """The staging slots for components without a parking buffer (none needed on CPU)."""
        if self.device.type == "cpu":
            return None
        if self._staging is None:
            self._staging = StagingRing(pin=self.pin_memory, device=self.device)
        return self._staging

    def _alloc_device(self, nbytes: int) -> torch.Tensor:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:
            self._free_cuda_cache()
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _park(self, comp: _Component) -> None:
        """Free the component's VRAM. Its parking buffer already holds the weights (read-only during inference),
        so nothing is copied; without one, the weights are dropped and re-read from disk on restore."""
        t0 = time.perf_counter()
        if comp.host is None and comp.late:
            # Built during a job: its parking buffer is made now, pageable (see adopt_components).
            comp.host = HostBuffer(comp.key, comp.nbytes, comp.layout.host_chunks(), device=self.device)
            for slot in comp.layout.slots:
                if slot.nbytes:
                    Layout.view(comp.host.tensor, slot).copy_(slot.tensor.data, non_blocking=True)
            self._sync()
        if comp.host is not None:
            comp.layout.point(comp.host.tensor)
            how = "kept in its host buffer"
        elif comp.sources is not None:
            comp.layout.drop()
            how = "dropped, to be re-read from disk"
        else:  # pragma: no cover - adopted components always get a parking buffer
            raise RuntimeError(f"{comp.key} has neither a parking buffer nor files to re-read")
        comp.device_flat = None
        comp.on_device = False
        self._parked_bytes += comp.nbytes
        dt = time.perf_counter() - t0
        self._move_seconds += dt
        logger.info("parked %s: %.2f GiB %s, %.3f s", comp.key, comp.nbytes / GiB, how, dt)

    def _restore(self, comp: _Component) -> None:
        t0 = time.perf_counter()
        flat = self._alloc_device(comp.nbytes)
        if comp.host is None and comp.late:  # built off the device: copied over once
            for slot in comp.layout.slots:
                if slot.nbytes:
                    Layout.view(flat, slot).copy_(slot.tensor.data, non_blocking=True)
            how = "adopted"
        elif comp.host is not None:
            comp.host.copy_to(flat)
            how = "from its host buffer"
        else:
            assert comp.sources is not None
            try:
                fill(comp.layout, comp.sources, flat, ring=self._ring(), threads=self.read_threads)
            except OSError as exc:
                raise CheckpointError(
                    f"{comp.key}: weights could not be re-read: {type(exc).__name__}: {exc}", code="checkpoint_corrupt"
                ) from exc
            how = "re-read from disk"
        self._sync()  # honest timings; the next kernel would wait for the copy anyway
        comp.layout.point(flat)
        comp.device_flat = flat
        comp.on_device = True
        self._restored_bytes += comp.nbytes
        dt = time.perf_counter() - t0
        self._move_seconds += dt
        logger.info("restored %s: %.2f GiB %s in %.3f s", comp.key, comp.nbytes / GiB, how, dt)

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
