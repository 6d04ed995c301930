"""Job input schemas: the worker's public contract with the story app.

Defaults and unknown-field rejection live here, so a bad request fails in
milliseconds with ``invalid_input`` / ``unknown_task`` before any model is touched.
Every bound is a constant of :mod:`storystudio.limits`, the same one the engines'
request checks use, so a request the schema accepts is one the engine accepts
(``tests/test_limits.py`` probes both sides of every bound).
This module imports no runner, engine or torch (the router is
:func:`storystudio.worker.route`), so the backend client can validate jobs cheaply.

The story app's backend was written against the worker's first specification, whose
field names differ in a few places (``sample_steps``, ``image_url``, ``audio_url``,
a scene's ``id``, a batch's ``image_settings`` / ``video_settings``). Those names are
accepted as aliases, defined once in :data:`FIRST_SPEC_ALIASES`; the models and
:func:`job_input_schema` (committed as ``schema/job-input.schema.json``) both follow it.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from storystudio import limits as L
from storystudio.errors import InvalidInput
from storystudio.fast_preset import Preset, SpeedKnobs, check_speed_request

TASKS = ("image", "video", "batch")

Seed = Annotated[int, Field(ge=0, le=L.SEED_MAX)]
Source = Annotated[str, Field(min_length=1, max_length=L.SOURCE_MAX_CHARS)]  # URL, data URI or base64
Prompt = Annotated[str, Field(max_length=L.PROMPT_MAX_CHARS)]
Id = Annotated[str, Field(min_length=1, max_length=L.ID_MAX_CHARS)]


class _Strict(BaseModel):
    """Unknown fields are rejected; the first specification's names are renamed first.

    The renaming runs before field validation, so ``extra="forbid"`` still sees every
    name that is neither today's nor an alias, and a request giving both spellings of
    one field fails instead of one silently winning.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    # ------------------------------------------------------------ first-spec aliases
    @model_validator(mode="before")
    @classmethod
    def _rename_first_spec_names(cls, data: Any) -> Any:
        aliases = first_spec_aliases(cls)
        if not aliases or not isinstance(data, dict) or aliases.keys().isdisjoint(data.keys()):
            return data
        renamed = dict(data)
        for old, new in aliases.items():
            if old not in renamed:
                continue
            if new in renamed:
                raise PydanticCustomError("alias_conflict", f"both {new!r} and {old!r} given; use one")
            renamed[new] = renamed.pop(old)
        return renamed

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """Publish each alias as an accepted property, exclusive with today's name.

        pydantic only knows the renamed fields, so without this the schema would
        reject exactly the payloads the aliases exist for.
        """
        schema = handler(core_schema)
        aliases = first_spec_aliases(cls)
        if not aliases or handler.mode != "validation":
            return schema
        target = handler.resolve_ref_schema(schema)
        props: dict[str, Any] = target["properties"]
        required: list[str] = target.get("required", [])
        for old, new in aliases.items():
            note = f"first-specification name of {new!r}; give one of the two"
            props[old] = {**props[new], "title": old, "description": note}
            target.setdefault("dependentSchemas", {})[old] = {"not": {"required": [new]}}
            if new in required:
                required.remove(new)
                target.setdefault("allOf", []).append({"anyOf": [{"required": [new]}, {"required": [old]}]})
        if "required" in target and not required:
            del target["required"]
        return schema


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
    # --- speed preset (storystudio/fast_preset.py): the preset sets defaults, explicit knobs win
    preset: Preset = Field(L.VIDEO_PRESET_DEFAULT, description="'exact' (default) or 'fast' (approximations, opt-in)")
    fp8: bool | None = Field(None, description="FP8 DiT linears; null = the preset's choice")
    attention_8bit: bool | None = Field(None, description="8-bit attention where available; null = preset")
    step_cache: float | None = Field(
        None, ge=0.0, le=L.STEP_CACHE_MAX_THRESHOLD, allow_inf_nan=False,
        description="step-cache threshold (0 = off); null = the preset's choice",
    )

    @model_validator(mode="after")
    def _speed_knobs(self) -> VideoParams:
        check_speed_request(self.preset, self.fp8, self.attention_8bit, self.step_cache, self.steps)
        return self

    @property
    def speed_knobs(self) -> SpeedKnobs:
        return SpeedKnobs.resolve(self.preset, fp8=self.fp8, attention_8bit=self.attention_8bit,
                                  step_cache=self.step_cache)
    # --- end speed preset

    @property
    def area(self) -> int:
        return self.max_area or L.RESOLUTIONS[self.resolution]


