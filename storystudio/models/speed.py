"""A video job's speed knobs, turned into what runs on this device and applied for that one job.

The pieces (:mod:`~storystudio.models.fp8`, :mod:`~storystudio.models.attention8`,
:mod:`~storystudio.models.step_cache`) know nothing about jobs or the ModelManager;
this module joins them:

* :func:`resolve_plan` checks the request against the device *before* any model moves:
  ``fp8`` asked explicitly where it cannot run fails the job (``fp8_unsupported``);
  knobs the ``fast`` preset merely defaults on are reported ``unavailable`` and left off.
* Residency: the engine lists the bf16 weights of the FP8-able linears as their own
  component (:data:`BF16_LINEARS`) and, once built, their FP8 copy as another
  (:data:`FP8_WEIGHTS`). A job tells the ModelManager which of the two it leaves idle
  (:func:`idle_components`), so an FP8 job may run with the bf16 copy parked and
  vice versa, and a set never has to hold both while memory is short.
* The FP8 copy is built once per process (:func:`run_video`): at the first job that
  uses it, or when the set loads with ``STORYSTUDIO_FAST_PRESET=preload``.
* :func:`applied` switches a job's knobs on for the duration of its denoising loop and
  off again, so the next (exact) job sees the untouched model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from storystudio.errors import InvalidInput
from storystudio.fast_preset import SpeedKnobs
from storystudio.models.attention8 import attention8_status, attention_8bit
from storystudio.models.fp8 import FP8Store, FP8Support, fp8_linears, fp8_support
from storystudio.models.step_cache import StepCache

log = logging.getLogger(__name__)

BF16_LINEARS = "transformer_linears"  # component: the bf16 weights of the FP8-able linears
FP8_WEIGHTS = "transformer_fp8"  # component: their FP8 copy (exists once built)


@dataclass(frozen=True)
class SpeedPlan:
    """What one video job runs with on this device."""

    knobs: SpeedKnobs
    fp8: FP8Support | None = None  # None: off
    fp8_detail: str = "off"
    attention_8bit: bool = False
    attention_8bit_detail: str = "off"

    @property
    def step_cache(self) -> float:
        return self.knobs.step_cache

    @property
    def is_exact(self) -> bool:
        return self.fp8 is None and not self.attention_8bit and self.step_cache == 0.0


EXACT = SpeedPlan(SpeedKnobs())


def resolve_plan(knobs: SpeedKnobs, device: torch.device | str) -> SpeedPlan:
    """The knobs against the device; raises ``fp8_unsupported`` when fp8 was demanded and cannot run."""
    fp8, fp8_detail = None, "off"
    if knobs.fp8 != "off":
        support = fp8_support(device)
        if support.available:
            fp8, fp8_detail = support, support.describe()
        elif knobs.fp8 == "on":
            raise InvalidInput(f"fp8 was requested but this worker cannot run FP8 matmuls: {support.reason}. "
                               "Leave fp8 unset (the fast preset then skips it) or set it to false.",
                               code="fp8_unsupported")
        else:
            fp8_detail = support.describe()
    att, att_detail = False, "off"
    if knobs.attention_8bit != "off":
        status = attention8_status(device)
        att, att_detail = status.available, status.detail if status.available else f"unavailable: {status.detail}"
    return SpeedPlan(knobs, fp8, fp8_detail, att, att_detail)


def idle_components(plan: SpeedPlan) -> frozenset[str]:
    """The weight copy this job does not read: bf16 linears on FP8 jobs, the FP8 copy otherwise."""
    return frozenset({BF16_LINEARS}) if plan.fp8 is not None else frozenset({FP8_WEIGHTS})


@contextmanager
def applied(transformer: nn.Module, store: FP8Store | None, plan: SpeedPlan,
            device: torch.device) -> Iterator[None]:
    """FP8 linears and 8-bit attention switched on for the block (step caching is per clip)."""
    with ExitStack() as stack:
        if plan.fp8 is not None:
            if store is None:
                raise RuntimeError("FP8 job without an FP8 copy of the weights (build_fp8 was not called)")
            stack.enter_context(fp8_linears(transformer, store, plan.fp8))
        if plan.attention_8bit:
            stack.enter_context(attention_8bit(device))
        yield


def step_cache_for(transformer: nn.Module, plan: SpeedPlan, steps: int) -> StepCache | None:
    """A fresh step cache for one clip, or None when the knob is off."""
    return StepCache(transformer, plan.step_cache, steps) if plan.step_cache > 0 else None


def report(plan: SpeedPlan, steps: int, skipped: list[list[int]]) -> dict[str, Any]:
    """The ``speed`` block of a video result: what ran, and the steps each clip reused."""
    return {
        "preset": plan.knobs.preset,
        "fp8": plan.fp8 is not None,
        "attention_8bit": plan.attention_8bit,
        "step_cache": plan.step_cache,
        "steps": steps,
        "skipped_steps": [len(s) for s in skipped],
        "skipped_step_indices": skipped,
        "details": {"fp8": plan.fp8_detail, "attention_8bit": plan.attention_8bit_detail},
    }


def ensure_fp8_weights(manager: Any, set_name: str, plan: SpeedPlan) -> None:
    """Build the FP8 copy of the set's linears once (room made first) and hand it to the manager."""
    if plan.fp8 is None:
        return

    def build(engine: Any) -> None:
        if engine.transformer_fp8 is not None:
            return
        granularity = plan.fp8.granularity
        manager.ensure(set_name, working_bytes=engine.fp8_nbytes(granularity))
        engine.build_fp8(granularity)
        manager.adopt_components(set_name)

    manager.run(set_name, build)


def run_video(manager: Any, set_name: str, request: Any, *, working_bytes: int,
              progress: Callable[[int, int], None] | None = None) -> Any:
    """``engine.generate(request)`` on the manager, with the FP8 copy built first when the job needs it."""
    plan: SpeedPlan = request.speed
    ensure_fp8_weights(manager, set_name, plan)
    return manager.run(set_name, lambda engine: engine.generate(request, progress), working_bytes=working_bytes,
                       idle=idle_components(plan))
