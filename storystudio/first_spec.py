"""The first specification's response names, added next to today's.

The story app's backend was written against the worker's first specification and
reads ``generation_time`` (image and video jobs), ``resolution`` (video jobs) and
each batch scene's ``id``. Results keep today's fields and gain these, computed
here from what the runners already return, so the runners stay free of naming
history and the names are added in one place. (The input side of the same story is
``FIRST_SPEC_ALIASES`` in :mod:`storystudio.tasks`.)
"""

from __future__ import annotations

from typing import Any

from storystudio.tasks import BatchTask, ImageTask, VideoParams, VideoTask

CUSTOM_RESOLUTION = "custom"


def resolution_label(params: VideoParams) -> str:
    """The size class a video was rendered in: the requested ``"480p"`` / ``"720p"``,
    or ``"custom"`` when ``max_area`` overrode it. The pixel size is ``width`` x ``height``.
    """
    return params.resolution if params.max_area is None else CUSTOM_RESOLUTION


def generation_time(result: dict[str, Any]) -> float:
    """Seconds this job spent producing its media: the sum of its ``timings`` sections.

    Image job: generate (including any model load or swap) + encode + upload.
    Video job: input downloads/decoding + audio preparation + generate (idem) + encode + upload.
    """
    return round(sum(result["timings"].values()), 3)


def add_first_spec_names(task: ImageTask | VideoTask | BatchTask, result: dict[str, Any]) -> dict[str, Any]:
    """Add the first specification's response fields to a runner's ``result`` (in place; returned)."""
    if isinstance(task, ImageTask):
        result["generation_time"] = generation_time(result)
    elif isinstance(task, VideoTask):
        result["generation_time"] = generation_time(result)
        result["resolution"] = resolution_label(task)
    else:
        result["scenes"] = [{"scene_id": s["scene_id"], "id": s["scene_id"], **s} for s in result["scenes"]]
    return result
