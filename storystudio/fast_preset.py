"""The video job's speed preset: ``"exact"`` (default) or ``"fast"``, and the knobs it sets.

Why a preset *and* knobs: callers want one switch ("fast"), while drift reports and
careful users need each approximation alone. The preset only chooses defaults; an
explicit knob always wins. The knobs, each an approximation of the exact path:

* ``fp8`` — the DiT blocks' linears run on FP8 weights and activations
  (:mod:`storystudio.models.fp8`);
* ``attention_8bit`` — SageAttention where it is installed and passes a self-check
  (:mod:`storystudio.models.attention8`), exact attention otherwise;
* ``step_cache`` — a threshold: denoising steps whose noisy latent moved less than it
  since the last computed step reuse that step's block residual
  (:mod:`storystudio.models.step_cache`); 0 or null is off.

This module imports nothing heavy (no torch): the job schema validates with it in
milliseconds, and the backend client can use the same rules. The limits and the fast
preset's default threshold live in :mod:`storystudio.limits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from storystudio import limits as L

Preset = Literal[L.VIDEO_PRESETS]  # type: ignore[valid-type]

# A knob's resolved request: "off"; "auto" = on where this device can (the fast preset's
# default: a fast job must never fail because one approximation is unavailable); "on" =
# explicitly asked for (fp8 then fails the job with ``fp8_unsupported`` where it cannot run).
Want = Literal["off", "auto", "on"]


@dataclass(frozen=True)
class SpeedKnobs:
    """A job's resolved speed request (what was asked, before the device is consulted)."""

    preset: Preset = L.VIDEO_PRESET_DEFAULT
    fp8: Want = "off"
    attention_8bit: Want = "off"
    step_cache: float = 0.0  # threshold; 0 = off

    @classmethod
    def resolve(cls, preset: str = L.VIDEO_PRESET_DEFAULT, *, fp8: bool | None = None, attention_8bit: bool | None = None,
                step_cache: float | None = None) -> SpeedKnobs:
        """Preset defaults, overridden by every knob that is not ``None``."""
        if preset not in L.VIDEO_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(L.VIDEO_PRESETS)}, got {preset!r}")
        fast = preset == "fast"

        def want(explicit: bool | None) -> Want:
            if explicit is None:
                return "auto" if fast else "off"
            return "on" if explicit else "off"

        threshold = (L.FAST_STEP_CACHE_THRESHOLD if fast else 0.0) if step_cache is None else float(step_cache)
        return cls(preset=preset, fp8=want(fp8), attention_8bit=want(attention_8bit), step_cache=threshold)  # type: ignore[arg-type]

    @property
    def is_exact(self) -> bool:
        """Every knob off: the job runs the exact path whatever the preset's name."""
        return self.fp8 == "off" and self.attention_8bit == "off" and self.step_cache == 0.0


def check_speed_request(preset: str, fp8: bool | None, attention_8bit: bool | None, step_cache: float | None,
                        steps: int) -> None:
    """Reject combinations that cannot mean what the caller wants; ``ValueError`` with the reason.

    Only explicit knobs are judged: a preset's default that does not apply (a step cache
    on a 3-step job) silently skips nothing and says so in the result.
    """
    if preset not in L.VIDEO_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(L.VIDEO_PRESETS)}, got {preset!r}")
    if step_cache is not None:
        if not math.isfinite(step_cache) or not 0.0 <= step_cache <= L.STEP_CACHE_MAX_THRESHOLD:
            raise ValueError(f"step_cache must be a threshold between 0 (off) and {L.STEP_CACHE_MAX_THRESHOLD}, "
                             f"got {step_cache!r}")
        if step_cache > 0 and steps < L.STEP_CACHE_MIN_STEPS:
            raise ValueError(f"step_cache needs at least {L.STEP_CACHE_MIN_STEPS} steps (the first "
                             f"{L.STEP_CACHE_FIRST_STEPS} and last {L.STEP_CACHE_LAST_STEPS} are always computed); "
                             f"steps is {steps}")
    if preset == "fast" and fp8 is False and attention_8bit is False and step_cache is not None and step_cache == 0:
        raise ValueError("preset 'fast' with fp8, attention_8bit and step_cache all turned off is the exact path; "
                         "send preset 'exact' instead")
