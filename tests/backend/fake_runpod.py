"""A strict local stand-in for the RunPod APIs, for the backend client tests.

One threaded ``http.server`` on 127.0.0.1 serves both APIs:

* ``/v1/endpoints/{id}`` — REST management API: GET (query ``includeTemplate``,
  ``includeWorkers``) and PATCH with an ``EndpointUpdateInput`` body.
* ``/v2/{endpoint_id}/{run,runsync,status/{job},stream/{job},cancel/{job},health}`` —
  the serverless job API.

It rejects what RunPod would reject, so a passing client test also proves the client
sends the documented shapes: missing/wrong ``Authorization: Bearer <key>`` → 401, wrong
method → 405, unknown path/endpoint/job → 404, body on GET, non-JSON or wrong JSON shape,
wrong ``Content-Type``, unknown keys/query parameters, out-of-range values → 400.

Jobs are driven by ``/status`` polls, not by wall time, so tests are deterministic: a
:class:`JobPlan` says how many polls a job stays ``IN_QUEUE``, which progress outputs it
reports while ``IN_PROGRESS`` (one per poll) and how it ends. The "worker" validates the
``batch`` input with the real ``storystudio.tasks.parse_job_input``, answers in
``run_batch``'s output shape, and reports it the way the runpod SDK reports
handler results (a handler's top-level ``error`` key becomes the job's ``error`` and the
job is ``FAILED``).

Real workers (:meth:`FakeRunPod.start_workers`): instead of plans, K worker threads take
queued jobs in order and run a real handler (``Worker.handle`` on the tiny checkpoints),
its progress updates becoming the job's ``output`` while ``IN_PROGRESS``, as the runpod
SDK reports them. Every run is recorded (:attr:`FakeRunPod.executions`: worker, start,
end) so tests can see concurrency. :meth:`FakeRunPod.kill_when` kills the worker that
runs a matching job at its first progress update (a ``BaseException`` unwinds the
handler, like SIGKILL would end it): the job becomes ``FAILED`` as RunPod reports a
worker that exited, or vanishes (``404``), or ``TIMED_OUT``; a fresh worker replaces it.

Request size: bodies over RunPod's documented limits (10 MB for ``/run``, 20 MB for
``/runsync``) are refused with 413.

Failure injection: :meth:`FakeRunPod.add_fault` makes matching requests answer with a
status (e.g. a 503 burst, 429 + ``Retry-After``) or stall for ``delay`` seconds (client
timeout), optionally after applying the request (``apply=True``: the PATCH lands but
the answer comes too late).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from storystudio.backend.client import PAYLOAD_LIMITS
from storystudio.errors import StoryStudioError
from storystudio.tasks import BatchTask, parse_job_input

ENDPOINT_UPDATE_KEYS = {
    "allowedCudaVersions", "cpuFlavorIds", "dataCenterIds", "executionTimeoutMs", "flashboot",
    "gpuCount", "gpuTypeIds", "idleTimeout", "name", "networkVolumeId", "networkVolumeIds",
    "scalerType", "scalerValue", "templateId", "vcpuCount", "workersMax", "workersMin",
}
RUN_BODY_KEYS = {"input", "webhook", "policy", "s3Config"}
POLICY_KEYS = {"executionTimeout", "lowPriority", "ttl"}



class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Fault:
    method: str
    path: str  # regex, full match against the path (no query)
    status: int = 503
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    delay: float = 0.0
    apply: bool = False  # handle normally, then delay the (normal) answer
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and method == self.method and re.fullmatch(self.path, path) is not None


@dataclass
class JobPlan:
    queue_polls: int = 1
    # what storystudio.progress.ProgressReporter sends (one update per /status poll)
    progress: list[Any] = field(default_factory=lambda: [
        {"stage": "images", "done": 0, "total": 2, "elapsed_s": 0.0},
        {"stage": "swap", "to": "video", "elapsed_s": 2.1},
        {"stage": "video_clips", "done": 1, "total": 2, "scene_id": "s1", "elapsed_s": 9.4},
        {"stage": "videos", "done": 1, "total": 2, "scene_id": "s1", "ok": True, "elapsed_s": 20.0},
    ])
    final: str = "COMPLETED"  # COMPLETED | FAILED | TIMED_OUT | NEVER
    output: Any = None  # None: computed by the fake worker from the input
    error: Any = None  # for final == FAILED without a handler error
    scene_errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    stream: list[Any] = field(default_factory=list)


@dataclass
class Job:
    id: str
    endpoint_id: str
    body: dict[str, Any]
    plan: JobPlan
    status: str = "IN_QUEUE"
    polls: int = 0
    output: Any = None
    error: Any = None
    stream: list[Any] = field(default_factory=list)
    by_workers: bool = False  # run by a real worker thread, not by a plan


class WorkerKilled(BaseException):
    """Raised inside a fake worker's handler (from its progress sink) to end it abruptly.

    A BaseException: the worker code catches ``Exception`` only, so nothing in it can
    turn this into a job result, just as nothing survives a SIGKILL.
    """


@dataclass
class Execution:
    """One job run by one fake worker."""

    job_id: str
    worker: str
    task: str | None
    start: float
    end: float | None = None
    outcome: str | None = None  # final status, or "killed"


@dataclass
class KillRule:
    match: Callable[[dict[str, Any]], bool]  # on the job's input
    mode: str = "failed"  # failed | lost | timed_out
    times: int = 1


KILL_MODES = ("failed", "lost", "timed_out")


def _worker_output(inp: Any, plan: JobPlan, job_id: str) -> dict[str, Any]:
    """What ``Worker.handle`` returns for this input: the real schema validation
    (``storystudio.tasks.parse_job_input``) and ``run_batch``'s output shape, with
    made-up URLs instead of rendering."""
    try:
        task = parse_job_input(inp)
    except StoryStudioError as exc:
        return {**exc.to_result(), "job_id": job_id}
    if not isinstance(task, BatchTask):
        return {"error": "unsupported_task: the fake worker only runs batches", "code": "unsupported_task",
                "job_id": job_id}
    out_scenes = []
    for i, sc in enumerate(task.scenes):
        sid = sc.scene_id
        seed = sc.seed if sc.seed is not None else (task.seed + i if task.seed is not None else 1000 + i)
        item: dict[str, Any] = {"scene_id": sid}
        if sc.image:
            item["image_source"] = "input"
        else:
            item.update(image_source="generated", image_url=f"https://cdn.example/{task.project_id}/{sid}.png",
                        image_key=f"storystudio/{task.project_id}/{job_id}/{sid}/image.png", image_seed=seed,
                        image_timings={"generate": 0.9})
        if sid in plan.scene_errors:
            msg, code = plan.scene_errors[sid]
            item["error"] = {"error": f"{code}: {msg}", "code": code, "stage": "audio"}
        else:
            item.update(video_url=f"https://cdn.example/{task.project_id}/{sid}.mp4",
                        video_key=f"storystudio/{task.project_id}/{job_id}/{sid}/video.mp4",
                        width=832, height=480, frames=96, fps=16, duration_s=6.0, num_clips=2,
                        video_seed=seed)
        out_scenes.append(item)
    failed = sum(1 for r in out_scenes if "error" in r)
    return {
        "project_id": task.project_id, "scenes": out_scenes,
        "scenes_ok": len(out_scenes) - failed, "scenes_failed": failed,
        "images_time": 1.5, "swap_time": 2.0, "video_load_time": 0.0, "videos_time": 30.25,
        "total_time": 34.0, "job_id": job_id, "task": "batch",
        "manager": {"swaps": 1, "resident": ["video"]},
    }


def _sdk_result(handler_return: Any) -> tuple[str, Any, Any]:
    """(status, output, error) the way runpod's ``rp_job.run_job`` reports a handler return."""
    if isinstance(handler_return, dict):
        out = dict(handler_return)
        err = out.pop("error", None)
        if err:
            return "FAILED", (out or None), err
        return "COMPLETED", out, None
    return "COMPLETED", handler_return, None


