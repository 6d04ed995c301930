"""A small, strict RunPod API client for the story app's backend.

Two APIs are used, both with ``Authorization: Bearer <key>``:

* **REST management API** (``https://rest.runpod.io/v1``), current per docs.runpod.io
  ("API reference → Endpoints") and its OpenAPI schema: ``GET /endpoints/{endpointId}``
  returns the endpoint object (``id``, ``name``, ``workersMin``, ``workersMax``,
  ``idleTimeout``, ...); ``PATCH /endpoints/{endpointId}`` takes an
  ``EndpointUpdateInput`` whose fields are all optional (only the fields sent change) and
  returns the endpoint. We send exactly ``{"workersMin": N}``. (The older GraphQL
  ``saveEndpoint`` mutation needs the whole endpoint definition — name, templateId,
  gpuIds — so a partial update through it risks resetting other settings; not used.)
* **Serverless job API** (``https://api.runpod.ai/v2/{endpoint_id}``), as in the runpod
  SDK's ``runpod/endpoint/runner.py`` and the docs' operation reference:
  ``POST /run`` and ``POST /runsync`` with ``{"input": {...}, "policy"?: {...},
  "webhook"?: str}`` → ``{"id", "status"}`` (``/runsync`` also ``output``);
  ``GET /status/{job_id}`` → ``{"id", "status", "output"?, "error"?, "delayTime"?,
  "executionTime"?}``; ``GET /stream/{job_id}`` → ``{"status", "stream": [{"output"}]}``;
  ``POST /cancel/{job_id}`` → ``{"id", "status": "CANCELLED"}``; ``GET /health`` →
  ``{"jobs": {"completed", "failed", "inProgress", "inQueue", "retried"}, "workers":
  {"idle", "initializing", "ready", "running", "throttled", "unhealthy"}}`` (the docs'
  example only shows some of the worker keys; missing keys count as 0).

Retries: 429, 5xx (except 501/505), timeouts and connection errors are retried with
exponential backoff and jitter, at most :attr:`RetryPolicy.max_attempts` tries, and a
``Retry-After`` header (seconds or HTTP date) is honoured, capped at
:attr:`RetryPolicy.retry_after_max`. 401/403 and other 4xx are not retried. RunPod has
no idempotency key for ``/run``: a retried ``/run`` after a timeout or 5xx can in rare
cases create a duplicate job (the client logs a warning when that is possible).
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests

from .auth import ApiKey, scrub
from .errors import (
    AuthError,
    BackendError,
    JobTimeout,
    PayloadTooLarge,
    RequestTimeout,
    RunPodAPIError,
    WorkersNotReady,
)

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.runpod.ai/v2"
DEFAULT_REST_BASE = "https://rest.runpod.io/v1"

#: Largest request body RunPod accepts on ``POST /run``: "Payload limit: 10 MB"
#: (https://docs.runpod.io/serverless/endpoints/send-requests, section "/run").
#: Read as decimal megabytes, the stricter of the two readings.
RUN_PAYLOAD_LIMIT_BYTES = 10_000_000
#: Largest request body on ``POST /runsync``: "Maximum payload size: 20 MB"
#: (https://docs.runpod.io/serverless/endpoints/operation-reference, section "/runsync").
RUNSYNC_PAYLOAD_LIMIT_BYTES = 20_000_000
PAYLOAD_LIMITS: dict[str, int] = {"run": RUN_PAYLOAD_LIMIT_BYTES, "runsync": RUNSYNC_PAYLOAD_LIMIT_BYTES}

#: Final job states (runpod SDK ``endpoint/helpers.py`` ``is_completed``).
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
#: Non-final states. The API reports ``IN_QUEUE``/``IN_PROGRESS``; the docs' job-state
#: page also names ``RUNNING``, so it is accepted as in progress.
PENDING_STATUSES = frozenset({"IN_QUEUE", "IN_PROGRESS", "RUNNING"})

_NOT_RETRIED_5XX = frozenset({501, 505})


def _retryable_status(status: int) -> bool:
    return status == 429 or (500 <= status <= 599 and status not in _NOT_RETRIED_5XX)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter.

    The n-th retry waits ``d/2 + uniform(0, d/2)`` with ``d = min(backoff_max,
    backoff_base * 2**(n-1))``, or longer if the server sent ``Retry-After``.
    """

    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    retry_after_max: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.backoff_base < 0 or self.backoff_max < 0 or self.retry_after_max < 0:
            raise ValueError("backoff values must be >= 0")

    def backoff(self, retry: int, rng: random.Random) -> float:
        cap = min(self.backoff_max, self.backoff_base * (2 ** (retry - 1)))
        return cap / 2 + rng.uniform(0, cap / 2)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


