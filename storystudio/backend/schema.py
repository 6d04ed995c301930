"""Typed mirror of the worker's ``batch`` job input and output.

The worker's contract is ``storystudio/tasks.py`` (pydantic ``BatchTask``, unknown
fields rejected) and ``storystudio/batch.py`` (``run_batch`` output); the tests check
these dataclasses against ``parse_job_input`` so the two cannot drift apart silently.

Input (``{"input": ...}`` of a RunPod job)::

    {"task": "batch", "project_id": "story-1", "seed"?: int >= 0,
     "scenes": [{"scene_id"?: str, "prompt"?: str, "image"?: URL/data URI/base64,
                 "audio": URL/data URI/base64, "video_prompt"?: str,
                 "audio_start"?: float, "audio_duration"?: float, "seed"?: int}],
     "image"?: {"width", "height", "steps", "guidance", "negative_prompt"},
     "video"?: {"resolution": "480p"|"720p", "max_area", "steps", "guidance", "shift",
                "infer_frames", "negative_prompt"}}

A scene needs ``prompt`` (its image is generated) or ``image`` (given). Scenes without
``scene_id`` get ``scene-001``, ``scene-002``, ... here, by the worker's own rule, so
results can always be matched to scenes. Optional values that are ``None`` are left out
so the worker's defaults apply (image 1024x1024, 8 steps, guidance 0; video 480p, 40
steps, guidance 4.5, shift 3.0, 80 frames per clip). Numeric limits (e.g. sizes that
are multiples of 16) are the worker's to enforce: it rejects a bad batch with
``invalid_input`` before touching a model.

Output (``output`` of a COMPLETED job)::

    {"project_id", "scenes": [{"scene_id", "image_url"?, "image_seed"?, "video_url"?,
                               "video_seed"?, "error"?: {"error", "code", "stage"}, ...}],
     "scenes_ok", "scenes_failed", "images_time", "swap_time", "video_load_time",
     "videos_time", "total_time", "manager": {...}, "job_id", "task"}

Unknown keys in *input* files are rejected (a typo must not silently fall back to a
default); other keys of the worker's *output* are kept in ``extra``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from storystudio.errors import InvalidInput
from storystudio.limits import RESOLUTIONS as LIMITS_RESOLUTIONS

from .errors import BackendError

RESOLUTIONS = tuple(LIMITS_RESOLUTIONS)


def _fail(where: str, why: str) -> InvalidInput:
    return InvalidInput(f"{where}: {why}")


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")


def _str(data: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise _fail(where, f"'{key}' is required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise _fail(where, f"'{key}' must be a {'non-empty ' if required else ''}string")
    return value


def _num(data: Mapping[str, Any], key: str, where: str, *, integer: bool = False,
         minimum: float | None = None, exclusive: bool = False) -> Any:
    value = data.get(key)
    if value is None:
        return None
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise _fail(where, f"'{key}' must be {'an integer' if integer else 'a number'}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise _fail(where, f"'{key}' must be {'>' if exclusive else '>='} {minimum:g}")
    return value


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _as_dict(obj: Any) -> dict[str, Any]:
    return _drop_none({f.name: getattr(obj, f.name) for f in fields(obj)})


# --------------------------------------------------------------------------- input


@dataclass
class Scene:
    audio: str
    scene_id: str | None = None
    prompt: str | None = None
    image: str | None = None
    video_prompt: str | None = None
    audio_start: float | None = None
    audio_duration: float | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "scene") -> Scene:
        if not isinstance(data, Mapping):
            raise _fail(where, "must be an object")
        _check_keys(data, {f.name for f in fields(cls)}, where)
        scene = cls(
            audio=_str(data, "audio", where, required=True),
            scene_id=_str(data, "scene_id", where),
            prompt=_str(data, "prompt", where),
            image=_str(data, "image", where),
            video_prompt=_str(data, "video_prompt", where),
            audio_start=_num(data, "audio_start", where, minimum=0),
            audio_duration=_num(data, "audio_duration", where, minimum=0, exclusive=True),
            seed=_num(data, "seed", where, integer=True, minimum=0),
        )
        if scene.scene_id is not None and not scene.scene_id:
            raise _fail(where, "'scene_id' must not be empty")
        if not scene.image and not (scene.prompt and scene.prompt.strip()):
            raise _fail(where, "needs 'prompt' (to generate its image) or 'image'")
        return scene

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass
class ImageSettings:
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "image") -> ImageSettings:
        if not isinstance(data, Mapping):
            raise _fail(where, "must be an object")
        _check_keys(data, {f.name for f in fields(cls)}, where)
        return cls(
            width=_num(data, "width", where, integer=True, minimum=1),
            height=_num(data, "height", where, integer=True, minimum=1),
            steps=_num(data, "steps", where, integer=True, minimum=1),
            guidance=_num(data, "guidance", where, minimum=0),
            negative_prompt=_str(data, "negative_prompt", where),
        )

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass
class VideoSettings:
    resolution: str | None = None
    max_area: int | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    infer_frames: int | None = None
    negative_prompt: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "video") -> VideoSettings:
        if not isinstance(data, Mapping):
            raise _fail(where, "must be an object")
        _check_keys(data, {f.name for f in fields(cls)}, where)
        res = data.get("resolution")
        if res is not None and res not in RESOLUTIONS:
            raise _fail(where, f"'resolution' must be one of {', '.join(RESOLUTIONS)}")
        return cls(
            resolution=res,
            max_area=_num(data, "max_area", where, integer=True, minimum=1),
            steps=_num(data, "steps", where, integer=True, minimum=1),
            guidance=_num(data, "guidance", where, minimum=0),
            shift=_num(data, "shift", where, minimum=0, exclusive=True),
            infer_frames=_num(data, "infer_frames", where, integer=True, minimum=1),
            negative_prompt=_str(data, "negative_prompt", where),
        )

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass
class StoryProject:
    """One story: what ``submit`` sends as a single ``batch`` job."""

    project_id: str
    scenes: list[Scene]
    image: ImageSettings | None = None
    video: VideoSettings | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.project_id, str) or not self.project_id.strip():
            raise _fail("project", "'project_id' must be a non-empty string")
        if not self.scenes:
            raise _fail("project", "'scenes' must be a non-empty list")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise _fail("project", "'seed' must be an integer >= 0")
        seen: set[str] = set()
        for i, scene in enumerate(self.scenes):
            if scene.scene_id is None:
                scene.scene_id = f"scene-{i + 1:03d}"  # the worker's rule (tasks.BatchTask)
            if scene.scene_id in seen:
                raise _fail("project", f"duplicate scene_id {scene.scene_id!r}")
            seen.add(scene.scene_id)

    @classmethod
    def from_dict(cls, data: Any) -> StoryProject:
        """Accept the job input itself, or a full job body ``{"input": {...}}``."""
        if isinstance(data, Mapping) and set(data) == {"input"}:
            data = data["input"]
        if not isinstance(data, Mapping):
            raise _fail("project", "must be a JSON object")
        allowed = {"task", "project_id", "scenes", "image", "video", "seed"}
        _check_keys(data, allowed, "project")
        task = data.get("task", "batch")
        if task != "batch":
            raise _fail("project", f"'task' must be 'batch' (got {task!r})")
        scenes_raw = data.get("scenes")
        if not isinstance(scenes_raw, list):
            raise _fail("project", "'scenes' must be a list")
        scenes = [Scene.from_dict(s, f"scenes[{i}]") for i, s in enumerate(scenes_raw)]
        image = data.get("image")
        video = data.get("video")
        return cls(
            project_id=_str(data, "project_id", "project", required=True),
            scenes=scenes,
            image=None if image is None else ImageSettings.from_dict(image),
            video=None if video is None else VideoSettings.from_dict(video),
            seed=_num(data, "seed", "project", integer=True, minimum=0),
        )

    def to_input(self) -> dict[str, Any]:
        """The job's ``input`` object."""
        out: dict[str, Any] = {
            "task": "batch",
            "project_id": self.project_id,
            "scenes": [s.to_dict() for s in self.scenes],
        }
        if self.image is not None and self.image.to_dict():
            out["image"] = self.image.to_dict()
        if self.video is not None and self.video.to_dict():
            out["video"] = self.video.to_dict()
        if self.seed is not None:
            out["seed"] = self.seed
        return out


