"""A story's manifest: which scenes are finished, from which inputs, and where their files are.

A batch stores each scene's image and video as soon as they are done and rewrites
this JSON file (``<project>/<story>/manifest.json`` under the storage prefix) after
each of them, so a worker killed mid-batch loses at most the scene in flight: the
files and the record of what they were made from are already in the bucket.

A batch submitted with ``"resume": true`` stores under ``<project_id>/resume/`` (one
story per ``project_id``; see :func:`story_segment`) and reuses a scene's stored
image and video when the hashes of their inputs match the manifest's:

* the image's hash covers the scene's prompt, the batch's image settings and the
  scene's seed, or the given image's bytes;
* the video's hash covers the image's hash, the audio's bytes and trim, the pose
  video's bytes, the video prompt, the batch's video settings and the seed.

Media are hashed by their bytes, not their URLs: the same URL serving new audio
renders the scene again. A requested seed of ``null`` hashes as ``null``: the
reused scene keeps the random seed it was rendered with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from storystudio.errors import StorageError
from storystudio.storage import ObjectKey, Storage, make_key
from storystudio.tasks import BatchTask

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
RESUME_SEGMENT = "resume"  # the storage segment of a resumable story: <project_id>/resume/


def story_segment(task: BatchTask, job_id: str) -> str:
    """The second key segment of a batch's files: the job id, or ``resume`` for a resumable story.

    A resumed job has a new job id, so its files cannot live under it; the story is
    identified by the caller's ``project_id`` instead (scene hashes decide what is reused).
    """
    return RESUME_SEGMENT if task.resume else job_id


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(obj: Any) -> str:
    return sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def image_hash(task: BatchTask, index: int, given_image_sha256: str | None) -> str:
    """What scene ``index``'s picture is made from."""
    scene = task.scenes[index]
    if given_image_sha256 is not None:
        return _digest({"v": MANIFEST_VERSION, "image_sha256": given_image_sha256})
    return _digest({"v": MANIFEST_VERSION, "prompt": scene.prompt, "settings": task.image.model_dump(mode="json"),
                    "seed": task.scene_seed(index)})


def video_hash(task: BatchTask, index: int, image: str, audio_sha256: str, pose_sha256: str | None = None) -> str:
    """What scene ``index``'s video is made from (its picture's hash included)."""
    scene = task.scenes[index]
    return _digest({"v": MANIFEST_VERSION, "image": image, "audio_sha256": audio_sha256, "pose_sha256": pose_sha256,
                    "audio_start": scene.audio_start, "audio_duration": scene.audio_duration,
                    "prompt": scene.video_text, "settings": task.video.model_dump(mode="json"),
                    "seed": task.scene_seed(index)})


@dataclass
class Part:
    """One stored piece of a scene (its image or its video)."""

    hash: str
    key: ObjectKey  # relative to the storage prefix
    result: dict[str, Any]  # the scene's result fields for this piece, without URLs (they expire)

    def as_dict(self) -> dict[str, Any]:
        return {"hash": self.hash, "key": self.key, "result": self.result}


@dataclass
class Manifest:
    """The manifest of one story in storage; :meth:`record` rewrites it after each finished piece."""

    storage: Storage
    key: ObjectKey
    project_id: str
    job_id: str
    scenes: dict[str, dict[str, Part]] = field(default_factory=dict)

    @classmethod
    def open(cls, storage: Storage, task: BatchTask, job_id: str) -> Manifest:
        """The story's manifest: read back when resuming (a missing or unreadable one is empty)."""
        key = make_key(kind="manifest", job_id=story_segment(task, job_id), ext="json", project_id=task.project_id)
        manifest = cls(storage, key, task.project_id, job_id)
        if task.resume:
            raw = storage.get_bytes(key)
            if raw is not None:
                manifest.scenes = _parse(raw, key)
        return manifest

    def part(self, scene_id: str, kind: str, wanted_hash: str) -> Part | None:
        """The stored piece if it was made from the same inputs and its file is still there."""
        part = self.scenes.get(scene_id, {}).get(kind)
        if part is None or part.hash != wanted_hash:
            return None
        try:
            if not self.storage.exists(part.key):
                logger.warning("manifest %s lists %s of scene %s but %s is gone; rendering it again",
                               self.key, kind, scene_id, part.key)
                return None
        except StorageError as exc:
            logger.warning("cannot check %s of scene %s (%s); rendering it again", kind, scene_id, exc.message)
            return None
        return part

    def record(self, scene_id: str, kind: str, part: Part) -> None:
        """Add a finished piece and store the manifest at once (the crash-safety point)."""
        self.scenes.setdefault(scene_id, {})[kind] = part
        body = {
            "version": MANIFEST_VERSION,
            "project_id": self.project_id,
            "job_id": self.job_id,
            "updated_at": time.time(),
            "scenes": {sid: {k: p.as_dict() for k, p in parts.items()} for sid, parts in self.scenes.items()},
        }
        self.storage.put_bytes(self.key, json.dumps(body, indent=1, sort_keys=True).encode(), "application/json")


def _parse(raw: bytes, key: str) -> dict[str, dict[str, Part]]:
    try:
        body = json.loads(raw)
        if body.get("version") != MANIFEST_VERSION:
            logger.warning("manifest %s has version %r, not %d: nothing is reused", key, body.get("version"),
                           MANIFEST_VERSION)
            return {}
        return {sid: {kind: Part(p["hash"], ObjectKey(p["key"]), dict(p["result"])) for kind, p in parts.items()}
                for sid, parts in body["scenes"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("manifest %s is unreadable (%s): nothing is reused", key, exc)
        return {}