class AudioTrim(_Strict):
    audio_start: float | None = Field(None, ge=0.0, le=L.AUDIO_START_MAX_S)
    audio_duration: float | None = Field(None, ge=L.AUDIO_DURATION_MIN_S, le=L.AUDIO_DURATION_MAX_S)


class ImageTask(ImageParams):
    task: Literal["image"]
    prompt: Annotated[str, Field(min_length=1, max_length=L.PROMPT_MAX_CHARS, pattern=L.NON_BLANK)]
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
    pose_video: Source | None = Field(None, description="optional pose video that drives the body motion")
    video_prompt: Prompt | None = None
    seed: Seed | None = None

    @model_validator(mode="after")
    def _needs_image_or_prompt(self) -> Scene:
        if not self.image and not (self.prompt and self.prompt.strip()):
            raise ValueError("a scene needs either 'prompt' (to generate its image) or 'image' (or 'image_url')")
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
    resume: bool = Field(
        False,
        description="store the story under <project_id>/resume/ and reuse each stored scene whose inputs "
        "(prompt, media bytes, settings, seed) are unchanged; reused scenes are marked reused: true",
    )
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
            raise ValueError("scene_id (or id) values must be unique within a batch")
        for s, sid in zip(self.scenes, ids, strict=True):
            s.scene_id = sid
        return self


# ---------------------------------------------------------------- first-spec aliases
#: The first specification's field names, still sent by the story app's backend:
#: model -> {first-spec name: today's name}. The one definition of every alias; a model
#: also accepts its bases' aliases (so ``sample_steps`` works in a video job and in a
#: batch's video settings). Validated models and results use today's names only.
FIRST_SPEC_ALIASES: dict[type[_Strict], dict[str, str]] = {
    VideoParams: {"sample_steps": "steps"},
    VideoTask: {"image_url": "image", "audio_url": "audio"},
    Scene: {"id": "scene_id", "image_url": "image", "audio_url": "audio"},
    BatchTask: {"image_settings": "image", "video_settings": "video"},
}


@cache
def first_spec_aliases(model: type[BaseModel]) -> dict[str, str]:
    """Every alias ``model`` accepts (its own and its bases'), first-spec name -> today's name."""
    merged: dict[str, str] = {}
    for base in reversed(model.__mro__):
        merged.update(FIRST_SPEC_ALIASES.get(base, {}))
    return merged


# ---------------------------------------------------------------- the job input
Task = Annotated[ImageTask | VideoTask | BatchTask, Field(discriminator="task")]
_TASK_ADAPTER: TypeAdapter[Task] = TypeAdapter(Task)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def job_input_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of ``job["input"]``, generated from the models, aliases included.

    Committed as ``schema/job-input.schema.json`` (``python -m storystudio.schema_export``).
    Cross-field rules the schema cannot state (a scene needs a non-blank ``prompt`` or an
    image; unique scene ids) are checked by the worker.
    """
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "Story Studio job input",
        "description": "The 'input' object of a Story Studio RunPod job; 'task' selects the schema.",
        **_TASK_ADAPTER.json_schema(mode="validation"),
    }


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:8]:
        path = list(e["loc"])
        if path and path[0] in TASKS:  # the discriminator's tag, not a field
            path = path[1:]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{'.'.join(str(x) for x in path)}: {msg}" if path else msg)
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

