"""Worker configuration, read once from environment variables.

Every knob an operator can turn is an env var named ``STORYSTUDIO_*`` (storage
also accepts RunPod's ``BUCKET_*`` names, see :mod:`storystudio.storage`). The
README's Configuration table lists them all; this module is where the worker
reads the ones that are not owned by a more specific module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from storystudio.errors import InvalidInput
from storystudio.inputs import InputLimits
from storystudio.models.compile import COMPILE_CACHE_DIRNAME
from storystudio.models.video_path import VideoPathOptions
from storystudio.models.locate import DEFAULT_MODELS_DIR, ModelSearch
from storystudio.storage import StorageSettings

PrewarmSet = Literal["image", "video"]
FastPreset = Literal["lazy", "preload"]  # when the FP8 copy of the DiT linears is built


def _float_or_none(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(f"environment variable {name}={raw!r} is not a number", code="invalid_config") from None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker process needs to start.

    ``models_dir`` is the flat models folder (``/runpod-volume/models``); ``zimage_dir``
    / ``wan_dir`` are explicit folders, which, when set, are the only place a model is
    looked for. Otherwise :mod:`storystudio.models.locate` tries the flat folder, then
    RunPod's cached models, then the Hugging Face cache (``model_search``).
    ``prewarm`` lists the sets loaded and warmed up at start, in order; the warm-up
    shapes are those of the most common jobs (a 1024² image, a 480p landscape clip).
    """

    models_dir: Path
    zimage_dir: Path | None
    wan_dir: Path | None
    device: str
    vram_budget_gib: float | None
    vram_reserve_gib: float
    prewarm: tuple[PrewarmSet, ...]
    max_audio_seconds: float
    return_base64_max_kb: int
    fast_preset: FastPreset = "lazy"
    host_headroom_gib: float = 8.0
    model_search: ModelSearch = field(default_factory=ModelSearch)
    warmup_image: tuple[int, int] = (1024, 1024)  # width, height
    warmup_video: tuple[int, int, int] = (832, 480, 80)  # width, height, frames per clip
    inputs: InputLimits = field(default_factory=InputLimits)
    storage: StorageSettings | None = None
    video_path: VideoPathOptions = field(default_factory=VideoPathOptions)
    compile_cache_dir: Path | None = None  # None: <models_dir>/.torch-compile-cache
    job_timeout_s: float | None = None  # a batch's time budget (storystudio/deadline.py); None: no deadline

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        models = Path(env.get("STORYSTUDIO_MODELS_DIR") or DEFAULT_MODELS_DIR)
        raw = (env.get("STORYSTUDIO_PREWARM") or "none").strip().lower()
        prewarm = tuple(dict.fromkeys(p.strip() for p in raw.replace("both", "image,video").split(",") if p.strip()))
        if prewarm == ("none",):
            prewarm = ()
        if not set(prewarm) <= {"image", "video"}:
            raise InvalidInput(
                f"STORYSTUDIO_PREWARM must be none, image, video or both (image,video), not {raw!r}",
                code="invalid_config",
            )
        fast_preset = (env.get("STORYSTUDIO_FAST_PRESET") or "lazy").strip().lower()
        if fast_preset not in ("lazy", "preload"):
            raise InvalidInput(
                f"STORYSTUDIO_FAST_PRESET must be lazy or preload, not {fast_preset!r}", code="invalid_config"
            )
        reserve = _float_or_none(env, "STORYSTUDIO_VRAM_HEADROOM_GB")
        host_headroom = _float_or_none(env, "STORYSTUDIO_HOST_HEADROOM_GB")
        explicit_z = (env.get("STORYSTUDIO_ZIMAGE_DIR") or "").strip()
        explicit_w = (env.get("STORYSTUDIO_WAN_DIR") or "").strip()
        max_audio = _float_or_none(env, "STORYSTUDIO_MAX_AUDIO_SECONDS")
        b64 = _float_or_none(env, "STORYSTUDIO_RETURN_BASE64_MAX_KB")
        job_timeout = _float_or_none(env, "STORYSTUDIO_JOB_TIMEOUT_S")
        if job_timeout is not None and job_timeout <= 0:
            raise InvalidInput(f"STORYSTUDIO_JOB_TIMEOUT_S must be > 0 seconds, not {job_timeout:g}",
                               code="invalid_config")
        return cls(
            models_dir=models,
            zimage_dir=Path(explicit_z) if explicit_z else None,
            wan_dir=Path(explicit_w) if explicit_w else None,
            model_search=ModelSearch.from_env(env),
            host_headroom_gib=8.0 if host_headroom is None else host_headroom,
            device=(env.get("STORYSTUDIO_DEVICE") or "").strip() or _default_device(),
            vram_budget_gib=_float_or_none(env, "STORYSTUDIO_VRAM_BUDGET_GB"),
            vram_reserve_gib=1.5 if reserve is None else reserve,
            prewarm=prewarm,  # type: ignore[arg-type]
            max_audio_seconds=120.0 if max_audio is None else max_audio,
            return_base64_max_kb=2048 if b64 is None else int(b64),
            fast_preset=fast_preset,  # type: ignore[arg-type]
            inputs=InputLimits.from_env(env),
            storage=StorageSettings.from_env(env),
            video_path=VideoPathOptions.from_env(env),
            compile_cache_dir=Path(env.get("STORYSTUDIO_COMPILE_CACHE_DIR") or models / COMPILE_CACHE_DIRNAME),
            job_timeout_s=job_timeout,
        )
