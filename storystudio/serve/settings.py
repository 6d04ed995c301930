"""Configuration of the HTTP service, read once from the environment (and the command line).

The worker part (models, device, input limits, output folder) is the worker's own
:class:`~storystudio.config.WorkerSettings`; this module adds only what an HTTP
service needs on top. Every variable is in the README's Configuration table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from storystudio.config import WorkerSettings
from storystudio.errors import InvalidInput
from storystudio.serve.auth import KeyRing
from storystudio.storage import StorageSettings
from storystudio.tasks import VideoParams

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_JOBS_PER_KEY = 2
DB_NAME = ".serve/jobs.sqlite3"  # under the output folder; dot folders are never served
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _config_error(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_config")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise _config_error(f"{name}={raw!r}: use 1/true or 0/false")


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _config_error(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise _config_error(f"{name}={value} must be between {low} and {high}")
    return value


def parse_video_defaults(raw: str, name: str = "STORYSTUDIO_SERVE_VIDEO_DEFAULTS") -> dict[str, Any]:
    """Video settings for the earlier API's requests, which carry none of their own.

    A JSON object of the worker's video settings (``steps``, ``guidance``, ``shift``,
    ``infer_frames``, ``max_area``, ``negative_prompt``...), validated by the worker's
    own :class:`~storystudio.tasks.VideoParams` at start-up so a typo fails the
    service, not every request. The dict is returned as given: it is merged into each
    job input, which the worker validates again.
    """
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise _config_error(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _config_error(f"{name} must be a JSON object of video settings")
    try:
        VideoParams.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise _config_error(f"{name}: {problems}") from None
    return value


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``storystudio serve`` needs; see the README's Configuration table."""

    worker: WorkerSettings
    keys: KeyRing
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allow_unauthenticated: bool = False
    db_path: Path | None = None  # None: <output folder>/.serve/jobs.sqlite3
    media_root: Path | None = None  # None: image_path/audio_path are refused
    max_jobs_per_key: int = DEFAULT_MAX_JOBS_PER_KEY
    video_defaults: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, worker: WorkerSettings | None = None) -> ServeSettings:
        env = os.environ if env is None else env
        media = env.get("STORYSTUDIO_MEDIA_ROOT", "").strip()
        db = env.get("STORYSTUDIO_SERVE_DB", "").strip()
        defaults = parse_video_defaults(env.get("STORYSTUDIO_SERVE_VIDEO_DEFAULTS", ""))
        return cls(
            worker=worker or WorkerSettings.from_env(env),
            keys=KeyRing.from_env(env),
            host=env.get("STORYSTUDIO_HOST", "").strip() or DEFAULT_HOST,
            port=_int(env, "STORYSTUDIO_PORT", DEFAULT_PORT, low=1, high=65535),
            allow_unauthenticated=_flag(env, "STORYSTUDIO_ALLOW_UNAUTHENTICATED"),
            db_path=Path(db) if db else None,
            media_root=Path(media) if media else None,
            max_jobs_per_key=_int(env, "STORYSTUDIO_MAX_JOBS_PER_KEY", DEFAULT_MAX_JOBS_PER_KEY, low=1, high=10_000),
            video_defaults=tuple(defaults.items()),
        )

    @property
    def storage(self) -> StorageSettings:
        return self.worker.storage or StorageSettings.from_env({})

    @property
    def output_dir(self) -> Path:
        """The folder results are written to and ``/videos`` serves (``STORYSTUDIO_OUTPUT_DIR``)."""
        return self.storage.output_dir.expanduser().resolve()

    @property
    def database(self) -> Path:
        return (self.db_path or self.output_dir / DB_NAME).expanduser().resolve()

    @property
    def video_settings(self) -> dict[str, Any]:
        return dict(self.video_defaults)
