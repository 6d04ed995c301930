"""Which job handler a worker process runs: one Worker, or a pool of GPU ranks.

``handler.py`` calls :func:`build_job_handler` and hands its ``handle`` to RunPod; both
kinds have the same ``prewarm()`` / ``handle(job)`` contract.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

from storystudio.config import WorkerSettings
from storystudio.distributed.config import DistributedConfig
from storystudio.progress import Sink

log = logging.getLogger(__name__)


class JobHandler(Protocol):
    def prewarm(self) -> None: ...

    def handle(self, job: dict[str, Any]) -> dict[str, Any]: ...


def build_job_handler(settings: WorkerSettings, sink: Sink | None = None,
                      env: Mapping[str, str] | None = None) -> JobHandler:
    """A :class:`~storystudio.distributed.executor.DistributedExecutor` when more than one
    rank is configured (several visible GPUs, ``STORYSTUDIO_GPUS``), else a plain Worker."""
    config = DistributedConfig.from_env(os.environ if env is None else env, device=settings.device)
    if config.enabled:
        from storystudio.distributed.executor import DistributedExecutor

        log.info("multi-GPU worker: %d ranks", config.world_size)
        return DistributedExecutor(settings, config, sink)
    from storystudio.worker import Worker

    return Worker.from_settings(settings, sink=sink)
