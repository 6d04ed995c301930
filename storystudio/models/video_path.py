"""How the Wan engine runs a generation: the exact fast path (default) or the baseline.

Both compute the same video (same weights, same math, same seed); they differ in how:

=================  =============================================  ==============================
knob               exact (default)                                baseline (before issue 10)
=================  =============================================  ==============================
attention          fastest kernel that passes the start-up        ``default``: official flash-attn
                   self-check (``STORYSTUDIO_ATTENTION``)         if importable, else SDPA's pick
cfg_batch          cond + uncond in one batch-2 forward when      two forwards per step
                   memory allows (``STORYSTUDIO_CFG_BATCH``)
compile            regional ``torch.compile`` of the DiT blocks   eager
                   and the audio injection on CUDA, every clip
                   length (``STORYSTUDIO_COMPILE``)
trim_last_clip     the last clip only as long as the audio        every clip ``infer_frames`` long
                   needs (rounded up to 4 frames); a tail of
                   one latent frame merged into the clip before
rope               ``fused``: the RoPE table on the GPU, the      ``official``: table on the CPU,
                   rotation in real float32 arithmetic that       complex128 product per call
                   inductor fuses (``STORYSTUDIO_ROPE``)
=================  =============================================  ==============================

``STORYSTUDIO_VIDEO_PATH=baseline`` selects the right-hand column as a whole; the
individual variables then change single knobs of the chosen column. The options are
read by the engine at every ``generate``, so a benchmark switches paths on one loaded
model without reloading it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from storystudio.errors import InvalidInput
from storystudio.models.attention import REQUESTS as ATTENTION_REQUESTS

Switch = Literal["auto", "on", "off"]
PathName = Literal["exact", "baseline"]
Rope = Literal["fused", "official"]
_SWITCHES = ("auto", "on", "off")
_ROPES = ("fused", "official")


@dataclass(frozen=True)
class VideoPathOptions:
    """The engine's speed knobs (see the module docstring); ``auto`` decides per device/job."""

    name: PathName = "exact"
    attention: str = "auto"  # auto | default | sdpa | fa3 | fa4 | fa2 | cudnn | flash | efficient | math
    cfg_batch: Switch = "auto"  # auto: batch when the activation estimate fits in free memory
    compile: Switch = "auto"  # auto: on for CUDA, off for CPU
    trim_last_clip: bool = True
    rope: Rope = "fused"  # storystudio.models.fused_rope; same positions and math as the official
    compile_backend: str = "inductor"  # tests use "aot_eager" to check the mechanics without a C++ build

    def __post_init__(self) -> None:
        if self.name not in ("exact", "baseline"):
            raise ValueError(f"video path must be exact or baseline, got {self.name!r}")
        if self.attention not in ATTENTION_REQUESTS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_REQUESTS)}, got {self.attention!r}")
        for knob in ("cfg_batch", "compile"):
            if getattr(self, knob) not in _SWITCHES:
                raise ValueError(f"{knob} must be auto, on or off, got {getattr(self, knob)!r}")
        if self.rope not in _ROPES:
            raise ValueError(f"rope must be fused or official, got {self.rope!r}")

    @classmethod
    def baseline(cls) -> VideoPathOptions:
        """The engine as it was before issue 10: two forwards, default attention, eager, full clips,
        the official RoPE."""
        return cls(name="baseline", attention="default", cfg_batch="off", compile="off", trim_last_clip=False,
                   rope="official")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VideoPathOptions:
        """``STORYSTUDIO_VIDEO_PATH``, then ``STORYSTUDIO_ATTENTION`` / ``_CFG_BATCH`` / ``_COMPILE`` / ``_ROPE``."""
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return (env.get(name) or "").strip().lower()

        path = get("STORYSTUDIO_VIDEO_PATH") or "exact"
        if path not in ("exact", "baseline"):
            raise InvalidInput(f"STORYSTUDIO_VIDEO_PATH must be exact or baseline, not {path!r}",
                               code="invalid_config")
        opts = cls.baseline() if path == "baseline" else cls()
        changes: dict[str, str] = {}
        for var, knob, allowed in (("STORYSTUDIO_ATTENTION", "attention", ATTENTION_REQUESTS),
                                   ("STORYSTUDIO_CFG_BATCH", "cfg_batch", _SWITCHES),
                                   ("STORYSTUDIO_COMPILE", "compile", _SWITCHES),
                                   ("STORYSTUDIO_ROPE", "rope", _ROPES)):
            value = get(var)
            if not value:
                continue
            if value not in allowed:
                raise InvalidInput(f"{var} must be one of {', '.join(allowed)}, not {value!r}", code="invalid_config")
            changes[knob] = value
        return replace(opts, **changes)  # type: ignore[arg-type]
