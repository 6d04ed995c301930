"""Progress reporting for running jobs.

On RunPod, ``runpod.serverless.progress_update`` posts an IN_PROGRESS update that
the story app sees in ``/status``; outside RunPod (local test API, demo, tests)
there is nowhere to post to, so updates are only logged (and passed to a sink the
caller gives, which is how tests see them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Sink = Callable[[dict[str, Any], dict[str, Any]], None]


def runpod_sink() -> Sink | None:
    """The RunPod progress sink when running on the platform, else ``None``.

    The SDK posts to ``RUNPOD_WEBHOOK_POST_OUTPUT``; without it every update would
    be a failed HTTP request in a background thread.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return None
    from runpod.serverless import progress_update

    return progress_update


class ProgressReporter:
    """Sends ``{"stage": ..., ...}`` updates for one job to its sink and the log."""

    def __init__(self, job: dict[str, Any], sink: Sink | None = None) -> None:
        self.job = job
        self.sink = sink
        self._t0 = time.perf_counter()

    def update(self, stage: str, **fields: Any) -> None:
        event = {"stage": stage, **fields, "elapsed_s": round(time.perf_counter() - self._t0, 2)}
        logger.info("job %s progress: %s", self.job.get("id", "?"), event)
        if self.sink is not None:
            try:
                self.sink(self.job, event)
            except Exception:  # a lost progress update must never fail the job
                logger.warning("progress update failed", exc_info=True)

    def steps(self, stage: str, **fields: Any) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback for an engine, tagged with ``stage`` and ``fields``."""

        def callback(done: int, total: int) -> None:
            self.update(stage, done=done, total=total, **fields)

        return callback