class FakeRunPod:
    def __init__(self, api_key: str, *, endpoint_id: str = "ep-test1", workers_min: int = 0,
                 workers_max: int = 3) -> None:
        self.api_key = api_key
        self.lock = threading.RLock()
        self.endpoints: dict[str, dict[str, Any]] = {
            endpoint_id: {
                "id": endpoint_id, "name": "story-studio", "workersMin": workers_min,
                "workersMax": workers_max, "idleTimeout": 5, "scalerType": "QUEUE_DELAY",
                "scalerValue": 4, "gpuCount": 1, "gpuTypeIds": ["NVIDIA H100 80GB HBM3"],
                "executionTimeoutMs": 600000, "templateId": "tmpl123", "version": 0,
            }
        }
        self.jobs: dict[str, Job] = {}
        self.requests: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.plans: list[JobPlan] = []
        self.default_plan = JobPlan()
        self.workers_min_history: dict[str, list[int]] = {endpoint_id: []}
        self.health_ready_after = 2  # /health polls after workersMin goes up until ready
        self.health_never_ready = False
        self._warmup: dict[str, int] = {}
        self.on_request: Callable[[dict[str, Any]], None] | None = None
        # real workers (start_workers)
        self.executions: list[Execution] = []
        self.kill_rules: list[KillRule] = []
        self._handler_factory: Callable[[Callable[[dict[str, Any], Any], None]], Callable] | None = None
        self._work = threading.Condition(self.lock)
        self._stopping = False
        self._worker_threads: list[threading.Thread] = []
        self._worker_names = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeRunPod:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # headers and body go out in two writes: without this, Nagle + delayed
                # ACK add ~40 ms to every request
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _go(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _go

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()
        for t in self._worker_threads:
            t.join(timeout=60)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeRunPod:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/v2"

    @property
    def rest_base(self) -> str:
        return f"{self.url}/v1"

    # ------------------------------------------------------------------ real workers

    def start_workers(self, handler_factory: Callable[[Callable[[dict[str, Any], Any], None]], Callable],
                      count: int) -> None:
        """Start ``count`` worker threads; ``handler_factory(sink)`` builds one worker's
        ``handle(job) -> result`` (e.g. ``Worker.from_settings(settings, sink=sink).handle``).
        From now on every submitted job is run by these workers."""
        self._handler_factory = handler_factory
        for _ in range(count):
            self._spawn_worker()

    def kill_when(self, match: Callable[[dict[str, Any]], bool], mode: str = "failed", times: int = 1) -> KillRule:
        """Kill the worker running the next job whose input satisfies ``match``."""
        if mode not in KILL_MODES:
            raise ValueError(mode)
        rule = KillRule(match, mode, times)
        with self.lock:
            self.kill_rules.append(rule)
        return rule

    def _spawn_worker(self) -> None:
        name = f"worker-{next(self._worker_names)}"
        t = threading.Thread(target=self._worker_loop, args=(name,), name=name, daemon=True)
        self._worker_threads.append(t)
        t.start()

    def _take(self) -> Job | None:
        with self._work:
            while True:
                if self._stopping:
                    return None
                job = next((j for j in self.jobs.values() if j.by_workers and j.status == "IN_QUEUE"), None)
                if job is not None:
                    job.status = "IN_PROGRESS"
                    return job
                self._work.wait(timeout=0.5)

    def _worker_loop(self, name: str) -> None:
        assert self._handler_factory is not None
        current: dict[str, Job] = {}

        def sink(job_dict: dict[str, Any], event: Any) -> None:
            job = current.get("job")
            if job is None:
                return
            with self.lock:
                rule = next((r for r in self.kill_rules if r.times > 0 and r.match(job.body["input"])), None)
                if rule is not None:
                    rule.times -= 1
                    raise WorkerKilled(rule.mode)
                if job.status == "IN_PROGRESS":
                    job.output = copy.deepcopy(event)

        handle = self._handler_factory(sink)
        while True:
            job = self._take()
            if job is None:
                return
            current["job"] = job
            run = Execution(job.id, name, job.body["input"].get("task"), time.monotonic())
            with self.lock:
                self.executions.append(run)
            try:
                result = handle({"id": job.id, "input": copy.deepcopy(job.body["input"])})
            except WorkerKilled as killed:
                with self.lock:
                    run.end, run.outcome = time.monotonic(), "killed"
                    mode = killed.args[0]
                    if mode == "lost":
                        self.jobs.pop(job.id, None)
                    elif mode == "timed_out":
                        job.status, job.output, job.error = "TIMED_OUT", None, None
                    else:
                        job.status, job.output = "FAILED", None
                        job.error = "worker exited unexpectedly (exit code 137)"
                self._spawn_worker()  # RunPod replaces a dead worker
                return
            with self.lock:
                run.end = time.monotonic()
                if job.status == "IN_PROGRESS":  # not cancelled meanwhile
                    job.status, job.output, job.error = _sdk_result(copy.deepcopy(result))
                run.outcome = job.status
            current.pop("job", None)

    # ------------------------------------------------------------------ test helpers

    def add_fault(self, method: str, path: str, status: int = 503, *, times: int = 1,
                  headers: dict[str, str] | None = None, body: Any = None, delay: float = 0.0,
                  apply: bool = False) -> Fault:
        fault = Fault(method, path, status, times, dict(headers or {}), body, delay, apply)
        with self.lock:
            self.faults.append(fault)
        return fault

    def queue_plan(self, plan: JobPlan) -> None:
        with self.lock:
            self.plans.append(plan)

    def workers_min(self, endpoint_id: str = "ep-test1") -> int:
        with self.lock:
            return self.endpoints[endpoint_id]["workersMin"]

    def set_workers_min(self, value: int, endpoint_id: str = "ep-test1") -> None:
        with self.lock:
            self.endpoints[endpoint_id]["workersMin"] = value

    def calls(self, method: str | None = None, pattern: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r["method"] == method)
                    and (pattern is None or re.fullmatch(pattern, r["path"]))]

    def job_statuses(self) -> dict[str, str]:
        with self.lock:
            return {j.id: j.status for j in self.jobs.values()}

    # ------------------------------------------------------------------ HTTP

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: Any,
              headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        try:
            h.send_response(status)
            if data:
                h.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
            pass

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        record = {
            "method": h.command, "path": path, "query": query, "raw": raw,
            "content_type": h.headers.get("Content-Type"),
            "auth_ok": h.headers.get("Authorization") == f"Bearer {self.api_key}",
            "t": time.monotonic(),
        }
        with self.lock:
            self.requests.append(record)
            fault = next((f for f in self.faults if f.matches(h.command, path)), None)
            if fault is not None:
                fault.times -= 1
                fault.hits += 1
        if self.on_request is not None:
            self.on_request(record)
        if fault is not None and not fault.apply:
            if fault.delay:
                time.sleep(fault.delay)
            self._send(h, fault.status, fault.body if fault.body is not None else {"error": "injected fault"},
                       fault.headers)
            return
        try:
            status, body = self._route(h, path, query, raw, record)
        except BadRequest as exc:
            status, body = exc.status, {"error": exc.message}
        record["status"] = status
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        self._send(h, status, body)

    def _json_body(self, record: dict[str, Any], raw: bytes) -> Any:
        ctype = (record["content_type"] or "").split(";")[0].strip()
        if ctype != "application/json":
            raise BadRequest(400, f"Content-Type must be application/json, got {ctype!r}")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "body is not valid JSON") from None

    def _route(self, h: BaseHTTPRequestHandler, path: str, query: dict[str, list[str]],
               raw: bytes, record: dict[str, Any]) -> tuple[int, Any]:
        if not record["auth_ok"]:
            return 401, {"error": "Unauthorized"}
        method = h.command
        if method == "GET" and raw:
            raise BadRequest(400, "GET must not have a body")

        m = re.fullmatch(r"/v1/endpoints/([^/]+)", path)
        if m:
            return self._rest_endpoint(method, m.group(1), query, raw, record)

        m = re.fullmatch(r"/v2/([^/]+)/(run|runsync|health)", path)
        if m:
            eid, op = m.groups()
            if eid not in self.endpoints:
                return 404, {"error": "endpoint not found"}
            if op == "health":
                self._only(method, "GET")
                self._no_query(query)
                return 200, self._health(eid)
            self._only(method, "POST")
            return self._submit(eid, op, query, self._json_body(record, raw), len(raw))

        m = re.fullmatch(r"/v2/([^/]+)/(status|stream|cancel)/([^/]+)", path)
        if m:
            eid, op, jid = m.groups()
            if eid not in self.endpoints:
                return 404, {"error": "endpoint not found"}
            self._only(method, "POST" if op == "cancel" else "GET")
            if op == "cancel" and raw:
                raise BadRequest(400, "cancel takes no body")
            allowed_query = {"ttl"} if op == "status" else set()
            if set(query) - allowed_query:
                raise BadRequest(400, f"unknown query parameters {sorted(set(query) - allowed_query)}")
            with self.lock:
                job = self.jobs.get(jid)
                if job is None or job.endpoint_id != eid:
                    return 404, {"error": "job not found"}
                if op == "status":
                    self._advance(job)
                    return 200, self._job_view(job)
                if op == "stream":
                    self._advance(job)
                    chunks, job.stream = job.stream, []
                    return 200, {"status": job.status, "stream": [{"output": c} for c in chunks]}
                if job.status not in ("COMPLETED", "FAILED", "TIMED_OUT"):
                    job.status = "CANCELLED"
                return 200, {"id": job.id, "status": job.status}
        return 404, {"error": f"no route for {path}"}

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method != allowed:
            raise BadRequest(405, f"method {method} not allowed (use {allowed})")

    @staticmethod
    def _no_query(query: dict[str, list[str]]) -> None:
        if query:
            raise BadRequest(400, f"unexpected query parameters {sorted(query)}")

    # ------------------------------------------------------------------ REST

    def _rest_endpoint(self, method: str, eid: str, query: dict[str, list[str]], raw: bytes,
                       record: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            ep = self.endpoints.get(eid)
            if ep is None:
                return 404, {"error": "endpoint not found"}
            if method == "GET":
                if set(query) - {"includeTemplate", "includeWorkers"}:
                    raise BadRequest(400, "unknown query parameters")
                for values in query.values():
                    if values not in (["true"], ["false"]):
                        raise BadRequest(400, "boolean query parameters must be true/false")
                return 200, copy.deepcopy(ep)
            if method != "PATCH":
                raise BadRequest(405, f"method {method} not allowed on /endpoints/{{id}}")
            self._no_query(query)
            body = self._json_body(record, raw)
            if not isinstance(body, dict) or not body:
                raise BadRequest(400, "body must be a non-empty EndpointUpdateInput object")
            unknown = set(body) - ENDPOINT_UPDATE_KEYS
            if unknown:
                raise BadRequest(400, f"unknown fields {sorted(unknown)}")
            if "workersMin" in body:
                n = body["workersMin"]
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise BadRequest(400, "workersMin must be an integer >= 0")
                if n > body.get("workersMax", ep["workersMax"]):
                    raise BadRequest(400, "workersMin must be <= workersMax")
                if n > ep["workersMin"]:
                    self._warmup[eid] = self.health_ready_after
                ep["workersMin"] = n
                self.workers_min_history.setdefault(eid, []).append(n)
            for k, v in body.items():
                if k != "workersMin":
                    ep[k] = v
            ep["version"] += 1
            return 200, copy.deepcopy(ep)

    # ------------------------------------------------------------------ jobs

    def _submit(self, eid: str, op: str, query: dict[str, list[str]], body: Any, size: int) -> tuple[int, Any]:
        if op == "run":
            self._no_query(query)
        else:
            if set(query) - {"wait"}:
                raise BadRequest(400, "unknown query parameters")
            if "wait" in query:
                try:
                    wait = int(query["wait"][0])
                except ValueError:
                    raise BadRequest(400, "wait must be an integer") from None
                if not 1000 <= wait <= 300000:
                    raise BadRequest(400, "wait must be within 1000..300000")
        if not isinstance(body, dict):
            raise BadRequest(400, "body must be a JSON object")
        if size > PAYLOAD_LIMITS[op]:
            raise BadRequest(413, f"request body of {size} bytes is over the /{op} limit")
        if "input" not in body or not isinstance(body["input"], dict):
            raise BadRequest(400, "body must have an 'input' object")
        if set(body) - RUN_BODY_KEYS:
            raise BadRequest(400, f"unknown top-level keys {sorted(set(body) - RUN_BODY_KEYS)}")
        policy = body.get("policy")
        if policy is not None:
            if not isinstance(policy, dict) or set(policy) - POLICY_KEYS:
                raise BadRequest(400, "bad policy")
            et = policy.get("executionTimeout")
            if et is not None and (isinstance(et, bool) or not isinstance(et, int) or et <= 5000):
                raise BadRequest(400, "policy.executionTimeout must be an integer > 5000 (ms)")
            ttl = policy.get("ttl")
            if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int)
                                    or not 10_000 <= ttl <= 7 * 24 * 3600 * 1000):
                raise BadRequest(400, "policy.ttl out of range")
        if "webhook" in body and not isinstance(body["webhook"], str):
            raise BadRequest(400, "webhook must be a string")
        with self.lock:
            plan = self.plans.pop(0) if self.plans else copy.deepcopy(self.default_plan)
            prefix = "sync-" if op == "runsync" else ""
            job = Job(id=f"{prefix}{uuid.uuid4()}-u{next(self._counter)}", endpoint_id=eid,
                      body=body, plan=plan, stream=list(plan.stream),
                      by_workers=self._handler_factory is not None)
            self.jobs[job.id] = job
            if job.by_workers:
                if op == "runsync":
                    raise BadRequest(400, "the fake's real workers serve /run only")
                self._work.notify_all()
                return 200, {"id": job.id, "status": job.status}
            if op == "runsync" and plan.final != "NEVER":
                self._finish(job)
                return 200, self._job_view(job)
            return 200, {"id": job.id, "status": job.status}

    def _advance(self, job: Job) -> None:
        if job.by_workers or job.status in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
            return
        job.polls += 1
        plan = job.plan
        if job.polls <= plan.queue_polls:
            job.status = "IN_QUEUE"
            return
        idx = job.polls - plan.queue_polls - 1
        if idx < len(plan.progress) or plan.final == "NEVER":
            job.status = "IN_PROGRESS"
            if plan.progress:
                job.output = plan.progress[min(idx, len(plan.progress) - 1)]
            return
        self._finish(job)

    def _finish(self, job: Job) -> None:
        plan = job.plan
        if plan.final == "TIMED_OUT":
            job.status, job.output, job.error = "TIMED_OUT", None, None
            return
        if plan.final == "FAILED":
            job.status, job.output, job.error = "FAILED", plan.output, plan.error
            return
        handler_return = plan.output if plan.output is not None else _worker_output(job.body["input"], plan, job.id)
        job.status, job.output, job.error = _sdk_result(copy.deepcopy(handler_return))

    def _job_view(self, job: Job) -> dict[str, Any]:
        view: dict[str, Any] = {"id": job.id, "status": job.status}
        if job.status != "IN_QUEUE":
            view["delayTime"] = 120
        if job.status in ("COMPLETED", "FAILED"):
            view["executionTime"] = 3400
        if job.output is not None:
            view["output"] = job.output
        if job.error is not None:
            view["error"] = job.error
        return view

    def _health(self, eid: str) -> dict[str, Any]:
        with self.lock:
            ep = self.endpoints[eid]
            running = sum(1 for j in self.jobs.values() if j.endpoint_id == eid and j.status == "IN_PROGRESS")
            queued = sum(1 for j in self.jobs.values() if j.endpoint_id == eid and j.status == "IN_QUEUE")
            done = sum(1 for j in self.jobs.values() if j.endpoint_id == eid and j.status == "COMPLETED")
            failed = sum(1 for j in self.jobs.values() if j.endpoint_id == eid and j.status == "FAILED")
            n = ep["workersMin"]
            workers = {"idle": 0, "initializing": 0, "ready": 0, "running": 0, "throttled": 0, "unhealthy": 0}
            if self.health_never_ready and n:
                workers["throttled"] = n
            elif n:
                left = self._warmup.get(eid, 0)
                if left > 0:
                    self._warmup[eid] = left - 1
                    workers["initializing"] = n
                else:
                    workers["running"] = min(n, running)
                    workers["idle"] = n - workers["running"]
                    workers["ready"] = workers["idle"]
            return {"jobs": {"completed": done, "failed": failed, "inProgress": running,
                             "inQueue": queued, "retried": 0}, "workers": workers}
