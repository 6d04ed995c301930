"""The main function of one rank process (started once by the executor, 'spawn').

Rank 0 is the driver worker: it runs the ordinary :class:`~storystudio.worker.Worker`
(its own ModelManager with both model sets, storage, progress) on ``cuda:0`` and answers
the jobs the executor sends over its pipe; when its Wan set loads, the DiT's forward is
made parallel (:class:`~storystudio.distributed.parallel_dit.ParallelDiT`). Ranks 1..N-1
are followers: their own ModelManager holds one set, the DiT alone, on ``cuda:<rank>``,
and they run the forwards rank 0 announces on their queue.

Messages on the executor pipe (pickled tuples):

* executor → rank 0: ``("job", job_dict)``, ``("stop",)``
* rank 0 → executor: ``("ready", 0)``, ``("progress", event)``,
  ``("result", result_dict, poisoned: str | None)`` (``poisoned``: why the pool must restart)
* follower → executor: ``("ready", rank)``, ``("error", code, message)`` before exiting
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from storystudio.config import WorkerSettings
from storystudio.distributed.parallel_dit import Comm, Message, ParallelDiT, ParallelMode, follow
from storystudio.errors import CheckpointError, StoryStudioError
from storystudio.models.locate import WAN, locate
from storystudio.models.weight_files import LoadPlan

log = logging.getLogger(__name__)

DIT_SET = "video"  # a follower's one model set: the Wan DiT (same name as the worker's video set)


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs; pickled into the spawned process."""

    rank: int
    size: int
    init_method: str  # tcp://127.0.0.1:<port>
    settings: WorkerSettings  # device already set to this rank's device
    mode: ParallelMode
    collective_timeout_s: float
    log_level: str = "INFO"


def rank_device(base_device: str, rank: int) -> str:
    """``cuda`` → ``cuda:<rank>``; CPU ranks all use the CPU."""
    return f"cuda:{rank}" if base_device.startswith("cuda") else "cpu"


class DiTOnly:
    """A follower's engine: the Wan2.2-S2V DiT and nothing else (~33 GB in bf16)."""

    name = "wan_s2v_dit"

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer}

    @classmethod
    def plan(cls, wan_dir: Path, device: torch.device) -> LoadPlan:
        """The DiT on ``meta`` and where its weights are: the ModelManager reads them (pin while loading)."""
        from storystudio.models.checkpoints.wan_s2v import validate_wan_s2v
        from storystudio.models.engine import default_dtype
        from storystudio.models.video_generator import plan_dit
        from storystudio.patches import wan22

        validate_wan_s2v(wan_dir)
        wan22.import_wan()
        try:
            model, sources = plan_dit(wan_dir, default_dtype(device))
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"Wan2.2-S2V DiT at {wan_dir} could not be loaded: {type(exc).__name__}: {exc}",
                                  code="checkpoint_corrupt") from exc
        return LoadPlan(cls(model), {"transformer": sources})

    @classmethod
    def load(cls, wan_dir: Path, device: torch.device) -> DiTOnly:
        """The DiT read onto ``device`` without a ModelManager (tests)."""
        from storystudio.models.weight_loader import materialize

        return materialize(cls.plan(wan_dir, device), device)  # type: ignore[return-value]


def _setup_logging(spec: RankSpec) -> None:
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s")


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, StoryStudioError):
        return exc.code
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out_of_memory"
    return "rank_failed"


def rank_main(spec: RankSpec, conn: Any, inboxes: list[Any]) -> None:
    """Spawn target. ``inboxes[r - 1]`` is follower ``r``'s queue; rank 0 gets all of them."""
    _setup_logging(spec)
    if not spec.settings.device.startswith("cuda"):
        # CPU ranks share the machine's cores; without this each would start one
        # thread per core and they would thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.size))
    try:
        comm = Comm.init(rank=spec.rank, size=spec.size, device=torch.device(spec.settings.device),
                         init_method=spec.init_method, timeout_s=spec.collective_timeout_s)
    except Exception as exc:  # noqa: BLE001 - reported to the executor, which fails the start
        log.exception("process group init failed")
        conn.send(("error", "rank_failed", f"rank {spec.rank}: process group init failed: {type(exc).__name__}: {exc}"))
        return
    if spec.rank == 0:
        _lead(spec, comm, conn, inboxes)
    else:
        _follow(spec, comm, conn, inboxes[spec.rank - 1])


def _lead(spec: RankSpec, comm: Comm, conn: Any, followers: list[Any]) -> None:
    from storystudio.worker import Worker

    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:  # progress may come from helper threads of a batch
            conn.send(msg)

    parallel: list[ParallelDiT] = []

    def on_video_loaded(engine: Any) -> Any:
        parallel.append(ParallelDiT(engine.transformer, comm, followers, spec.mode).install())
        return engine

    worker = Worker.from_settings(spec.settings, sink=lambda job, event: send(("progress", event)),
                                  on_video_loaded=on_video_loaded)
    send(("ready", 0))
    worker.prewarm()
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                log.warning("the executor is gone; rank 0 exits")
                return
            if msg[0] == "stop":
                return
            before = sum(p.calls for p in parallel)
            result = worker.handle(msg[1])
            result["parallel"] = {"ranks": comm.size, "mode": spec.mode,
                                  "dit_forwards": sum(p.calls for p in parallel) - before}
            poisoned = next((repr(p.poisoned) for p in parallel if p.poisoned is not None), None)
            send(("result", result, poisoned))
    finally:
        for q in followers:
            q.put(Message("stop"))


def _follow(spec: RankSpec, comm: Comm, conn: Any, inbox: Any) -> None:
    from storystudio.models.model_manager import ModelManager

    settings = spec.settings
    manager = ModelManager(settings.device, budget_gib=settings.vram_budget_gib, reserve_gib=settings.vram_reserve_gib)
    # Found at load time, so a missing model fails through the follower's error path below.
    manager.register(DIT_SET, lambda device: DiTOnly.plan(locate(WAN, settings.wan_dir, settings.model_search).path,
                                                          device))
    conn.send(("ready", spec.rank))
    parent = multiprocessing.parent_process()
    try:
        follow(comm, inbox, lambda: manager.ensure(DIT_SET).transformer,
               alive=(lambda: parent.is_alive()) if parent is not None else (lambda: True))
    except BaseException as exc:
        log.exception("follower failed")
        try:
            conn.send(("error", _error_code(exc), f"rank {spec.rank}: {type(exc).__name__}: {exc}"))
        finally:
            os._exit(1)  # the pool is out of step: the executor restarts it


def spec_for(rank: int, size: int, init_method: str, settings: WorkerSettings, mode: ParallelMode,
             collective_timeout_s: float) -> RankSpec:
    return RankSpec(rank=rank, size=size, init_method=init_method,
                    settings=replace(settings, device=rank_device(settings.device, rank)), mode=mode,
                    collective_timeout_s=collective_timeout_s,
                    log_level=os.environ.get("STORYSTUDIO_LOG_LEVEL", "INFO"))
