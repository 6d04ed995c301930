"""Rank 0 drives, the other ranks follow: every DiT forward runs on all ranks at once.

Why this split (vLLM's driver worker / workers): only the DiT is worth spreading over
GPUs (it is >95 % of a video's time); the text encoder, VAE, audio encoder, Z-Image,
input downloads and storage stay on rank 0, exactly as on one GPU. So rank 0 runs the
ordinary :class:`~storystudio.worker.Worker`, and its Wan engine's DiT gets a
:class:`ParallelDiT` forward: each call is announced to the other ranks (a small header
over a ``multiprocessing`` queue, no collective is pending while they idle, so no NCCL
timeout between jobs), its tensors are broadcast from rank 0, and all ranks run the
sequence-parallel forward together (:mod:`storystudio.distributed.sequence_parallel`).
The other ranks hold the DiT weights only (no T5, VAE or Z-Image): ~33 GB in bf16.

Parallel modes:

* ``ulysses`` — every forward is split over all ranks.
* ``cfg`` — a forward that carries both guidance branches as a batch of two (the
  engine's batched classifier-free guidance) runs branch 0 on the first half of the
  ranks and branch 1 on the second half, each half sequence-parallel; a batch of one
  falls back to ``ulysses``. No all-to-all at all with two ranks.

Failure rule: a collective that fails half-way leaves the ranks out of step, so after
any exception in a parallel forward rank 0 refuses further forwards (``rank_failed``)
and asks the executor to restart the pool; the ModelManager's OOM retry is therefore not
attempted for a parallel forward (it would deadlock), an OOM reports ``out_of_memory``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from storystudio.distributed.sequence_parallel import SPGroup, sp_forward
from storystudio.errors import GenerationError
from storystudio.models import fused_rope

log = logging.getLogger(__name__)

ParallelMode = Literal["ulysses", "cfg"]
PARALLEL_MODES: tuple[ParallelMode, ...] = ("ulysses", "cfg")

# Arguments of WanModel_S2V.forward that carry one entry per sample (split by cfg mode).
_PER_SAMPLE = ("x", "context", "ref_latents", "motion_latents", "cond_states", "audio_input", "t")


# ------------------------------------------------------------------------ process groups


@dataclass(frozen=True)
class Comm:
    """This rank's view of the process groups: the world, and (even world sizes) the
    half it belongs to for ``cfg`` mode."""

    rank: int
    size: int
    device: torch.device  # where tensors travel (cuda:<rank> for NCCL, cpu for gloo)
    world: SPGroup
    half: SPGroup | None  # the cfg half of this rank (None for odd world sizes)

    @property
    def half_index(self) -> int:
        return 0 if self.rank < self.size // 2 else 1

    @classmethod
    def init(cls, *, rank: int, size: int, device: torch.device, init_method: str,
             timeout_s: float) -> Comm:
        """``init_process_group`` (NCCL on CUDA, gloo on CPU) plus the two cfg halves.

        Every rank creates every group in the same order, as ``new_group`` requires.
        """
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device  # binds the communicator now, not at the first collective
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
        half = None
        if size % 2 == 0:
            groups = [dist.new_group(list(range(0, size // 2))), dist.new_group(list(range(size // 2, size)))]
            mine = 0 if rank < size // 2 else 1
            half = SPGroup(groups[mine], rank - mine * (size // 2), size // 2)
        return cls(rank, size, device, SPGroup(None, rank, size), half)


# ------------------------------------------------------------------------ calls on the wire


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_device: bool  # False: the tensor lived on the CPU (it is moved only for the transfer)


def _flatten(obj: Any, metas: list[_TensorMeta], tensors: list[torch.Tensor]) -> Any:
    """Replace tensors in nested lists/tuples/dicts by ``("__t__", index)``."""
    if isinstance(obj, torch.Tensor):
        metas.append(_TensorMeta(tuple(obj.shape), obj.dtype, obj.device.type != "cpu"))
        tensors.append(obj)
        return ("__t__", len(tensors) - 1)
    if isinstance(obj, list):
        return [_flatten(v, metas, tensors) for v in obj]
    if isinstance(obj, tuple):
        return ("__tuple__", [_flatten(v, metas, tensors) for v in obj])
    if isinstance(obj, dict):
        return {k: _flatten(v, metas, tensors) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot send a {type(obj).__name__} to the other ranks")


def _unflatten(spec: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "__t__":
        return tensors[spec[1]]
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "__tuple__":
        return tuple(_unflatten(v, tensors) for v in spec[1])
    if isinstance(spec, list):
        return [_unflatten(v, tensors) for v in spec]
    if isinstance(spec, dict):
        return {k: _unflatten(v, tensors) for k, v in spec.items()}
    return spec


@dataclass(frozen=True)
class Message:
    """What rank 0 puts on each follower's queue: ``load``, ``forward`` or ``stop``."""

    op: Literal["load", "forward", "stop"]
    mode: ParallelMode = "ulysses"
    spec: Any = None
    metas: tuple[_TensorMeta, ...] = ()
    autocast: torch.dtype | None = None  # rank 0's autocast dtype: all ranks must compute alike
    fused_rope: bool = False  # rank 0 runs the exact path's RoPE (storystudio.models.fused_rope): so do all


