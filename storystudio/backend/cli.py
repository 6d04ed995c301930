"""``storystudio`` — the story app backend's command line for the RunPod endpoint.

Commands (each takes ``--endpoint ID`` or ``RUNPOD_ENDPOINT_ID``)::

    storystudio warm get                       print workersMin
    storystudio warm set N [--wait]            set workersMin (persistent; not restored)
    storystudio warm hold N [--for S]          workersMin=N until S seconds pass or the
                                               process is interrupted/terminated; then restore
    storystudio submit story.json [--warm N] [--wait-ready] [--timeout S] [--download DIR]
                                               run a story, print per-scene results as JSON;
                                               local media files are uploaded (or inlined);
                                               --download writes PNGs, MP4s and result.json
    storystudio submit story.json --workers N  the same, spread over N workers (images job,
                                               then one video job per scene, N at a time)
    storystudio status JOB_ID                  print a job's status JSON
    storystudio cancel JOB_ID                  cancel a job
    storystudio health                         print the endpoint's /health JSON
    storystudio serve [--host H] [--port P]    run the worker as a self-hosted HTTP service
                                               (storystudio.serve; not a RunPod command)

The API key comes from ``RUNPOD_API_KEY``, ``RUNPOD_API_KEY_FILE`` or ``--api-key-file``
(never from the command line itself). Results go to stdout as JSON; progress and logs go
to stderr.

Exit codes: 0 success; 1 API error, job failed or timed out, upload or download failed;
2 usage or configuration error (bad story, missing local file, request too large for
RunPod without a bucket); 3 the story finished but some scenes carry an error;
4 ``workersMin`` could not be restored (the message says what to run); 130 SIGINT;
128+n other signals.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storystudio.errors import InvalidInput

from .auth import ApiKey, load_api_key, scrub
from .client import DEFAULT_API_BASE, DEFAULT_REST_BASE, PollSettings, RetryPolicy, RunPodClient
from .errors import BackendError, ConfigError, PayloadTooLarge, RestoreFailed
from .warm import Terminated, WarmWorkers

log = logging.getLogger("storystudio.backend.cli")

ENV_ENDPOINT = "RUNPOD_ENDPOINT_ID"
ENV_API_BASE = "RUNPOD_ENDPOINT_BASE_URL"  # same name the runpod SDK uses
ENV_REST_BASE = "RUNPOD_REST_BASE_URL"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_RESTORE = 0, 1, 2, 3, 4


class _RedactFilter(logging.Filter):
    """Last line of defence: no log line leaves with the key in it."""

    def __init__(self, key: ApiKey) -> None:
        super().__init__()
        self._key = key

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message, self._key)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _positive(value: str) -> float:
    x = float(value)
    if x <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return x


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--endpoint", default=os.environ.get(ENV_ENDPOINT),
                   help=f"RunPod endpoint id (default: ${ENV_ENDPOINT})")
    g.add_argument("--api-key-file", type=Path, default=None,
                   help="file holding the API key (else $RUNPOD_API_KEY_FILE or $RUNPOD_API_KEY)")
    g.add_argument("--api-base", default=os.environ.get(ENV_API_BASE, DEFAULT_API_BASE),
                   help=f"serverless job API base URL (default: ${ENV_API_BASE} or {DEFAULT_API_BASE})")
    g.add_argument("--rest-base", default=os.environ.get(ENV_REST_BASE, DEFAULT_REST_BASE),
                   help=f"REST management API base URL (default: ${ENV_REST_BASE} or {DEFAULT_REST_BASE})")
    g.add_argument("--http-timeout", type=_positive, default=30.0,
                   help="per-request read timeout in seconds (default 30)")
    g.add_argument("--max-attempts", type=int, default=5, help="tries per API call (default 5)")
    g.add_argument("--backoff-base", type=float, default=0.5,
                   help="first retry delay in seconds; doubles per retry (default 0.5)")
    g.add_argument("--backoff-max", type=float, default=20.0, help="longest retry delay (default 20)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    parser = argparse.ArgumentParser(
        prog="storystudio",
        description="Story Studio backend: warm workers and story jobs on a RunPod endpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    warm = sub.add_parser("warm", help="read or change the endpoint's workersMin")
    warm_sub = warm.add_subparsers(dest="warm_command", required=True)
    warm_sub.add_parser("get", parents=[common], help="print workersMin")
    wset = warm_sub.add_parser("set", parents=[common], help="set workersMin (stays set)")
    wset.add_argument("n", type=_non_negative_int, metavar="N")
    wset.add_argument("--wait", action="store_true", help="then wait for a ready worker")
    wset.add_argument("--ready-timeout", type=_positive, default=600.0)
    wset.add_argument("--ready-poll", type=_positive, default=5.0)
    whold = warm_sub.add_parser("hold", parents=[common],
                                help="workersMin=N until --for elapses or a signal arrives, then restore")
    whold.add_argument("n", type=_non_negative_int, metavar="N")
    whold.add_argument("--for", dest="duration", type=_positive, default=None,
                       help="seconds to hold (default: until interrupted)")
    whold.add_argument("--wait", action="store_true", help="wait for a ready worker first")
    whold.add_argument("--ready-timeout", type=_positive, default=600.0)
    whold.add_argument("--ready-poll", type=_positive, default=5.0)

    sp = sub.add_parser("submit", parents=[common], help="run a story and print per-scene results")
    sp.add_argument("story", help="story JSON file (job input or {'input': ...}); '-' for stdin")
    sp.add_argument("--warm", type=_non_negative_int, default=None, metavar="N",
                    help="keep workersMin >= N while the story runs, restore afterwards")
    sp.add_argument("--workers", type=_non_negative_int, default=None, metavar="N",
                    help="fan out over N workers: workersMin=N for the story (restored afterwards), "
                         "the images as one job, then one video job per scene, N at a time "
                         "(see storystudio/backend/fanout.py)")
    sp.add_argument("--wait-ready", action="store_true", help="with --warm: wait for a ready worker first")
    sp.add_argument("--ready-timeout", type=_positive, default=600.0)
    sp.add_argument("--ready-poll", type=_positive, default=5.0)
    sp.add_argument("--timeout", type=_positive, default=3600.0,
                    help="seconds to wait for the job before cancelling it (default 3600)")
    sp.add_argument("--execution-timeout", type=_positive, default=None,
                    help="RunPod policy.executionTimeout in seconds (default: --timeout)")
    sp.add_argument("--poll-interval", type=_positive, default=1.0, help="first /status poll interval")
    sp.add_argument("--max-poll-interval", type=_positive, default=10.0, help="longest poll interval")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--no-cancel", action="store_true",
                    help="do not cancel the job when interrupted or timed out")
    # -- issue 16: local media and results on disk
    sp.add_argument("--download", type=Path, default=None, metavar="DIR",
                    help="write each scene's PNG and MP4 and result.json to DIR; files already "
                         "there and complete are kept, and an unchanged story already rendered "
                         "into DIR is not rendered again")
    sp.add_argument("--rerun", action="store_true",
                    help="with --download: render again even if DIR holds this story's result")
    sp.add_argument("--input-url-ttl", type=int, default=None, metavar="S",
                    help="lifetime of the presigned URLs of uploaded local media "
                         "(default: $STORYSTUDIO_INPUT_URL_SECONDS or 86400)")

    st = sub.add_parser("status", parents=[common], help="print a job's status")
    st.add_argument("job_id")
    ca = sub.add_parser("cancel", parents=[common], help="cancel a job")
    ca.add_argument("job_id")
    sub.add_parser("health", parents=[common], help="print the endpoint's health")
    sub.add_parser("serve", add_help=False, help="self-hosted HTTP service (see: storystudio serve --help)")
    return parser


def _setup_logging(args: argparse.Namespace, console: Any, key: ApiKey | None) -> Callable[[], None]:
    """Log to stderr (through rich on a terminal, above the progress bar); returns an undo."""
    from rich.logging import RichHandler

    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, show_time=False, markup=False,
                              rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # a log file or a pipe to the story app: plain, unwrapped lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if key is not None:
        handler.addFilter(_RedactFilter(key))
    root = logging.getLogger()
    ours = logging.getLogger("storystudio")
    saved = (root.level, ours.level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    ours.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])

    return undo


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def _client(args: argparse.Namespace, key: ApiKey) -> RunPodClient:
    retry = RetryPolicy(max_attempts=max(1, args.max_attempts), backoff_base=max(0.0, args.backoff_base),
                        backoff_max=max(0.0, args.backoff_max))
    return RunPodClient(key, api_base=args.api_base, rest_base=args.rest_base,
                        timeout=(min(10.0, args.http_timeout), args.http_timeout), retry=retry)


class _StoryDisplay:
    """Per-scene progress: one bar per scene on a terminal, a log line per change elsewhere."""

    def __init__(self, console: Any, story: Any, show: bool) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.name = story.project_id
        self.show = show
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TimeElapsedColumn(), console=console, transient=True, disable=not show)
        self.job = self.progress.add_task(f"{self.name}: submitting", total=None)
        self.rows = {sid: self.progress.add_task(f"  {sid}: waiting", total=None) for sid in story.scene_ids}
        self.seen: dict[str, str] = {}

    def submitted(self, job_id: str) -> None:
        self.progress.update(self.job, description=f"{self.name}: job {job_id} submitted "
                                                   f"({len(self.rows)} scene(s))")

    def update(self, update: Any) -> None:
        kwargs: dict[str, Any] = {"description": f"{self.name}: {update.describe()}"}
        if update.fraction is not None:
            kwargs.update(total=1000, completed=round(update.fraction * 1000))
        self.progress.update(self.job, **kwargs)
        for scene in update.scenes:
            text = scene.describe()
            if self.seen.get(scene.scene_id) == text:
                continue
            self.seen[scene.scene_id] = text
            row: dict[str, Any] = {"description": f"  {scene.scene_id}: {text}"}
            if scene.final:
                row.update(total=1, completed=1)
            elif scene.clips_total:
                row.update(total=scene.clips_total, completed=scene.clips_done or 0)
            self.progress.update(self.rows[scene.scene_id], **row)
            if not self.show:
                log.info("scene %s: %s", scene.scene_id, text)


def _cmd_submit(args: argparse.Namespace, client: RunPodClient, console: Any) -> int:
    from .story import Story
    from .studio import StoryStudio

    story = Story.from_file(args.story)
    studio = StoryStudio(args.endpoint, client=client, input_url_seconds=args.input_url_ttl)
    show = not args.no_progress and console.is_terminal
    display = _StoryDisplay(console, story, show)
    poll = PollSettings(initial=args.poll_interval, maximum=max(args.poll_interval, args.max_poll_interval))
    # the bars show each status change; don't repeat them as log lines unless -v
    submit_log = logging.getLogger("storystudio.backend.submit")
    saved_level = submit_log.level
    if show and not args.verbose:
        submit_log.setLevel(logging.WARNING)
    try:
        with display.progress:
            result = studio.run_story(
                story, warm=args.warm or None, workers=args.workers or None,
                download=args.download, rerun=args.rerun,
                timeout=args.timeout, poll=poll,
                execution_timeout=args.execution_timeout if args.execution_timeout else -1,
                wait_ready=args.wait_ready, ready_timeout=args.ready_timeout,
                ready_poll_interval=args.ready_poll,
                on_progress=display.update, on_submitted=display.submitted,
                cancel_on_abort=not args.no_cancel,
            )
    finally:
        submit_log.setLevel(saved_level)
    _print_json(result.to_dict())
    if not result.ok:
        log.warning("%d of %d scene(s) failed: %s", len(result.failed_scenes), len(result.scenes),
                    ", ".join(f"{s.scene_id} ({s.error.code})" for s in result.failed_scenes if s.error))
        return EXIT_PARTIAL
    return EXIT_OK


def _cmd_warm(args: argparse.Namespace, client: RunPodClient) -> int:
    eid = args.endpoint
    if args.warm_command == "get":
        _print_json({"endpoint_id": eid, "workersMin": client.get_workers_min(eid)})
        return EXIT_OK
    if args.warm_command == "set":
        previous = client.get_workers_min(eid)
        client.set_workers_min(eid, args.n)
        out: dict[str, Any] = {"endpoint_id": eid, "workersMin": args.n, "previous": previous}
        if args.wait and args.n > 0:
            health = client.wait_for_workers(eid, timeout=args.ready_timeout, poll_interval=args.ready_poll)
            out["workers"] = health.raw.get("workers")
        _print_json(out)
        return EXIT_OK
    # hold
    with WarmWorkers(client, eid, args.n, wait_ready=args.wait, ready_timeout=args.ready_timeout,
                     ready_poll_interval=args.ready_poll) as warm:
        log.info("holding workersMin >= %d on %s%s", args.n, eid,
                 f" for {args.duration:g}s" if args.duration else " until interrupted")
        sys.stderr.flush()
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))
    _print_json({"endpoint_id": eid, "held": args.n, "workersMin": warm.previous,
                 "changed": warm.changed, "restored": warm.restored})
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    # `storystudio serve ...` is the self-hosted HTTP service, with its own parser (storystudio/serve/cli.py).
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["serve"]:
        from storystudio.serve.cli import main as serve_main

        return serve_main(args_in[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True)
    key: ApiKey | None = None
    undo_logging: Callable[[], None] | None = None
    try:
        try:
            key = load_api_key(args.api_key_file)
        finally:
            undo_logging = _setup_logging(args, console, key)
        if not args.endpoint:
            parser.error(f"--endpoint is required (or set {ENV_ENDPOINT})")
        with _client(args, key) as client:
            if args.command == "warm":
                return _cmd_warm(args, client)
            if args.command == "submit":
                return _cmd_submit(args, client, console)
            if args.command == "status":
                _print_json(client.status(args.endpoint, args.job_id).to_dict())
                return EXIT_OK
            if args.command == "cancel":
                _print_json(client.cancel(args.endpoint, args.job_id).to_dict())
                return EXIT_OK
            if args.command == "health":
                health = client.health(args.endpoint)
                _print_json({**health.raw, "warm_workers": health.workers.warm})
                return EXIT_OK
        parser.error(f"unknown command {args.command}")  # pragma: no cover
    except RestoreFailed as exc:
        log.error("%s", exc)
        return EXIT_RESTORE
    except (ConfigError, InvalidInput, PayloadTooLarge) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except BackendError as exc:
        log.error("%s (code=%s)", exc, exc.code)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except Terminated as exc:
        log.warning("%s", exc)
        return int(exc.code)
    finally:
        if undo_logging is not None:
            undo_logging()
    return EXIT_ERROR  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
