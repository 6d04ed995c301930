"""Step caching (TeaCache / MagCache family): reuse the block stack's residual on steps that barely change.

Why: a Wan CFG step runs 40 DiT blocks over ~33k tokens twice, and between consecutive
denoising steps the blocks' contribution often changes little. When the input that
modulates every block has moved less than a threshold since the last computed step,
the residual that step's blocks added is added again instead of running them.

What is measured (the *indicator*, chosen per cache): by default
(:func:`latent_indicator`) the noisy latent the DiT receives, i.e. how far the
sampler moved its input since the last computed step. It needs no model call and
does not depend on the weights, so the number of skipped steps measured on random
weights carries over to real ones (their *quality* does not). TeaCache's indicator
for Wan, ``e0`` = ``time_projection(time_embedding(sin(t)))``, the modulation of every
block's input, is available as :func:`modulation_indicator`; it is only meaningful
with a rescale polynomial fitted on real weights: with random weights its relative
change is 0.7 to 1.3 on *every* step of a 40-step schedule (measured on the full-size
and tiny random checkpoints), so nothing would ever be skipped below that. Both are
computed once per step, outside the model, and shared by the CFG branches. The change
between steps is the relative L1 distance, optionally rescaled by a polynomial.

When to compute (:class:`StepSchedule`): always the first and last steps
(:data:`storystudio.limits.STEP_CACHE_FIRST_STEPS`, ``..._LAST_STEPS``); otherwise
the change is accumulated and the step is skipped while the sum stays below the
threshold and fewer than ``STEP_CACHE_MAX_CONSECUTIVE_SKIPS`` steps in a row were
skipped; a computed step resets the sum.

How a step is skipped (:class:`BlockResidualCache`): every computed call stores, per
branch (``"cond"``, ``"uncond"`` or a batched ``"pair"``), the residual = hidden states
after the last block (and its audio injection) minus the hidden states entering block
0. A skipped call runs the model's embeddings and head as usual, with the block stack
replaced by ``x + residual``. The official ``WanModel_S2V.forward`` is not copied:
for the duration of one call, the model instance's ``blocks`` and
``after_transformer_block`` attributes are shadowed in its ``__dict__`` (and restored
in a ``finally``). The block modules themselves are never touched, so compiled blocks
keep their compiled code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from storystudio import limits as L


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """``mean|a - b| / mean|b|`` in float32 (0 when both are zero)."""
    a, b = a.float(), b.float()
    denom = b.abs().mean().item()
    num = (a - b).abs().mean().item()
    return 0.0 if num == 0 else num / max(denom, 1e-12)


@dataclass
class StepSchedule:
    """Which steps of one clip are computed; pure arithmetic on the per-step changes.

    Call :meth:`decide` once per step, in order, with the change of the indicator since
    the previous step (``None`` for the first step).
    """

    threshold: float
    num_steps: int
    first: int = L.STEP_CACHE_FIRST_STEPS
    last: int = L.STEP_CACHE_LAST_STEPS
    max_consecutive: int = L.STEP_CACHE_MAX_CONSECUTIVE_SKIPS
    rescale: Sequence[float] | None = None  # polynomial coefficients, highest power first
    skipped: list[int] = field(default_factory=list)
    _accumulated: float = 0.0
    _run: int = 0

    def rescaled(self, change: float) -> float:
        if not self.rescale:
            return change
        out = 0.0
        for c in self.rescale:
            out = out * change + c
        return out

    def decide(self, step: int, change: float | None) -> bool:
        """True: compute step ``step``; False: reuse the residual."""
        forced = change is None or step < self.first or step >= self.num_steps - self.last or self.threshold <= 0
        if not forced:
            self._accumulated += self.rescaled(float(change))
            if self._accumulated < self.threshold and self._run < self.max_consecutive:
                self._run += 1
                self.skipped.append(step)
                return False
        self._accumulated = 0.0
        self._run = 0
        return True


Indicator = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def latent_indicator(model: nn.Module, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The noisy latent entering the DiT at this step (the default indicator).

    A copy: the sampler may update its latent in place after this step.
    """
    return x.detach().clone()


