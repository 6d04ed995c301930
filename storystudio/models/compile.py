"""Regional ``torch.compile`` of the Wan DiT blocks, with the compile cache on the models volume.

Why regional: the 40 ``WanS2VAttentionBlock``s are identical, so one compiled graph of
``WanS2VAttentionBlock.forward`` serves all of them (dynamo treats each block's weights
as graph inputs, not constants): compiling the block function once costs what compiling
one block costs, instead of tracing the whole 14B model with its Python-level motion and
audio plumbing. Inductor fuses what eager runs as separate passes (RMSNorm, the
per-segment modulation, rope in float64, GELU, residual adds); matmuls and attention stay
cuBLAS and the backend chosen by :mod:`storystudio.models.attention` (an opaque op).

Two kinds of graph (:func:`dynamic_for`; the engine keeps a :class:`DiTCompiler` for each):

* ``full``: clips of the job's ``infer_frames`` (every clip of a long scene but the last),
  static shapes (``dynamic=False``): each (resolution, first-or-later clip, CFG batch) is
  its own graph, compiled once and then read from the cache, with every size known to
  inductor.
* ``other``: every other clip length (a short scene's only clip, a long scene's last one,
  a clip that took in a short tail). Forty possible lengths per resolution would be forty
  cold compiles if each had its own static graph; these go through a second compiled
  function with torch's automatic dynamic shapes (``dynamic=None``): a size that differs
  from what that function saw before becomes symbolic, so after at most two compiles per
  (resolution, first-or-later clip, CFG batch) every length reuses one graph. Only the
  sizes that change (the token count and what follows from it) turn symbolic; the model
  width and head sizes stay static, so the fused kernels keep their fixed reductions.

The audio injection that runs after 12 of the blocks (``after_transformer_block``) is
compiled the same way, as one graph for all 12 (:class:`DiTCompiler`,
:mod:`storystudio.models.audio_injection`): eager, its clone, regrouping copy, norm and
casts over the float32 hidden states were most of what the exact step still ran outside
compiled code.

Weights: the ModelManager parks and restores a model by re-pointing ``param.data``. The
compiled graph reads parameters as inputs on every call, so it sees the new storage; the
guards check shape, stride, dtype and device only, so a restore (same metadata, new
address) does not recompile. No CUDA graphs (``mode="reduce-overhead"``): they would
bake the weights' addresses in.

The cache: inductor's FX-graph/AOT caches (and the Triton kernels bundled with them)
live under ``TORCHINDUCTOR_CACHE_DIR``; pointing it at ``<models>/.torch-compile-cache/
<torch>-<gpu>/`` on the network volume lets a new worker load compiled kernels instead of
recompiling (dynamo still traces, which takes seconds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storystudio.models import fused_rope
from storystudio.models.audio_injection import frame_residual, model_injection

log = logging.getLogger(__name__)

COMPILE_CACHE_DIRNAME = ".torch-compile-cache"  # inside the models folder (the network volume)
RECOMPILE_LIMIT = 64  # graphs per code object: resolutions x first/later clip x CFG batch x full/other


def dynamic_for(full_length: bool) -> bool | None:
    """``torch.compile``'s ``dynamic`` for a clip: static for full-length clips, automatic otherwise."""
    return False if full_length else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def cache_dir_for(root: Path, device: torch.device) -> Path:
    """``<root>/<torch version>-<gpu name>``: compiled kernels are only valid for both."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return Path(root) / f"{_slug(torch.__version__)}-{_slug(name)}"


def configure_cache(root: Path | None, device: torch.device) -> Path | None:
    """Point inductor's cache at the models volume; returns the folder in use.

    An operator's own ``TORCHINDUCTOR_CACHE_DIR`` wins. An unwritable volume keeps
    inductor's default (a local temp folder) with a warning: compiling still works, a new
    worker just compiles again.
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    if root is None:
        return None
    folder = cache_dir_for(root, device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        log.warning("compile cache folder %s is not writable (%s); using inductor's default", folder, exc)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    log.info("torch.compile cache: %s", folder)
    return folder


# Inductor settings the worker runs with, each overridable by its TORCHINDUCTOR_* variable:
# * the compile-worker pool stays up (torch 2.11 quiesces it after 60 s idle by default, and
#   waking it for a later graph hung the video bench on the H100: the main thread waited on
#   a future for 12 minutes with the GPU idle; upstream pytorch#176968 / #186136, fix in
#   review as PR #183884). A new shape in a long-lived worker is exactly that wake-up.
_INDUCTOR_SETTINGS: dict[str, tuple[str, Any]] = {
    "quiesce_async_compile_pool": ("TORCHINDUCTOR_QUIESCE_ASYNC_COMPILE_POOL", False),
}


def configure_inductor() -> dict[str, Any]:
    """Apply :data:`_INDUCTOR_SETTINGS` (before the first compile); returns what is in effect.

    An operator's environment variable wins over the worker's choice.
    """
    import torch._inductor.config as inductor_config

    for name, (env, value) in _INDUCTOR_SETTINGS.items():
        if env not in os.environ:
            setattr(inductor_config, name, value)
    return {name: getattr(inductor_config, name) for name in _INDUCTOR_SETTINGS}


class _StaticInt:
    """Stands in for the 0-d tensor ``e[1]`` that ``WanS2VAttentionBlock.forward`` reads with
    ``.item()``: a tensor ``.item()`` is a graph break, this one is a constant to dynamo."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def item(self) -> int:
        return self.value


class BlockCompiler:
    """One compiled ``forward`` shared by every block of ``blocks``, installed on demand.

    :meth:`installed` sets each block's ``forward`` to the compiled function for the
    duration of a ``with`` block and removes it afterwards, so the same loaded model runs
    compiled or eager from one call to the next (the benchmark compares both in one
    process; the engine installs the full-length or the other-length compiler per clip).
    """

    def __init__(self, blocks: nn.ModuleList, *, backend: str | Callable[..., Any] = "inductor",
                 dynamic: bool | None = False) -> None:
        if len(blocks) == 0:
            raise ValueError("no blocks to compile")
        self.blocks = blocks
        self.backend = backend
        fn = type(blocks[0]).forward
        if any(type(b).forward is not fn for b in blocks):
            raise ValueError("the blocks do not share one forward")
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        self._compiled = torch.compile(fn, dynamic=dynamic, backend=backend)
        self._tables = fused_rope.CompactTables()

    def _entry(self, block: nn.Module) -> Callable[..., torch.Tensor]:
        compiled, tables = self._compiled, self._tables

        def forward(x: torch.Tensor, e: list[Any], *args: Any, **kwargs: Any) -> torch.Tensor:
            # With the fused RoPE, the table as one row per token when the heads share it, in
            # real (cos, sin) pairs: the same values, 40x fewer bytes for the compiled rotation
            # to read, and no complex tensor in the graph (inductor cannot generate code for one).
            if fused_rope.is_active() and isinstance(kwargs.get("freqs"), torch.Tensor):
                kwargs["freqs"] = tables(kwargs["freqs"])
            return compiled(block, x, [e[0], _StaticInt(int(e[1]))], *args, **kwargs)

        return forward

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        for block in self.blocks:
            block.forward = self._entry(block)
        try:
            yield
        finally:
            self._tables.clear()
            for block in self.blocks:
                block.__dict__.pop("forward", None)


class DiTCompiler:
    """The compiled blocks and the compiled audio injection of one ``WanModel_S2V``, for one
    kind of clip (``dynamic``: False for full-length clips, None for the other lengths; see
    the module's docstring).

    :meth:`installed` shadows the model's ``after_transformer_block`` with
    :func:`~storystudio.models.audio_injection.model_injection` over the compiled
    :func:`~storystudio.models.audio_injection.frame_residual` (one graph for every
    injected block, modules as inputs), next to :class:`BlockCompiler`'s blocks.
    """

    def __init__(self, model: nn.Module, *, backend: str | Callable[..., Any] = "inductor",
                 dynamic: bool | None = False) -> None:
        self.model = model
        self.backend = backend
        self.blocks = BlockCompiler(model.blocks, backend=backend, dynamic=dynamic)  # type: ignore[arg-type]
        self._residual = torch.compile(frame_residual, dynamic=dynamic, backend=backend)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        model = self.model
        if "after_transformer_block" in vars(model):
            raise RuntimeError("after_transformer_block is already replaced on this model")
        with self.blocks.installed():
            model.after_transformer_block = model_injection(model, self._residual)
            try:
                yield
            finally:
                vars(model).pop("after_transformer_block", None)
