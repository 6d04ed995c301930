"""Keep workers warm for a while, and always put ``workersMin`` back afterwards.

``workersMin > 0`` keeps GPUs running (and billed) even with no jobs, so the one thing
this module must get right is the restore::

    with WarmWorkers(client, "abc123", 1, wait_ready=True, ready_timeout=600):
        ...  # submit jobs; the worker stays loaded between them

* On entry the current ``workersMin`` is read. If it is already ``>= min_workers``
  nothing is changed (and nothing restored): we never lower someone else's setting.
  Otherwise it is set to ``min_workers`` (and optionally we wait for a ready worker).
* On exit — normal end, exception, ``KeyboardInterrupt``, or SIGINT/SIGTERM/SIGHUP
  (turned into exceptions while the block runs, see below) — the previous value is
  written back. If entry fails half-way (e.g. the PATCH timed out but was applied, or
  the ready-wait timed out) the restore runs before the error propagates.
* Before restoring, the current value is read again: if it is no longer the value we
  set, someone else (another run, an operator) changed it since, and it is left alone.
  Nested runs, and overlapping runs that use the same ``min_workers``, therefore end
  at the original value. Known limit: two runs that overlap without nesting *and* use
  different values (A sets 1, B sets 2, A ends first, then B) end at A's value, because
  B restores what it saw when it started. Use one warm value per endpoint.
* Signals: while the block runs (main thread only), SIGINT raises ``KeyboardInterrupt``
  and SIGTERM/SIGHUP raise :class:`Terminated` (a ``SystemExit`` with code 128+signal),
  so the stack unwinds through ``__exit__``. Signals set to be ignored (SIGHUP under
  ``nohup``) stay ignored; an application with its own handlers can pass
  ``handle_signals=False`` and call :meth:`WarmWorkers.restore` itself. While the restore itself runs, further
  signals are held back until it is done, so a second Ctrl-C cannot abort it.
* If the restore fails even after retries, :class:`RestoreFailed` is raised (or logged,
  when another exception is already propagating) with the exact command to run.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from .client import RunPodClient
from .errors import AuthError, BackendError, RestoreFailed

log = logging.getLogger(__name__)

HANDLED_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
    if s is not None
)


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM/SIGHUP arrives inside a guarded block."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


class SignalGuard:
    """Turns SIGINT/SIGTERM/SIGHUP into exceptions; can hold them back during cleanup."""

    def __init__(self, signals: tuple[signal.Signals, ...] = HANDLED_SIGNALS) -> None:
        self.signals = signals
        self._previous: dict[int, Any] = {}
        self._holding = False
        self.pending: int | None = None
        self.installed = False

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: signal handlers not installed")
            return False
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:  # e.g. SIGHUP under nohup: keep ignoring it
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        self.installed = True
        return True

    def uninstall(self) -> None:
        if not self.installed:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    def hold(self) -> None:
        self._holding = True

    def release(self) -> int | None:
        """Stop holding; return the signal that arrived meanwhile (if any)."""
        self._holding = False
        pending, self.pending = self.pending, None
        return pending

    @staticmethod
    def exception_for(signum: int) -> BaseException:
        if signum == signal.SIGINT:
            return KeyboardInterrupt()
        return Terminated(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._holding:
            log.warning("%s received while restoring workersMin; finishing the restore first", name)
            if self.pending is None:
                self.pending = signum
            return
        log.warning("%s received: cleaning up before exiting", name)
        raise self.exception_for(signum)


class WarmWorkers:
    """Context manager: ``workersMin = min_workers`` inside, previous value after."""

    def __init__(
        self,
        client: RunPodClient,
        endpoint_id: str,
        min_workers: int,
        *,
        wait_ready: bool = False,
        ready_timeout: float = 600.0,
        ready_poll_interval: float = 5.0,
        ready_workers: int = 1,
        handle_signals: bool = True,
        restore_rounds: int = 3,
    ) -> None:
        if isinstance(min_workers, bool) or not isinstance(min_workers, int) or min_workers < 0:
            raise ValueError("min_workers must be an int >= 0")
        self.client = client
        self.endpoint_id = endpoint_id
        self.min_workers = min_workers
        self.wait_ready = wait_ready
        self.ready_timeout = ready_timeout
        self.ready_poll_interval = ready_poll_interval
        self.ready_workers = max(1, ready_workers)
        self.restore_rounds = max(1, restore_rounds)
        self.previous: int | None = None
        self.changed = False
        self.restored = False
        self.guard = SignalGuard() if handle_signals else None

    # ------------------------------------------------------------------ protocol

    def __enter__(self) -> WarmWorkers:
        if self.guard is not None:
            self.guard.install()
        try:
            self.previous = self.client.get_workers_min(self.endpoint_id)
            if self.previous >= self.min_workers:
                log.info(
                    "endpoint %s: workersMin is already %d (>= %d); leaving it as is",
                    self.endpoint_id, self.previous, self.min_workers,
                )
            else:
                # Armed before the PATCH: if it times out after RunPod applied it, the
                # restore below still runs.
                self.changed = True
                self.client.set_workers_min(self.endpoint_id, self.min_workers)
            if self.wait_ready and self.min_workers > 0:
                self.client.wait_for_workers(
                    self.endpoint_id,
                    min_ready=self.ready_workers,
                    timeout=self.ready_timeout,
                    poll_interval=self.ready_poll_interval,
                )
        except BaseException as exc:
            self._cleanup(exc)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup(exc)

    # ------------------------------------------------------------------ restore

    def _cleanup(self, propagating: BaseException | None) -> None:
        guard = self.guard
        if guard is not None:
            guard.hold()
        failure: RestoreFailed | None = None
        try:
            self.restore()
        except RestoreFailed as err:
            failure = err
        finally:
            pending = None
            if guard is not None:
                guard.uninstall()
                pending = guard.release()
        if failure is not None and propagating is None:
            raise failure
        if pending is not None and propagating is None:
            raise SignalGuard.exception_for(pending)

    def restore(self) -> None:
        """Write the previous ``workersMin`` back (idempotent; no-op if nothing changed)."""
        if not self.changed or self.restored or self.previous is None:
            return
        eid, previous = self.endpoint_id, self.previous
        try:
            current: int | None = self.client.get_workers_min(eid)
        except BackendError as exc:
            log.warning("endpoint %s: could not read workersMin before restoring (%s)", eid, exc)
            current = None
        if current is not None and current != self.min_workers:
            if current == previous:
                log.info("endpoint %s: workersMin is already back at %d", eid, previous)
            else:
                log.warning(
                    "endpoint %s: workersMin is now %d, not the %d set by this run; someone "
                    "else changed it meanwhile, so it is left as is (it was %d before)",
                    eid, current, self.min_workers, previous,
                )
            self.restored = True
            return
        last: BackendError | None = None
        for round_ in range(1, self.restore_rounds + 1):
            try:
                self.client.set_workers_min(eid, previous)
            except AuthError as exc:
                last = exc
                break
            except BackendError as exc:
                last = exc
                log.warning("endpoint %s: restoring workersMin failed (round %d/%d): %s",
                            eid, round_, self.restore_rounds, exc)
                continue
            self.restored = True
            log.info("endpoint %s: workersMin restored to %d", eid, previous)
            return
        message = (
            f"could not restore workersMin={previous} on endpoint {eid} ({last}); workers "
            f"may keep running and billing. Restore it by hand: "
            f"storystudio warm set {previous} --endpoint {eid}"
        )
        log.error(message)
        raise RestoreFailed(message)
