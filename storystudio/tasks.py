"""Job input schemas: the worker's public contract with the story app.

Defaults, limits and unknown-field rejection live here, so a bad request fails in
milliseconds with ``invalid_input`` / ``unknown_task`` before any model is touched.
This module imports no runner, engine or torch (the router is
:func:`storystudio.worker.route`), so the backend client can validate jobs cheaply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from storystudio.errors import InvalidInput

TASKS = ("image", "video", "batch")
RESOLUTIONS: dict[str, int] = {"480p": 480 * 832, "720p": 720 * 1280}  # max pixel area, as Wan's generate.py

Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Source = Annotated[str, Field(min_length=1, max_length=80_000_000)]  # URL, data URI or base64
Prompt = Annotated[str, Field(max_length=4000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ImageParams(_Strict):
    """Z-Image-Turbo settings; Turbo is distilled for ~8 steps without CFG."""

    negative_prompt: Prompt = ""
    width: int = Field(1024, ge=256, le=2048, multiple_of=16)
    height: int = Field(1024, ge=256, le=2048, multiple_of=16)
    steps: int = Field(8, ge=1, le=50)
    guidance: float = Field(0.0, ge=0.0, le=20.0)


class VideoParams(_Strict):
    """Wan2.2-S2V settings (official defaults: 40 steps, guidance 4.5, shift 3 for 480p)."""

    negative_prompt: Prompt | None = None
    resolution: Literal["480p", "720p"] = "480p"
    max_area: int | None = Field(
        None, ge=32 * 32, le=720 * 1280, description="pixel area override; wins over resolution"
    )
    steps: int = Field(40, ge=1, le=100)
    guidance: float = Field(4.5, ge=0.0, le=20.0)
    shift: float = Field(3.0, gt=0.0, le=20.0)
    infer_frames: int = Field(80, ge=4, le=160, multiple_of=4, description="frames per clip")

    @property
    def area(self) -> int:
        return self.max_area or RESOLUTIONS[self.resolution]


class AudioTrim(_Strict):
    audio_start: float | None = Field(None, ge=0.0, le=86_400.0)
    audio_duration: float | None = Field(None, gt=0.0, le=3_600.0)


class ImageTask(ImageParams):
    task: Literal["image"]
    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    seed: Seed | None = None
    return_base64: bool = Field(False, description="also return the PNG inline when it is small enough")


class VideoTask(VideoParams, AudioTrim):
    task: Literal["video"]
    image: Source
    audio: Source
    prompt: Prompt = ""
    pose_video: Source | None = None
    seed: Seed | None = None


class Scene(AudioTrim):
    """One story scene: an image (generated from ``prompt`` or given) and a talking video."""

    scene_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    prompt: Prompt | None = None
    image: Source | None = None
    audio: Source
    video_prompt: Prompt | None = None
    seed: Seed | None = None

    @model_validator(mode="after")
    def _needs_image_or_prompt(self) -> Scene:
        if not self.image and not (self.prompt and self.prompt.strip()):
            raise ValueError("a scene needs either 'prompt' (to generate its image) or 'image'")
        return self


class BatchTask(_Strict):
    task: Literal["batch"]
    project_id: Annotated[str, Field(min_length=1, max_length=128)]
    scenes: Annotated[list[Scene], Field(min_length=1, max_length=200)]
    image: ImageParams = Field(default_factory=ImageParams)
    video: VideoParams = Field(default_factory=VideoParams)
    seed: Seed | None = None

    @model_validator(mode="after")
    def _scene_ids(self) -> BatchTask:
        ids = [s.scene_id or f"scene-{i + 1:03d}" for i, s in enumerate(self.scenes)]
        if len(set(ids)) != len(ids):
            raise ValueError("scene_id values must be unique within a batch")
        for s, sid in zip(self.scenes, ids, strict=True):
            s.scene_id = sid
        return self


Task = Annotated[ImageTask | VideoTask | BatchTask, Field(discriminator="task")]
_TASK_ADAPTER: TypeAdapter[Task] = TypeAdapter(Task)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:8]:
        path = list(e["loc"])
        if path and path[0] in TASKS:  # the discriminator's tag, not a field
            path = path[1:]
        loc = ".".join(str(x) for x in path) or "input"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    more = len(err.errors()) - 8
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_job_input(raw: Any) -> ImageTask | VideoTask | BatchTask:
    """Validate ``job["input"]``; raises :class:`InvalidInput` with a readable message."""
    if not isinstance(raw, dict):
        raise InvalidInput("job input must be a JSON object with a 'task' field")
    task = raw.get("task")
    if task is None:
        raise InvalidInput(f"missing field 'task' (one of: {', '.join(TASKS)})")
    if task not in TASKS:
        raise InvalidInput(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}", code="unknown_task")
    try:
        return _TASK_ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise InvalidInput(f"invalid {task} input: {_describe(err)}") from None