# --------------------------------------------------------------------------- responses


def _int(mapping: Mapping[str, Any], key: str) -> int:
    value = mapping.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value)


@dataclass(frozen=True)
class WorkerCounts:
    idle: int = 0
    initializing: int = 0
    ready: int = 0
    running: int = 0
    throttled: int = 0
    unhealthy: int = 0

    @property
    def warm(self) -> int:
        """Workers that have finished starting (can take a job now or are taking one).

        RunPod does not document whether ``ready`` includes ``idle``/``running``; taking
        ``max(ready, idle + running)`` is right under either reading and never counts a
        worker twice.
        """
        return max(self.ready, self.idle + self.running)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerCounts:
        return cls(**{name: _int(data, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class JobCounts:
    completed: int = 0
    failed: int = 0
    in_progress: int = 0
    in_queue: int = 0
    retried: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobCounts:
        return cls(
            completed=_int(data, "completed"),
            failed=_int(data, "failed"),
            in_progress=_int(data, "inProgress"),
            in_queue=_int(data, "inQueue"),
            retried=_int(data, "retried"),
        )


@dataclass(frozen=True)
class Health:
    jobs: JobCounts
    workers: WorkerCounts
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Health:
        jobs = data.get("jobs")
        workers = data.get("workers")
        if not isinstance(jobs, Mapping) or not isinstance(workers, Mapping):
            raise RunPodAPIError(
                "unexpected /health response: expected 'jobs' and 'workers' objects",
                code="bad_response",
            )
        return cls(JobCounts.from_dict(jobs), WorkerCounts.from_dict(workers), dict(data))


@dataclass(frozen=True)
class JobStatus:
    """One ``/run``, ``/runsync``, ``/status`` or ``/cancel`` answer."""

    id: str
    status: str
    output: Any = None
    error: Any = None
    delay_time_ms: int | None = None
    execution_time_ms: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, job_id: str | None = None) -> JobStatus:
        jid = data.get("id", job_id)
        status = data.get("status")
        if not isinstance(jid, str) or not jid or not isinstance(status, str) or not status:
            raise RunPodAPIError(
                "unexpected job response: expected string 'id' and 'status'",
                code="bad_response",
            )
        delay = data.get("delayTime")
        execution = data.get("executionTime")
        return cls(
            id=jid,
            status=status,
            output=data.get("output"),
            error=data.get("error"),
            delay_time_ms=int(delay) if isinstance(delay, (int, float)) else None,
            execution_time_ms=int(execution) if isinstance(execution, (int, float)) else None,
            raw=dict(data),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.output is not None:
            out["output"] = self.output
        if self.error is not None:
            out["error"] = self.error
        if self.delay_time_ms is not None:
            out["delayTime"] = self.delay_time_ms
        if self.execution_time_ms is not None:
            out["executionTime"] = self.execution_time_ms
        return out


@dataclass(frozen=True)
class PollSettings:
    """How :meth:`RunPodClient.wait_for_job` polls ``/status``.

    The interval starts at ``initial``, grows by ``factor`` after each unchanged poll
    up to ``maximum``, and drops back to ``initial`` whenever the status or the
    progress output changes.
    """

    initial: float = 1.0
    maximum: float = 10.0
    factor: float = 1.5

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")


# --------------------------------------------------------------------------- client


class RunPodClient:
    """Thin synchronous client; one ``requests.Session`` per client.

    ``timeout`` is the per-request ``(connect, read)`` timeout in seconds. ``sleep`` and
    ``monotonic`` can be replaced in tests.
    """

    def __init__(
        self,
        api_key: ApiKey | str,
        *,
        api_base: str = DEFAULT_API_BASE,
        rest_base: str = DEFAULT_REST_BASE,
        timeout: float | tuple[float, float] = (10.0, 30.0),
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        user_agent: str = "storystudio-backend",
    ) -> None:
        self._key = api_key if isinstance(api_key, ApiKey) else ApiKey(api_key)
        self.api_base = api_base.rstrip("/")
        self.rest_base = rest_base.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.session = session or requests.Session()
        self.sleep = sleep
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.user_agent = user_agent

    def __repr__(self) -> str:
        return f"RunPodClient(api_base={self.api_base!r}, rest_base={self.rest_base!r}, api_key={self._key!r})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RunPodClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP core

    def scrub(self, text: str) -> str:
        """``text`` with this client's API key replaced by ``***``."""
        return scrub(text, self._key)


    def _headers(self, with_body: bool) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._key.reveal()}",
            "Accept": "application/json",
            "User-Agent": self.user_agent,
        }
        if with_body:
            headers["Content-Type"] = "application/json"
        return headers

    @staticmethod
    def _error_detail(resp: requests.Response) -> str:
        text = (resp.text or "").strip()
        try:
            data = resp.json()
        except ValueError:
            data = None
        if isinstance(data, Mapping):
            for key in ("error", "message", "detail"):
                if isinstance(data.get(key), str):
                    text = data[key]
                    break
        text = " ".join(text.split())
        return text[:300] + ("..." if len(text) > 300 else "")

    def request(
        self,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        what: str | None = None,
        duplicate_risk: bool = False,
    ) -> Any:
        """Send one API call with retries; return the decoded JSON body.

        ``duplicate_risk`` marks calls that create something (``/run``): retrying them
        after an ambiguous failure (timeout, 5xx) is logged as a possible duplicate.
        """
        what = what or f"{method} {url}"
        data = None if body is None else encode_body(body)
        policy = self.retry
        last_status: int | None = None
        last_reason = ""
        for attempt in range(1, policy.max_attempts + 1):
            wait_hint: float | None = None
            ambiguous = False
            try:
                resp = self.session.request(
                    method,
                    url,
                    data=data,
                    params=params,
                    headers=self._headers(body is not None),
                    timeout=self.timeout,
                    allow_redirects=False,
                )
            except (requests.Timeout, requests.ConnectionError) as exc:
                last_status = None
                kind = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
                last_reason = f"{kind} ({type(exc).__name__})"
                ambiguous = not _never_sent(exc)
            else:
                status = resp.status_code
                log.debug("%s -> HTTP %s (attempt %d)", what, status, attempt)
                if 200 <= status < 300:
                    return self._decode(resp, what)
                detail = self.scrub(self._error_detail(resp))
                if status in (401, 403):
                    raise AuthError(
                        f"{what}: HTTP {status} (check the RunPod API key and its permissions)"
                        + (f": {detail}" if detail else ""),
                        status=status,
                        attempts=attempt,
                    )
                if not _retryable_status(status):
                    raise RunPodAPIError(
                        f"{what}: HTTP {status}" + (f": {detail}" if detail else ""),
                        status=status,
                        attempts=attempt,
                    )
                last_status = status
                last_reason = f"HTTP {status}" + (f": {detail}" if detail else "")
                wait_hint = parse_retry_after(resp.headers.get("Retry-After"))
                ambiguous = status != 429 and status != 503
            if attempt == policy.max_attempts:
                break
            delay = policy.backoff(attempt, self.rng)
            if wait_hint is not None:
                delay = max(delay, min(wait_hint, policy.retry_after_max))
            if duplicate_risk and ambiguous:
                log.warning(
                    "%s: %s; retrying, which may create a duplicate job if the first "
                    "attempt reached RunPod",
                    what,
                    last_reason,
                )
            else:
                log.info(
                    "%s: %s; retry %d/%d in %.2fs",
                    what,
                    last_reason,
                    attempt,
                    policy.max_attempts - 1,
                    delay,
                )
            self.sleep(delay)
        message = self.scrub(f"{what}: {last_reason} after {policy.max_attempts} attempt(s)")
        if last_status is None:
            raise RequestTimeout(message, attempts=policy.max_attempts)
        raise RunPodAPIError(message, status=last_status, attempts=policy.max_attempts)

    def _decode(self, resp: requests.Response, what: str) -> Any:
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise RunPodAPIError(
                f"{what}: HTTP {resp.status_code} but the body is not JSON",
                status=resp.status_code,
                code="bad_response",
            ) from None

    def _api(self, endpoint_id: str, *parts: str) -> str:
        segs = [quote(_check_id(endpoint_id, "endpoint id"), safe="")]
        segs += [quote(p, safe="") for p in parts]
        return f"{self.api_base}/" + "/".join(segs)

    # ------------------------------------------------------------------ REST: workersMin

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """``GET {rest}/endpoints/{id}`` → the endpoint object."""
        eid = quote(_check_id(endpoint_id, "endpoint id"), safe="")
        data = self.request("GET", f"{self.rest_base}/endpoints/{eid}", what=f"get endpoint {endpoint_id}")
        if not isinstance(data, dict):
            raise RunPodAPIError(f"get endpoint {endpoint_id}: expected an object", code="bad_response")
        return data

    def get_workers_min(self, endpoint_id: str) -> int:
        return _workers_min(self.get_endpoint(endpoint_id), endpoint_id)

    def set_workers_min(self, endpoint_id: str, workers_min: int) -> int:
        """``PATCH {rest}/endpoints/{id}`` with ``{"workersMin": N}``; returns the new value."""
        if isinstance(workers_min, bool) or not isinstance(workers_min, int) or workers_min < 0:
            raise ValueError("workers_min must be an int >= 0")
        eid = quote(_check_id(endpoint_id, "endpoint id"), safe="")
        data = self.request(
            "PATCH",
            f"{self.rest_base}/endpoints/{eid}",
            body={"workersMin": workers_min},
            what=f"set workersMin={workers_min} on endpoint {endpoint_id}",
        )
        if isinstance(data, dict) and "workersMin" in data:
            got = _workers_min(data, endpoint_id)
            if got != workers_min:
                raise RunPodAPIError(
                    f"set workersMin on endpoint {endpoint_id}: asked for {workers_min}, "
                    f"RunPod answered {got}",
                    code="bad_response",
                )
        log.info("endpoint %s: workersMin set to %d", endpoint_id, workers_min)
        return workers_min

    # ------------------------------------------------------------------ serverless API

    def health(self, endpoint_id: str) -> Health:
        data = self.request("GET", self._api(endpoint_id, "health"), what=f"health of {endpoint_id}")
        if not isinstance(data, Mapping):
            raise RunPodAPIError("unexpected /health response", code="bad_response")
        return Health.from_dict(data)

    def wait_for_workers(
        self,
        endpoint_id: str,
        *,
        min_ready: int = 1,
        timeout: float = 600.0,
        poll_interval: float = 5.0,
    ) -> Health:
        """Poll ``/health`` until ``workers.warm >= min_ready``; raise :class:`WorkersNotReady`."""
        if timeout <= 0 or poll_interval <= 0:
            raise ValueError("timeout and poll_interval must be > 0")
        deadline = self.monotonic() + timeout
        last: Health | None = None
        while True:
            last = self.health(endpoint_id)
            w = last.workers
            log.debug(
                "endpoint %s workers: ready=%d idle=%d running=%d initializing=%d "
                "throttled=%d unhealthy=%d",
                endpoint_id, w.ready, w.idle, w.running, w.initializing, w.throttled, w.unhealthy,
            )
            if w.warm >= min_ready:
                return last
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                raise WorkersNotReady(
                    f"endpoint {endpoint_id}: {w.warm} of {min_ready} worker(s) ready after "
                    f"{timeout:g}s (initializing={w.initializing}, throttled={w.throttled}, "
                    f"unhealthy={w.unhealthy})"
                )
            self.sleep(min(poll_interval, remaining))

    def run(
        self,
        endpoint_id: str,
        job_input: Mapping[str, Any],
        *,
        execution_timeout_s: float | None = None,
        ttl_s: float | None = None,
        webhook: str | None = None,
    ) -> JobStatus:
        """``POST /run`` with ``{"input": job_input, "policy"?, "webhook"?}``."""
        body = job_body(job_input, execution_timeout_s, ttl_s, webhook)
        check_body_size(body, "run")
        data = self.request(
            "POST", self._api(endpoint_id, "run"), body=body,
            what=f"submit job to {endpoint_id}", duplicate_risk=True,
        )
        job = _job_status(data, None)
        log.info("endpoint %s: job %s submitted (%s)", endpoint_id, job.id, job.status)
        return job

    def run_sync(
        self,
        endpoint_id: str,
        job_input: Mapping[str, Any],
        *,
        wait_ms: int | None = None,
        execution_timeout_s: float | None = None,
    ) -> JobStatus:
        """``POST /runsync[?wait=ms]``; the answer may still be pending (then poll ``status``)."""
        body = job_body(job_input, execution_timeout_s, None, None)
        check_body_size(body, "runsync")
        params = None
        if wait_ms is not None:
            if not 1000 <= wait_ms <= 300000:
                raise ValueError("wait_ms must be within 1000..300000 (RunPod limit)")
            params = {"wait": int(wait_ms)}
        data = self.request(
            "POST", self._api(endpoint_id, "runsync"), body=body, params=params,
            what=f"run job synchronously on {endpoint_id}", duplicate_risk=True,
        )
        return _job_status(data, None)

    def status(self, endpoint_id: str, job_id: str) -> JobStatus:
        jid = _check_id(job_id, "job id")
        data = self.request("GET", self._api(endpoint_id, "status", jid), what=f"status of job {jid}")
        return _job_status(data, jid)

    def stream(self, endpoint_id: str, job_id: str) -> tuple[str, list[Any]]:
        """``GET /stream/{job_id}`` → ``(status, [chunk outputs])`` (for generator handlers)."""
        jid = _check_id(job_id, "job id")
        data = self.request("GET", self._api(endpoint_id, "stream", jid), what=f"stream of job {jid}")
        if not isinstance(data, Mapping) or not isinstance(data.get("status"), str):
            raise RunPodAPIError("unexpected /stream response", code="bad_response")
        chunks = data.get("stream") or []
        if not isinstance(chunks, list):
            raise RunPodAPIError("unexpected /stream response: 'stream' is not a list", code="bad_response")
        return data["status"], [c.get("output") if isinstance(c, Mapping) else c for c in chunks]

    def iter_stream(
        self, endpoint_id: str, job_id: str, *, poll_interval: float = 1.0, timeout: float = 3600.0
    ) -> Iterator[Any]:
        """Yield streamed outputs until the job is final (bounded by ``timeout``)."""
        deadline = self.monotonic() + timeout
        while True:
            status, chunks = self.stream(endpoint_id, job_id)
            yield from chunks
            if status in TERMINAL_STATUSES and not chunks:
                return
            if self.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id}: stream not finished after {timeout:g}s", job_id=job_id)
            self.sleep(poll_interval)

    def cancel(self, endpoint_id: str, job_id: str) -> JobStatus:
        jid = _check_id(job_id, "job id")
        data = self.request("POST", self._api(endpoint_id, "cancel", jid), what=f"cancel job {jid}")
        job = _job_status(data, jid)
        log.info("endpoint %s: job %s cancel requested (%s)", endpoint_id, jid, job.status)
        return job

    def wait_for_job(
        self,
        endpoint_id: str,
        job_id: str,
        *,
        timeout: float,
        poll: PollSettings | None = None,
        on_update: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Poll ``/status`` until the job is final; raise :class:`JobTimeout` after ``timeout`` s.

        ``on_update`` gets every answer (progress arrives as ``output`` while
        ``IN_PROGRESS``). Unknown statuses are treated as still pending.
        """
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        poll = poll or PollSettings()
        deadline = self.monotonic() + timeout
        interval = poll.initial
        previous: tuple[str, str] | None = None
        while True:
            job = self.status(endpoint_id, job_id)
            if on_update is not None:
                on_update(job)
            if job.done:
                return job
            if job.status not in PENDING_STATUSES:
                log.warning("job %s: unknown status %r, still waiting", job_id, job.status)
            marker = (job.status, _fingerprint(job.output))
            if marker != previous:
                interval = poll.initial
                previous = marker
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                raise JobTimeout(
                    f"job {job_id} still {job.status} after {timeout:g}s",
                    job_id=job_id,
                    status=job.status,
                )
            self.sleep(min(interval, remaining))
            interval = min(poll.maximum, interval * poll.factor)


# --------------------------------------------------------------------------- helpers


def _never_sent(exc: BaseException) -> bool:
    """True when the request cannot have reached the server (connect timeout/refused)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    # urllib3's NewConnectionError (refused, DNS failure), looked up by name so that
    # urllib3 need not be imported directly
    return any(type(e).__name__ in ("NewConnectionError", "NameResolutionError")
               for e in (reason, exc.args[0] if exc.args else None) if e is not None)


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip() or "/" in value:
        raise BackendError(f"invalid {what}: {value!r}", code="invalid_argument")
    return value


def _workers_min(data: Mapping[str, Any], endpoint_id: str) -> int:
    value = data.get("workersMin")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RunPodAPIError(
            f"endpoint {endpoint_id}: response has no integer 'workersMin'", code="bad_response"
        )
    return value


def _job_status(data: Any, job_id: str | None) -> JobStatus:
    if not isinstance(data, Mapping):
        raise RunPodAPIError("unexpected job response: not an object", code="bad_response")
    return JobStatus.from_dict(data, job_id=job_id)


def encode_body(body: Mapping[str, Any]) -> str:
    """The exact JSON text :meth:`RunPodClient.request` sends for ``body``."""
    return json.dumps(body, separators=(",", ":"))


def body_size(body: Mapping[str, Any]) -> int:
    """Size in bytes of ``body`` as sent (UTF-8 of :func:`encode_body`)."""
    return len(encode_body(body).encode("utf-8"))


def check_body_size(body: Mapping[str, Any], route: str, *, extra: int = 0, hint: str = "") -> int:
    """Return the body's size (plus ``extra`` bytes still to be filled in), or raise
    :class:`PayloadTooLarge` when it is over the route's limit (:data:`PAYLOAD_LIMITS`).
    ``hint`` is appended to the message."""
    limit = PAYLOAD_LIMITS[route]
    size = body_size(body) + extra
    if size > limit:
        raise PayloadTooLarge(
            f"the /{route} request body would be {size:,} bytes ({size / 1e6:.1f} MB), over RunPod's "
            f"limit of {limit:,} bytes ({limit / 1e6:g} MB) for /{route}" + (f"; {hint}" if hint else ""),
            size=size,
            limit=limit,
            route=route,
        )
    return size


def job_body(
    job_input: Mapping[str, Any],
    execution_timeout_s: float | None = None,
    ttl_s: float | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    """The ``/run`` / ``/runsync`` request body: ``{"input", "policy"?, "webhook"?}``."""
    if not isinstance(job_input, Mapping):
        raise TypeError("job_input must be a mapping (it becomes the job's 'input')")
    body: dict[str, Any] = {"input": dict(job_input)}
    policy: dict[str, Any] = {}
    if execution_timeout_s is not None:
        ms = int(execution_timeout_s * 1000)
        if ms <= 5000:
            raise ValueError("execution timeout must be > 5 s (RunPod policy constraint)")
        policy["executionTimeout"] = ms
    if ttl_s is not None:
        ms = int(ttl_s * 1000)
        if not 10_000 <= ms <= 7 * 24 * 3600 * 1000:
            raise ValueError("ttl must be within 10 s .. 1 week (RunPod policy constraint)")
        policy["ttl"] = ms
    if policy:
        body["policy"] = policy
    if webhook is not None:
        body["webhook"] = webhook
    return body


def _fingerprint(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)
