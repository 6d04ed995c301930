"""Per-scene progress of a running story, reconstructed from the worker's progress updates.

The worker (``storystudio/batch.py`` through ``storystudio/progress.py``) sends
``{"stage": "images" | "swap" | "video_clips" | "videos", "done", "total",
"scene_id"?, "ok"?}`` while it runs, and ``{"stage": "scene_done", "scene_id", "image_url",
"video_url", "reused"}`` when a scene is finished (rendered, or reused by a resumed story, which
happens out of scene order, before the swap); RunPod's ``/status`` shows only the *latest*
one, so updates between two polls are lost. The tracker therefore infers from order:
the batch renders every image in scene order, then every video in scene order, so
an update about scene *k* means the scenes before it are through that phase. A scene
seen failing is ``failed``; one whose failure fell between polls shows ``done`` until
the final result, which :meth:`SceneTracker.finish` applies and which is always right.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

WAITING, IMAGE, IMAGE_READY, VIDEO, DONE, FAILED = "waiting", "image", "image ready", "video", "done", "failed"
_FINAL = (DONE, FAILED)


@dataclass(frozen=True)
class SceneProgress:
    """Where one scene is: ``state`` is one of ``waiting``, ``image`` (rendering),
    ``image ready`` (waiting for the video phase), ``video``, ``done``, ``failed``."""

    scene_id: str
    state: str = WAITING
    clips_done: int | None = None
    clips_total: int | None = None
    error_code: str | None = None

    @property
    def final(self) -> bool:
        return self.state in _FINAL

    def describe(self) -> str:
        if self.state == VIDEO and self.clips_total:
            return f"video clip {self.clips_done}/{self.clips_total}"
        if self.state == FAILED and self.error_code:
            return f"failed ({self.error_code})"
        return self.state


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class SceneTracker:
    """Folds progress outputs into one :class:`SceneProgress` per scene."""

    def __init__(self, scene_ids: Iterable[str]) -> None:
        self._order = [str(s) for s in scene_ids]
        self._index = {sid: i for i, sid in enumerate(self._order)}
        self._scenes = {sid: SceneProgress(sid) for sid in self._order}

    def snapshot(self) -> tuple[SceneProgress, ...]:
        return tuple(self._scenes[sid] for sid in self._order)

    def _set(self, sid: str, **changes: Any) -> None:
        self._scenes[sid] = replace(self._scenes[sid], **changes)

    def _earlier(self, sid: str) -> list[str]:
        return self._order[: self._index[sid]]

    def apply(self, output: Any) -> bool:
        """Apply one progress output; returns whether anything changed."""
        if not isinstance(output, Mapping):
            return False
        before = self.snapshot()
        stage = output.get("stage")
        sid = output.get("scene_id")
        sid = sid if isinstance(sid, str) and sid in self._index else None
        done = _int(output.get("done"))
        if stage == "images":
            if sid is not None:
                for other in self._earlier(sid):
                    if self._scenes[other].state in (WAITING, IMAGE):
                        self._set(other, state=IMAGE_READY)
                self._set(sid, state=FAILED if output.get("ok") is False else IMAGE_READY)
                nxt = self._index[sid] + 1
                if nxt < len(self._order) and self._scenes[self._order[nxt]].state == WAITING:
                    self._set(self._order[nxt], state=IMAGE)
            elif done == 0 and self._order and self._scenes[self._order[0]].state == WAITING:
                self._set(self._order[0], state=IMAGE)
        elif stage == "scene_done" and sid is not None:
            for other in self._order:  # every image is done before any scene is
                if self._scenes[other].state in (WAITING, IMAGE):
                    self._set(other, state=IMAGE_READY)
            self._set(sid, state=DONE, clips_done=None, clips_total=None)
        elif stage == "swap":
            for other in self._order:
                if self._scenes[other].state in (WAITING, IMAGE):
                    self._set(other, state=IMAGE_READY)
        elif stage in ("video_clips", "videos") and sid is not None:
            for other in self._order:
                if self._scenes[other].state in (WAITING, IMAGE):
                    self._set(other, state=IMAGE_READY)
            for other in self._earlier(sid):
                if not self._scenes[other].final:
                    self._set(other, state=DONE, clips_done=None, clips_total=None)
            if stage == "video_clips":
                self._set(sid, state=VIDEO, clips_done=done, clips_total=_int(output.get("total")))
            else:
                self._set(sid, state=FAILED if output.get("ok") is False else DONE,
                          clips_done=None, clips_total=None)
        return self.snapshot() != before

    def finish(self, scenes: Iterable[Any]) -> None:
        """Apply the final result (``SceneResult``-like objects: ``scene_id``, ``ok``,
        ``error``)."""
        for scene in scenes:
            if scene.scene_id not in self._scenes:
                continue
            if scene.ok:
                self._set(scene.scene_id, state=DONE, clips_done=None, clips_total=None, error_code=None)
            else:
                code = getattr(scene.error, "code", None)
                self._set(scene.scene_id, state=FAILED, clips_done=None, clips_total=None, error_code=code)
