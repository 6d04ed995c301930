"""A batch's time budget: render the next scene only if it can finish before the job is killed.

RunPod kills a job at the endpoint's execution timeout and returns nothing. A story
batch is long (minutes per scene), so instead it is told its budget,
``STORYSTUDIO_JOB_TIMEOUT_S`` (set it a little below the endpoint's execution
timeout), and before each image and each video it estimates that piece's time. When
the piece cannot finish before ``job start + budget - margin``, the batch stops,
returns what is done, and marks the rest ``deadline_exceeded``. With ``resume``,
submitting the story again renders only those.

Estimates are in *work units* per kind, so a 720p scene is not judged by a 480p one:
an image is ``steps × megapixels``; a video ``steps × (frames its clips generate / 80) ×
(area / 480p area)``, the clips planned by the engine's own rule (``models/clip_plan.py``).
Once a piece of a kind has been measured, the slowest measured seconds-per-unit of that
kind (times a safety factor) is used; before that a
conservative prior per unit plus a fixed per-piece cost (encode, upload), taken from
this project's H100 measurements with a margin (``bench/RESULTS.md``: a 480p CFG step
of 80 frames ≈ 8 s). Plain numbers, no torch: the schema-side code can import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from storystudio import limits as L
from storystudio.models.clip_plan import plan_clip_frames

Kind = Literal["image", "video"]

DEADLINE_MARGIN_S = 15.0  # kept free at the end: assembling and returning the result
SAFETY = 1.2  # measured seconds-per-unit are scaled by this
# First estimates, before anything of that kind was measured in this job (seconds per unit, fixed seconds).
PRIOR_S_PER_UNIT: dict[Kind, float] = {"image": 1.0, "video": 12.0}
PRIOR_FIXED_S: dict[Kind, float] = {"image": 5.0, "video": 20.0}
_VIDEO_REF_AREA = L.RESOLUTIONS["480p"]


def image_units(width: int, height: int, steps: int) -> float:
    return steps * width * height / 1024**2


def video_frames(audio_seconds: float, infer_frames: int, *, trim_last: bool = True) -> int:
    """Frames the engine generates for a line of ``audio_seconds``: the sum of its planned clips
    (the first loses its dropped frames; ``trim_last``: the exact path's shortened or merged last clip)."""
    frames = max(1, round(audio_seconds * L.VIDEO_FPS))
    return sum(plan_clip_frames(frames, infer_frames, trim_last=trim_last))


def video_units(audio_seconds: float, area: int, infer_frames: int, steps: int, *, trim_last: bool = True) -> float:
    return steps * video_frames(audio_seconds, infer_frames, trim_last=trim_last) / 80 * area / _VIDEO_REF_AREA


@dataclass
class Deadline:
    """The job's end (``None``: no budget) and what each kind of piece has cost so far."""

    timeout_s: float | None
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    margin_s: float = DEADLINE_MARGIN_S
    _rates: dict[str, float] = field(default_factory=dict)  # kind -> slowest seconds per unit measured

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.clock()

    def remaining(self) -> float | None:
        """Seconds left before the margin; ``None`` without a budget."""
        if self.timeout_s is None:
            return None
        assert self.started is not None
        return self.started + self.timeout_s - self.margin_s - self.clock()

    def estimate(self, kind: Kind, units: float) -> float:
        rate = self._rates.get(kind)
        if rate is None:
            return PRIOR_FIXED_S[kind] + PRIOR_S_PER_UNIT[kind] * units
        return rate * SAFETY * max(units, 1e-9)

    def fits(self, kind: Kind, units: float) -> tuple[bool, float]:
        """Whether a piece of ``units`` can finish in time, and the estimate it was judged by."""
        est = self.estimate(kind, units)
        left = self.remaining()
        return (left is None or est <= left), est

    def timed(self, kind: Kind, units: float) -> _Timing:
        """``with deadline.timed(kind, units): render()`` records the piece's measured rate."""
        return _Timing(self, kind, units)

    def record(self, kind: Kind, units: float, seconds: float) -> None:
        rate = seconds / max(units, 1e-9)
        self._rates[kind] = max(rate, self._rates.get(kind, 0.0))

    def exceeded(self, kind: Kind, estimate: float) -> dict[str, str]:
        """The error entry of a piece not started for lack of time."""
        left = self.remaining() or 0.0
        msg = (f"not started: the {kind} was estimated at {estimate:.1f} s and {max(left, 0.0):.1f} s were left "
               f"of STORYSTUDIO_JOB_TIMEOUT_S={self.timeout_s:g} (minus {self.margin_s:g} s to return the result); "
               "submit the story again with \"resume\": true to render the rest")
        return {"error": f"deadline_exceeded: {msg}", "code": "deadline_exceeded", "stage": kind}


class _Timing:
    def __init__(self, deadline: Deadline, kind: Kind, units: float) -> None:
        self.deadline, self.kind, self.units = deadline, kind, units

    def __enter__(self) -> _Timing:
        self.t0 = self.deadline.clock()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.deadline.record(self.kind, self.units, self.deadline.clock() - self.t0)
