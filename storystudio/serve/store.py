"""The job table: every job the service accepted, in an embedded SQLite database.

One row per job holds its status (``queued`` → ``running`` → ``completed`` | ``failed``),
its settings with every media payload replaced by a hash, the inputs' hashes, the
worker's result (or error) and its times (wall clock, seconds since the epoch). Media
bytes are never stored: the database stays small and holds no user content beyond
prompts.

Durability: the database runs in WAL mode; every state change is its own committed
transaction, and a committed transaction survives the process being killed
(``SIGKILL``, OOM killer) — ``synchronous=NORMAL`` only risks the last transactions on
a power loss. After a restart, finished jobs answer as before, and jobs that were
``queued`` or ``running`` are marked ``failed`` with code ``server_restarted``
(:meth:`JobStore.recover`): they are not re-run, because their uploaded media lived in
memory only, and because a job that was running when the process died may be what
killed it — re-running it at start-up could crash the service in a loop. The caller
submits again.

One service owns a database: an exclusive ``flock`` on ``<db>.lock`` stops a second
process from "recovering" the first one's running jobs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from storystudio.serve.errors import SERVER_RESTARTED

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "completed", "failed"]
UNFINISHED: tuple[Status, ...] = ("queued", "running")
SCHEMA_VERSION = 1
MEDIA_KEYS = frozenset({"image", "audio", "pose_video", "image_url", "audio_url", "pose_video_url"})
LONG_TEXT = 4096  # any longer string (inline media under another name) is stored as its hash only

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order = queue order
    id           TEXT NOT NULL UNIQUE,
    api          TEXT NOT NULL,      -- the endpoint that took it: jobs, generate-video, speech-to-video
    task         TEXT NOT NULL,      -- image, video or batch
    api_key      TEXT NOT NULL,      -- the key's label (STORYSTUDIO_API_KEYS#1), never the key
    status       TEXT NOT NULL,
    params       TEXT NOT NULL,      -- JSON: the job input, media replaced by their sha256
    input_hashes TEXT NOT NULL,      -- JSON: field -> {"sha256", "bytes", "of"}
    meta         TEXT NOT NULL,      -- JSON: what the endpoint echoes back (e.g. the requested resolution)
    result       TEXT,               -- JSON: the worker's result or {"error", "code"}
    error_code   TEXT,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class TooManyJobs(Exception):
    """The key already has ``limit`` unfinished jobs."""

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(f"too_many_jobs: this API key already has {limit} unfinished job(s), the limit; "
                         "wait for one to finish")
        self.key = key
        self.limit = limit


class DatabaseBusy(Exception):
    """Another process holds the job database."""


@dataclass(frozen=True)
class JobRecord:
    seq: int
    id: str
    api: str
    task: str
    api_key: str
    status: Status
    params: dict[str, Any]
    input_hashes: dict[str, Any]
    meta: dict[str, Any]
    result: dict[str, Any] | None
    error_code: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        return cls(
            seq=row["seq"], id=row["id"], api=row["api"], task=row["task"], api_key=row["api_key"],
            status=row["status"], params=json.loads(row["params"]), input_hashes=json.loads(row["input_hashes"]),
            meta=json.loads(row["meta"]), result=None if row["result"] is None else json.loads(row["result"]),
            error_code=row["error_code"], created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"],
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_input(job_input: Mapping[str, Any], files: Mapping[str, bytes] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, input_hashes)`` for the job table.

    ``params`` is ``job_input`` with every media field (and any string longer than
    :data:`LONG_TEXT`) replaced by ``"sha256:<hex>"``. ``input_hashes`` maps each such
    field's path (``audio``, ``scenes.1.audio``) to ``{"sha256", "bytes", "of"}``:
    ``of`` is ``"file"`` when the hash is over the bytes of an uploaded or server-side
    file (``files``, keyed by field), else ``"value"`` (the field's text: a URL, data
    URI or base64 as sent). ``input_hashes["input"]`` hashes ``params`` itself, so two
    identical requests share it.
    """
    files = files or {}
    hashes: dict[str, Any] = {}

    def walk(value: Any, path: str, key: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else k, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}", key) for i, v in enumerate(value)]
        if isinstance(value, str) and (key in MEDIA_KEYS or len(value) > LONG_TEXT):
            if path in files:
                data, of = files[path], "file"
            else:
                data, of = value.encode("utf-8", "surrogatepass"), "value"
            digest = _sha256(data)
            hashes[path] = {"sha256": digest, "bytes": len(data), "of": of}
            return f"sha256:{digest}"
        return value

    params = walk(dict(job_input), "", "")
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
    hashes["input"] = {"sha256": _sha256(canonical), "bytes": len(canonical), "of": "params"}
    return params, hashes


