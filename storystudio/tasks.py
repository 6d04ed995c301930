"""Job input schemas: the worker's public contract with the story app.

Defaults, limits and unknown-field rejection live here, so a bad request fails in
milliseconds with ``invalid_input`` / ``unknown_task`` before any model is touched.
This module imports no runner, engine or torch (the router is
:func:`storystudio.worker.route`), so the backend client can validate jobs cheaply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from storystudio import limits as L
from storystudio.errors import InvalidInput

TASKS = ("image", "video", "batch")

Seed = Annotated[int, Field(ge=0, le=L.SEED_MAX)]
Source = Annotated[str, Field(min_length=1, max_length=L.SOURCE_MAX_CHARS)]  # URL, data URI or base64
Prompt = Annotated[str, Field(max_length=L.PROMPT_MAX_CHARS)]
Id = Annotated[str, Field(min_length=1, max_length=L.ID_MAX_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ImageParams(_Strict):
    """Z-Image-Turbo settings; Turbo is distilled for ~8 steps without CFG."""

    negative_prompt: Prompt = ""
    width: int = Field(L.IMAGE_SIZE_DEFAULT, ge=L.IMAGE_SIZE_MIN, le=L.IMAGE_SIZE_MAX, multiple_of=L.IMAGE_SIZE_MULTIPLE)
    height: int = Field(L.IMAGE_SIZE_DEFAULT, ge=L.IMAGE_SIZE_MIN, le=L.IMAGE_SIZE_MAX, multiple_of=L.IMAGE_SIZE_MULTIPLE)
    steps: int = Field(L.IMAGE_STEPS_DEFAULT, ge=1, le=L.IMAGE_STEPS_MAX)
    guidance: float = Field(L.IMAGE_GUIDANCE_DEFAULT, ge=0.0, le=L.IMAGE_GUIDANCE_MAX)


class VideoParams(_Strict):
    """Wan2.2-S2V settings (official defaults: 40 steps, guidance 4.5, shift 3 for 480p)."""

    negative_prompt: Prompt | None = None
    resolution: Literal[tuple(L.RESOLUTIONS)] = L.VIDEO_RESOLUTION_DEFAULT  # type: ignore[valid-type]
    max_area: int | None = Field(
        None, ge=L.VIDEO_AREA_MIN, le=L.VIDEO_AREA_MAX, description="pixel area override; wins over resolution"
    )
    steps: int = Field(L.VIDEO_STEPS_DEFAULT, ge=1, le=L.VIDEO_STEPS_MAX)
    guidance: float = Field(L.VIDEO_GUIDANCE_DEFAULT, ge=0.0, le=L.VIDEO_GUIDANCE_MAX)
    shift: float = Field(L.VIDEO_SHIFT_DEFAULT, gt=0.0, le=L.VIDEO_SHIFT_MAX)
    infer_frames: int = Field(L.INFER_FRAMES_DEFAULT, ge=L.INFER_FRAMES_MIN, le=L.INFER_FRAMES_MAX,
                              multiple_of=L.INFER_FRAMES_MULTIPLE, description="frames per clip")

    @property
    def area(self) -> int:
        return self.max_area or L.RESOLUTIONS[self.resolution]


class AudioTrim(_Strict):
    audio_start: float | None = Field(None, ge=0.0, le=L.AUDIO_START_MAX_S)
    audio_duration: float | None = Field(None, gt=0.0, le=L.AUDIO_DURATION_MAX_S)


class ImageTask(ImageParams):
    task: Literal["image"]
    prompt: Annotated[str, Field(min_length=1, max_length=L.PROMPT_MAX_CHARS)]
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

    scene_id: Id | None = None
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

    @property
    def video_text(self) -> str:
        """The prompt of the scene's video: ``video_prompt``, else the image ``prompt``."""
        return self.video_prompt or self.prompt or ""


class BatchTask(_Strict):
    task: Literal["batch"]
    project_id: Id
    scenes: Annotated[list[Scene], Field(min_length=1, max_length=L.SCENES_MAX)]
    image: ImageParams = Field(default_factory=ImageParams)
    video: VideoParams = Field(default_factory=VideoParams)
    seed: Seed | None = None
    images_only: bool = Field(
        False,
        description="render and store the scenes' images only (no audio is fetched, no video rendered); "
        "the client's `submit --workers N` fan-out sends this, then one `video` job per scene",
    )

    def scene_seed(self, index: int) -> int | None:
        """Seed of scene ``index`` (image and video): its own, else the batch seed + index."""
        scene = self.scenes[index]
        if scene.seed is not None:
            return scene.seed
        return None if self.seed is None else (self.seed + index) % (L.SEED_MAX + 1)

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