def _broadcast_tensors(comm: Comm, metas: tuple[_TensorMeta, ...], tensors: list[torch.Tensor] | None,
                       device: torch.device) -> list[torch.Tensor]:
    """Rank 0 sends ``tensors``; the others receive tensors shaped by ``metas`` on ``device``."""
    out = []
    for i, meta in enumerate(metas):
        if tensors is not None:
            buf = tensors[i].to(comm.device).contiguous()
        else:
            buf = torch.empty(meta.shape, dtype=meta.dtype, device=comm.device)
        dist.broadcast(buf, src=0)
        out.append(buf.to(device) if meta.on_device else buf.cpu())
    return out


# ------------------------------------------------------------------------ execution


def split_cfg_batch(kwargs: dict[str, Any], index: int, batch: int) -> dict[str, Any]:
    """The arguments of sample ``index`` of a batched forward (both guidance branches).

    Per-sample arguments are lists or tensors whose first axis is the batch; a tensor or
    list of length 1 is shared by the batch (e.g. one timestep) and kept as is.
    """
    out = dict(kwargs)
    for name in _PER_SAMPLE:
        value = kwargs.get(name)
        if isinstance(value, (list, tuple)) and len(value) == batch:
            out[name] = [value[index]]
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[name] = value[index:index + 1]
    return out


def execute(model: nn.Module, comm: Comm, mode: ParallelMode, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """One parallel forward; every rank calls it with the same arguments."""
    batch = len(kwargs["x"])
    if mode == "cfg" and comm.half is not None and batch == 2:
        mine = sp_forward(model, comm.half, **split_cfg_batch(kwargs, comm.half_index, batch))[0].contiguous()
        parts = [torch.empty_like(mine) for _ in range(comm.size)]
        dist.all_gather(parts, mine)
        return [parts[0], parts[comm.size // 2]]
    return sp_forward(model, comm.world, **kwargs)


def resolve_mode(requested: str, world_size: int) -> ParallelMode:
    """``auto`` → ``cfg`` for even world sizes (the two branches need two halves), else ``ulysses``."""
    if requested == "auto":
        return "cfg" if world_size % 2 == 0 else "ulysses"
    if requested not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be auto, ulysses or cfg, not {requested!r}")
    if requested == "cfg" and world_size % 2:
        raise ValueError(f"cfg mode needs an even number of ranks, not {world_size}")
    return requested  # type: ignore[return-value]


class ParallelDiT:
    """Rank 0's side: replaces ``model.forward`` with a forward run by all ranks."""

    def __init__(self, model: nn.Module, comm: Comm, followers: list[Any], mode: ParallelMode) -> None:
        self.model = model
        self.comm = comm
        self.followers = followers  # one queue per other rank
        self.mode = mode
        self.poisoned: BaseException | None = None
        self.calls = 0
        self._signature = inspect.signature(type(model).forward)

    def install(self) -> ParallelDiT:
        """Bind the parallel forward on this model object and let the followers load their copy."""
        self.model.forward = self.forward  # instance attribute: the class forward stays official
        self._send(Message("load"))
        log.info("DiT forward runs on %d ranks (%s mode)", self.comm.size, self.mode)
        return self

    def _send(self, message: Message) -> None:
        for q in self.followers:
            q.put(message)

    def stop_followers(self) -> None:
        self._send(Message("stop"))

    def forward(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        if self.poisoned is not None:
            raise GenerationError(
                f"the GPU ranks are out of step after an earlier failure ({self.poisoned!r}); the rank pool "
                "restarts before the next job", code="rank_failed")
        bound = self._signature.bind(self.model, *args, **kwargs)
        bound.apply_defaults()
        call = {k: v for k, v in bound.arguments.items() if k not in ("self", "extra_args", "extra_kwargs")}
        metas: list[_TensorMeta] = []
        tensors: list[torch.Tensor] = []
        spec = _flatten(call, metas, tensors)
        kind = self.comm.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        try:
            self._send(Message("forward", self.mode, spec, tuple(metas), autocast, fused_rope.is_active()))
            _broadcast_tensors(self.comm, tuple(metas), tensors, self.comm.device)
            out = execute(self.model, self.comm, self.mode, call)
        except BaseException as exc:
            self.poisoned = exc
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise GenerationError(f"out of GPU memory in a {self.comm.size}-rank forward: {exc}",
                                      code="out_of_memory") from exc
            raise GenerationError(f"{self.comm.size}-rank DiT forward failed: {type(exc).__name__}: {exc}",
                                  code="rank_failed") from exc
        self.calls += 1
        return out


def follow(comm: Comm, inbox: Any, get_model: Callable[[], nn.Module], *, poll_s: float = 1.0,
           alive: Callable[[], bool] = lambda: True) -> None:
    """A follower rank's loop: load the DiT when asked, run every announced forward, stop.

    ``inbox.get`` is polled with a timeout so that a follower whose parent died exits
    (``alive`` returns False) instead of waiting forever.
    """
    import queue as _queue

    while True:
        try:
            msg: Message = inbox.get(timeout=poll_s)
        except _queue.Empty:
            if not alive():
                log.warning("rank %d: the executor is gone; exiting", comm.rank)
                return
            continue
        if msg.op == "stop":
            return
        model = get_model()
        if msg.op == "load":
            continue
        device = next(model.parameters()).device
        tensors = _broadcast_tensors(comm, msg.metas, None, device)
        call = _unflatten(msg.spec, tensors)
        autocast = (torch.autocast(device.type, dtype=msg.autocast) if msg.autocast is not None
                    else contextlib.nullcontext())
        rope = fused_rope.fused_rope(model, device) if msg.fused_rope else contextlib.nullcontext()
        with torch.no_grad(), autocast, rope:
            execute(model, comm, msg.mode, call)