class JobStore:
    """Thread-safe access to the job table (one connection, one lock; every call is short)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(f"{self.path}.lock", "a+")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise DatabaseBusy(f"another storystudio serve process is using {self.path}") from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path} has job table version {version}; this service knows {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_file.close()

    # ------------------------------------------------------------------ writes
    def add(self, *, job_id: str, api: str, task: str, api_key: str, params: dict[str, Any],
            input_hashes: dict[str, Any], meta: dict[str, Any], now: float, max_unfinished: int) -> JobRecord:
        """Insert a queued job, unless ``api_key`` already has ``max_unfinished`` unfinished ones."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (open_jobs,) = self._db.execute(
                    "SELECT count(*) FROM jobs WHERE api_key = ? AND status IN (?, ?)", (api_key, *UNFINISHED)
                ).fetchone()
                if open_jobs >= max_unfinished:
                    raise TooManyJobs(api_key, max_unfinished)
                self._db.execute(
                    "INSERT INTO jobs (id, api, task, api_key, status, params, input_hashes, meta, created_at) "
                    "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (job_id, api, task, api_key, json.dumps(params), json.dumps(input_hashes), json.dumps(meta), now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._get(job_id)  # type: ignore[return-value]

    def mark_running(self, job_id: str, now: float) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'running', started_at = ? WHERE id = ?", (now, job_id))

    def finish(self, job_id: str, result: dict[str, Any], now: float) -> JobRecord:
        """Store the worker's result; ``failed`` when it carries an ``error``."""
        failed = "error" in result
        code = str(result.get("code") or "internal_error") if failed else None
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, result = ?, error_code = ?, finished_at = ? WHERE id = ?",
                ("failed" if failed else "completed", json.dumps(result, default=str), code, now, job_id),
            )
            return self._get(job_id)  # type: ignore[return-value]

    def recover(self, now: float) -> list[str]:
        """Fail every job a previous process left queued or running (see the module docstring)."""
        message = ("the service restarted before this job finished; its uploaded inputs are gone, "
                   "submit it again")
        result = json.dumps({"error": f"{SERVER_RESTARTED}: {message}", "code": SERVER_RESTARTED})
        with self._lock:
            ids = [r["id"] for r in self._db.execute(
                "SELECT id FROM jobs WHERE status IN (?, ?) ORDER BY seq", UNFINISHED)]
            self._db.execute(
                "UPDATE jobs SET status = 'failed', result = ?, error_code = ?, finished_at = ? "
                "WHERE status IN (?, ?)", (result, SERVER_RESTARTED, now, *UNFINISHED))
        if ids:
            log.warning("marked %d job(s) left unfinished by the previous process as failed (%s): %s",
                        len(ids), SERVER_RESTARTED, ", ".join(ids))
        return ids

    # ------------------------------------------------------------------ reads
    def _get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.from_row(row)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._get(job_id)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT status, count(*) AS n FROM jobs WHERE status IN (?, ?) GROUP BY status", UNFINISHED)
            found = {r["status"]: r["n"] for r in rows}
        return {s: found.get(s, 0) for s in UNFINISHED}

    def ahead_of(self, job: JobRecord) -> int:
        """Unfinished jobs submitted before ``job`` (the running one included)."""
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM jobs WHERE seq < ? AND status IN (?, ?)",
                                    (job.seq, *UNFINISHED)).fetchone()
        return int(n)

    def mean_run_seconds(self, task: str, last: int = 10) -> float | None:
        """Mean run time of the last ``last`` completed jobs of ``task``; None without history."""
        with self._lock:
            (mean,) = self._db.execute(
                "SELECT avg(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs "
                "WHERE task = ? AND status = 'completed' AND started_at IS NOT NULL ORDER BY seq DESC LIMIT ?)",
                (task, last)).fetchone()
        return None if mean is None else float(mean)

