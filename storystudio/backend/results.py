"""Typed results of a story (``batch``) job, as the story app reads them.

The worker's output (``storystudio/batch.py`` ``run_batch`` plus what
``Worker.handle`` adds) is a plain dict; these frozen dataclasses give it names and
types without re-stating the worker's input schema (the client validates input with
the worker's own pydantic models, :mod:`storystudio.tasks`)::

    {"project_id", "scenes": [{"scene_id", "image_url"?, "image_bytes"?, "image_sha256"?,
                               "image_seed"?, "video_url"?, "bytes"?, "sha256"?, "video_seed"?,
                               "error"?: {"error", "code", "stage"}, ...}],
     "scenes_ok", "scenes_failed", "images_time", "swap_time", "video_load_time",
     "videos_time", "total_time", "manager": {...}, "job_id", "task"}

Everything else the worker reports is kept in ``extra`` so nothing is lost. After
``--download`` / ``download=``, each scene also carries the local ``image_path`` and
``video_path`` of its files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BackendError

_CODE_PREFIX = re.compile(r"^([a-z][a-z0-9_]*): ")


def split_code(message: str) -> tuple[str | None, str]:
    """``"invalid_audio: bad file"`` → ``("invalid_audio", "bad file")``.

    The worker puts the code in front of every error message
    (``StoryStudioError.to_result``) because RunPod sometimes keeps only the ``error``
    string of a failed job; this gets it back.
    """
    m = _CODE_PREFIX.match(message)
    if m is None:
        return None, message
    return m.group(1), message[m.end():]


@dataclass(frozen=True)
class ErrorInfo:
    """A worker error: ``{"error": "<code>: <message>", "code", "stage"?}``."""

    error: str
    code: str
    stage: str | None = None

    @classmethod
    def from_any(cls, value: Any, default_code: str = "internal_error") -> ErrorInfo:
        if isinstance(value, Mapping):
            message = str(value.get("error") or value.get("message") or "unknown error")
            code = value.get("code")
            stage = value.get("stage")
        else:
            message, code, stage = str(value), None, None
        if not isinstance(code, str) or not code:
            code = split_code(message)[0] or default_code
        return cls(message, code, stage if isinstance(stage, str) else None)

    def to_dict(self) -> dict[str, str]:
        out = {"error": self.error, "code": self.code}
        if self.stage is not None:
            out["stage"] = self.stage
        return out


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


_SCENE_KEYS = ("scene_id", "image_url", "video_url", "image_seed", "video_seed", "error",
               "image_path", "video_path")


@dataclass(frozen=True)
class SceneResult:
    """One scene of a batch. Everything else the worker reports (``image_source``,
    ``image_key``, ``video_key``, ``width``, ``height``, ``frames``, ``fps``,
    ``duration_s``, ``num_clips``, ``timings``, sizes and hashes...) is in ``extra``.

    ``image_path`` / ``video_path``: the downloaded files, when the story was run with
    a download folder.
    """

    scene_id: str
    image_url: str | None = None
    video_url: str | None = None
    image_seed: int | None = None
    video_seed: int | None = None
    error: ErrorInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    image_path: Path | None = None
    video_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def expected(self, kind: str) -> tuple[int | None, str | None]:
        """``(bytes, sha256)`` the worker reported for the scene's ``image`` or ``video``."""
        size_key, hash_key = ("image_bytes", "image_sha256") if kind == "image" else ("bytes", "sha256")
        digest = self.extra.get(hash_key)
        return _opt_int(self.extra.get(size_key)), digest if isinstance(digest, str) else None

    @classmethod
    def from_dict(cls, data: Any) -> SceneResult:
        if not isinstance(data, Mapping) or not isinstance(data.get("scene_id"), str):
            raise BackendError("worker output: every scene result needs a string 'scene_id'",
                               code="bad_output")
        err = data.get("error")
        paths = {k: Path(data[k]) if isinstance(data.get(k), str) else None for k in ("image_path", "video_path")}
        return cls(
            scene_id=data["scene_id"],
            image_url=_opt_str(data.get("image_url")),
            video_url=_opt_str(data.get("video_url")),
            image_seed=_opt_int(data.get("image_seed")),
            video_seed=_opt_int(data.get("video_seed")),
            error=None if err is None else ErrorInfo.from_any(err),
            extra={k: v for k, v in data.items() if k not in _SCENE_KEYS and k != "ok"},
            **paths,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scene_id": self.scene_id, "ok": self.ok}
        for key in ("image_url", "video_url", "image_seed", "video_seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("image_path", "video_path"):
            if getattr(self, key) is not None:
                out[key] = str(getattr(self, key))
        if self.error is not None:
            out["error"] = self.error.to_dict()
        out.update(self.extra)
        return out


_TIMES = ("images_time", "swap_time", "video_load_time", "videos_time", "total_time")
_STORY_KEYS = ("project_id", "scenes", "manager", "job_id", "ok", "download_dir", *_TIMES)


@dataclass(frozen=True)
class StoryResult:
    """A finished story: per-scene results, phase timings, and (after a download) the
    folder holding the files and ``result.json``."""

    project_id: str
    scenes: list[SceneResult]
    job_id: str | None = None
    images_time: float | None = None
    swap_time: float | None = None
    video_load_time: float | None = None
    videos_time: float | None = None
    total_time: float | None = None
    manager: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    download_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.scenes)

    @property
    def failed_scenes(self) -> list[SceneResult]:
        return [s for s in self.scenes if not s.ok]

    def scene(self, scene_id: str) -> SceneResult:
        for s in self.scenes:
            if s.scene_id == scene_id:
                return s
        raise KeyError(scene_id)

    @classmethod
    def from_output(cls, output: Any, *, scene_ids: Iterable[str] = (), project_id: str | None = None,
                    job_id: str | None = None) -> StoryResult:
        """Parse a COMPLETED batch output. Scenes in ``scene_ids`` (the story's, in
        order) missing from the output get a ``missing_result`` error instead of
        disappearing silently."""
        if not isinstance(output, Mapping) or not isinstance(output.get("scenes"), list):
            raise BackendError("worker output: expected an object with a 'scenes' list", code="bad_output")
        scenes = [SceneResult.from_dict(s) for s in output["scenes"]]
        got = {s.scene_id for s in scenes}
        for sid in scene_ids:
            if sid not in got:
                scenes.append(SceneResult(
                    scene_id=sid,
                    error=ErrorInfo("missing_result: the worker returned no result for this scene",
                                    "missing_result"),
                ))
        manager = output.get("manager")
        pid = output.get("project_id")
        if not isinstance(pid, str):
            pid = project_id or ""
        download_dir = output.get("download_dir")
        return cls(
            project_id=pid,
            scenes=scenes,
            job_id=job_id or _opt_str(output.get("job_id")),
            manager=dict(manager) if isinstance(manager, Mapping) else {},
            extra={k: v for k, v in output.items() if k not in _STORY_KEYS},
            download_dir=Path(download_dir) if isinstance(download_dir, str) else None,
            **{k: _opt_float(output.get(k)) for k in _TIMES},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "project_id": self.project_id,
            "job_id": self.job_id,
            "ok": self.ok,
            "scenes": [s.to_dict() for s in self.scenes],
        }
        for key in _TIMES:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.manager:
            out["manager"] = self.manager
        if self.download_dir is not None:
            out["download_dir"] = str(self.download_dir)
        out.update(self.extra)
        return out
