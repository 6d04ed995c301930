"""``storystudio-serve`` (also ``storystudio serve`` and ``python -m storystudio.serve``).

Reads the configuration (environment, overridden by the flags), refuses an unsafe
bind (no API key on a non-loopback address) before anything heavy is imported, builds
the worker and serves the app with uvicorn in this one process.

Exit codes: 0 after a normal shutdown, 2 for a configuration problem (bad env var,
unsafe bind, database held by another process).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from storystudio.errors import InvalidInput

if TYPE_CHECKING:
    from storystudio.serve.settings import ServeSettings

log = logging.getLogger("storystudio.serve")

EXIT_OK, EXIT_CONFIG = 0, 2
# After SIGTERM, requests still waiting for a video get this long; the job itself is then
# cut off with the process and reported as server_restarted by the next start.
GRACEFUL_SHUTDOWN_S = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="storystudio serve",
        description="Serve the Story Studio worker over HTTP (the earlier self-hosted API plus /jobs). "
                    "Everything else is configured by environment variables (README: Self-hosting).",
    )
    p.add_argument("--host", default=None, help="address to bind (default: $STORYSTUDIO_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: $STORYSTUDIO_PORT or 8000)")
    p.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="serve without API keys on a non-loopback address (also "
                        "STORYSTUDIO_ALLOW_UNAUTHENTICATED=1); logged as a warning")
    p.add_argument("--db", type=Path, default=None,
                   help="job database (default: $STORYSTUDIO_SERVE_DB or <output dir>/.serve/jobs.sqlite3)")
    p.add_argument("--log-level", default=None, help="log level (default: $STORYSTUDIO_LOG_LEVEL or INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or os.environ.get("STORYSTUDIO_LOG_LEVEL") or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from storystudio.serve.auth import UnsafeBind, check_bind
    from storystudio.serve.settings import ServeSettings

    try:
        settings = ServeSettings.from_env()
    except (InvalidInput, ValueError) as exc:
        log.error("configuration: %s", exc)
        return EXIT_CONFIG
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("db_path", args.db),
                                   ("allow_unauthenticated", args.allow_unauthenticated)) if v is not None}
    settings = replace(settings, **overrides)
    try:
        check_bind(settings.host, settings.keys, settings.allow_unauthenticated)
    except UnsafeBind as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    return _serve(settings)


def _serve(settings: ServeSettings) -> int:
    import uvicorn

    from storystudio.serve.app import create_app
    from storystudio.serve.store import DatabaseBusy
    from storystudio.storage import LocalStorage
    from storystudio.errors import PreflightError
    from storystudio.worker import Worker

    if settings.storage.backend == "s3":
        log.warning("HTTP mode serves its results itself: the S3 settings are ignored and results are "
                    "written to %s", settings.output_dir)
    try:  # the same start-up as the RunPod worker: models found, GPU pre-flight, policy
        worker = Worker.from_settings(settings.worker, storage=LocalStorage(settings.output_dir, settings.storage.prefix))
    except PreflightError as exc:
        log.error("pre-flight failed, not serving: %s", exc.message)
        return EXIT_CONFIG
    try:
        app = create_app(settings, worker)
    except DatabaseBusy as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    log.info("serving on http://%s:%d (device %s, results in %s, jobs in %s, media root %s, "
             "%d unfinished job(s) per key, video defaults %s)",
             settings.host, settings.port, settings.worker.device, settings.output_dir, settings.database,
             settings.media_root or "none (paths refused)", settings.max_jobs_per_key,
             settings.video_settings or "the worker's")
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, workers=1,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