# --------------------------------------------------------------------------- output

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


_SCENE_KEYS = ("scene_id", "image_url", "video_url", "image_seed", "video_seed", "error")


@dataclass(frozen=True)
class SceneResult:
    """One scene of a batch. Everything else the worker reports (``image_source``,
    ``image_key``, ``video_key``, ``width``, ``height``, ``frames``, ``fps``,
    ``duration_s``, ``num_clips``, ``timings``, ...) is kept in ``extra``."""

    scene_id: str
    image_url: str | None = None
    video_url: str | None = None
    image_seed: int | None = None
    video_seed: int | None = None
    error: ErrorInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_dict(cls, data: Any) -> SceneResult:
        if not isinstance(data, Mapping) or not isinstance(data.get("scene_id"), str):
            raise BackendError("worker output: every scene result needs a string 'scene_id'",
                               code="bad_output")
        err = data.get("error")
        return cls(
            scene_id=data["scene_id"],
            image_url=_opt_str(data.get("image_url")),
            video_url=_opt_str(data.get("video_url")),
            image_seed=_opt_int(data.get("image_seed")),
            video_seed=_opt_int(data.get("video_seed")),
            error=None if err is None else ErrorInfo.from_any(err),
            extra={k: v for k, v in data.items() if k not in _SCENE_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scene_id": self.scene_id, "ok": self.ok}
        for key in ("image_url", "video_url", "image_seed", "video_seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.error is not None:
            out["error"] = self.error.to_dict()
        out.update(self.extra)
        return out


_TIMES = ("images_time", "swap_time", "video_load_time", "videos_time", "total_time")
_STORY_KEYS = ("project_id", "scenes", "manager", "job_id", *_TIMES)


@dataclass(frozen=True)
class StoryResult:
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
    def from_output(cls, output: Any, *, project: StoryProject | None = None,
                    job_id: str | None = None) -> StoryResult:
        """Parse a COMPLETED batch output. Scenes of ``project`` missing from the output
        get a ``missing_result`` error instead of disappearing silently."""
        if not isinstance(output, Mapping) or not isinstance(output.get("scenes"), list):
            raise BackendError("worker output: expected an object with a 'scenes' list", code="bad_output")
        scenes = [SceneResult.from_dict(s) for s in output["scenes"]]
        if project is not None:
            got = {s.scene_id for s in scenes}
            for scene in project.scenes:
                if scene.scene_id not in got:
                    scenes.append(SceneResult(
                        scene_id=str(scene.scene_id),
                        error=ErrorInfo("missing_result: the worker returned no result for this scene",
                                        "missing_result"),
                    ))
        manager = output.get("manager")
        project_id = output.get("project_id")
        if not isinstance(project_id, str):
            project_id = project.project_id if project is not None else ""
        return cls(
            project_id=project_id,
            scenes=scenes,
            job_id=job_id or _opt_str(output.get("job_id")),
            manager=dict(manager) if isinstance(manager, Mapping) else {},
            extra={k: v for k, v in output.items() if k not in _STORY_KEYS},
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
        out.update(self.extra)
        return out