def modulation_indicator(model: nn.Module, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``e0`` of ``WanModel_S2V.forward`` for timestep ``t`` (float32), from the model's own layers."""
    from wan.modules.model import sinusoidal_embedding_1d

    lin = model.time_embedding[0]
    with torch.autocast(lin.weight.device.type, enabled=False):
        sin = sinusoidal_embedding_1d(model.freq_dim, t.reshape(-1)).to(lin.weight.dtype)
        e = model.time_embedding(sin)
        return model.time_projection(e).float()


class BlockResidualCache:
    """Per-branch residuals of one model's block stack, and the two ways to call the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.residuals: dict[str, torch.Tensor] = {}

    def can_reuse(self, branch: str) -> bool:
        return branch in self.residuals

    def compute(self, branch: str, *args: Any, **kwargs: Any) -> Any:
        """A full call that also stores this branch's residual."""
        model = self.model
        blocks = model.blocks
        after = model.after_transformer_block
        last = len(blocks) - 1
        entering: dict[str, torch.Tensor] = {}

        def first_block(x: torch.Tensor, **kw: Any) -> torch.Tensor:
            entering["x"] = x
            return blocks[0](x, **kw)

        def after_block(idx: int, h: torch.Tensor) -> torch.Tensor:
            h = after(idx, h)
            if idx == last:
                self.residuals[branch] = h - entering["x"]
            return h

        with _shadowed(model, blocks=[first_block, *list(blocks)[1:]], after_transformer_block=after_block):
            return model(*args, **kwargs)

    def reuse(self, branch: str, *args: Any, **kwargs: Any) -> Any:
        """A call whose block stack is ``x + residual`` (embeddings and head still run)."""
        residual = self.residuals[branch]

        def stack(x: torch.Tensor, **kw: Any) -> torch.Tensor:
            if x.shape != residual.shape:
                raise RuntimeError(f"step cache: hidden states {tuple(x.shape)} do not match the cached residual "
                                   f"{tuple(residual.shape)} of branch {branch!r}")
            return x + residual.to(x.dtype)

        with _shadowed(model := self.model, blocks=[stack], after_transformer_block=lambda idx, h: h):
            return model(*args, **kwargs)


@contextmanager
def _shadowed(model: nn.Module, **attrs: Any) -> Iterator[None]:
    """Instance attributes that hide the class's (and nn.Module's registry) for one call.

    An attribute already shadowed on the instance (the compiled audio injection that
    :class:`~storystudio.models.compile.DiTCompiler` installs) is what the call wraps,
    and it is put back afterwards.
    """
    missing = object()
    saved = {k: model.__dict__.get(k, missing) for k in attrs}
    model.__dict__.update(attrs)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is missing:
                model.__dict__.pop(k, None)
            else:
                model.__dict__[k] = v


class StepCache:
    """The step cache of one clip: ``begin_step`` once per step, then call it once per branch.

    ``cache.begin_step(i, t, latents)``, then ``cache("cond", latents, t=..., **args)`` runs the model like ``model(latents, ...)``,
    computing or reusing according to the step's decision. A branch without a residual
    yet is always computed (and the step then does not count as skipped).
    """

    def __init__(self, model: nn.Module, threshold: float, num_steps: int, *,
                 rescale: Sequence[float] | None = None,
                 indicator: Indicator = latent_indicator) -> None:
        self.model = model
        self.schedule = StepSchedule(threshold=threshold, num_steps=num_steps, rescale=rescale)
        self.blocks = BlockResidualCache(model)
        self.indicator = indicator
        self.changes: list[float | None] = []
        self._previous: torch.Tensor | None = None
        self._step = -1
        self._compute = True

    def begin_step(self, step: int, t: torch.Tensor, x: torch.Tensor) -> bool:
        """Decide step ``step`` (timestep ``t``, noisy latent ``x``); True when its blocks run."""
        current = self.indicator(self.model, t, x)
        change = None if self._previous is None else relative_l1(current, self._previous)
        self._previous = current
        self.changes.append(change)
        self._step = step
        self._compute = self.schedule.decide(step, change)
        return self._compute

    def __call__(self, branch: str, *args: Any, **kwargs: Any) -> Any:
        if self._compute or not self.blocks.can_reuse(branch):
            if not self._compute and self._step in self.schedule.skipped:
                self.schedule.skipped.remove(self._step)
            return self.blocks.compute(branch, *args, **kwargs)
        return self.blocks.reuse(branch, *args, **kwargs)

    @property
    def skipped_steps(self) -> list[int]:
        return list(self.schedule.skipped)
