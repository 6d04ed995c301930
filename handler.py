"""RunPod serverless entry point for the Story Studio worker.

Kept thin on purpose: configuration comes from env vars (storystudio.config), the
job logic lives in storystudio.worker; with several GPUs the jobs go to a pool of rank
processes instead (storystudio.distributed). Run locally with the RunPod test API:

    python handler.py --rp_serve_api --rp_api_port 8000
"""

from __future__ import annotations

import logging
import os

import runpod

from storystudio.config import WorkerSettings
from storystudio.distributed.launch import build_job_handler
from storystudio.errors import PreflightError
from storystudio.progress import runpod_sink

log = logging.getLogger("storystudio.handler")


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("STORYSTUDIO_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        worker = build_job_handler(WorkerSettings.from_env(), sink=runpod_sink())
    except PreflightError as exc:
        # Exit before taking jobs: RunPod marks the worker unhealthy instead of failing every job on it.
        log.critical("pre-flight failed, this worker will not start: %s", exc.message)
        raise SystemExit(1) from None
    worker.prewarm()
    runpod.serverless.start({"handler": worker.handle})


if __name__ == "__main__":
    main()
