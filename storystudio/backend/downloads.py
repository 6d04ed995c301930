"""Results on disk: every scene's PNG and MP4 plus a ``result.json`` manifest in one folder.

Layout of the folder::

    DIR/result.json          the manifest (below)
    DIR/<scene_id>.png       the scene's generated image (scenes with a given image have none)
    DIR/<scene_id>.mp4       the scene's talking video

Scene ids pass through :func:`storystudio.storage.safe_part`, the rule the worker uses
for object keys, so a file name is always one safe path segment.

**Complete files are never fetched twice.** A file already in the folder counts as
complete when its size — and its SHA-256, when known — match what the worker reported
(``image_bytes``/``image_sha256``, ``bytes``/``sha256`` per scene) or, for results
without those fields, what the manifest recorded when the file was last downloaded.
Anything else (a truncated file, another render) is downloaded again. Downloads go to a
temporary file in the same folder, are checked against the expected size/hash (and the
``Content-Length``), and are renamed into place only when complete, so a partial file
never looks complete.

**The manifest** (``result.json``, version 1) holds the story's fingerprint (its input
with each local file replaced by its content hash, see
:meth:`storystudio.backend.media.LocalMedia.fingerprint`), the job's full result
(:meth:`StoryResult.to_dict`, with each scene's ``image_path``/``video_path``) and one
entry per file. It is written as soon as the job completes, before any download, and
again at the end. :class:`~storystudio.backend.studio.StoryStudio` reads it to resume:
an unchanged story whose previous job completed without scene errors is not rendered
again, only the missing files are fetched (the result URLs must still be valid:
presigned URLs live ``STORYSTUDIO_S3_PRESIGN_SECONDS`` on the worker, 7 days by
default). Note that those URLs are bearer links: keep the folder private.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import requests

from storystudio.inputs import describe_source
from storystudio.storage import safe_part

from .errors import BackendError, DownloadFailed
from .results import SceneResult, StoryResult

log = logging.getLogger(__name__)

MANIFEST_NAME = "result.json"
MANIFEST_VERSION = 1
FileKind = Literal["image", "video"]
_EXT: dict[str, str] = {"image": "png", "video": "mp4"}
_CHUNK = 1024 * 1024
_ATTEMPTS = 3


@dataclass(frozen=True)
class ResultFile:
    """One file to have on disk: where it comes from and what it must be."""

    scene_id: str
    kind: FileKind
    name: str
    url: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class FileState:
    """What :func:`download_file` did: ``skipped`` (already complete) or fetched."""

    file: ResultFile
    path: Path
    size: int
    sha256: str
    skipped: bool


def file_name(scene_id: str, kind: FileKind) -> str:
    return f"{safe_part(scene_id)}.{_EXT[kind]}"


def result_files(result: StoryResult, manifest: Manifest | None = None) -> list[ResultFile]:
    """The files of every scene that has them, with the size/hash they must have: from
    the worker's result, else from ``manifest``'s record of the same URL."""
    known = manifest.files if manifest is not None else {}
    files = []
    for scene in result.scenes:
        for kind, url in (("image", scene.image_url), ("video", scene.video_url)):
            if not url:
                continue
            name = file_name(scene.scene_id, kind)  # type: ignore[arg-type]
            size, digest = scene.expected(kind)
            record = known.get(name, {})
            if size is None and record.get("url") == url and record.get("complete"):
                size, digest = record.get("bytes"), record.get("sha256")
            files.append(ResultFile(scene.scene_id, kind, name, url, size, digest))  # type: ignore[arg-type]
    return files


def _hash(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def complete_state(path: Path, file: ResultFile) -> tuple[int, str] | None:
    """``(size, sha256)`` when ``path`` holds ``file`` completely, else ``None``. Without
    a known size nothing can be verified, so nothing counts as complete."""
    if file.size is None:
        return None
    try:
        if not path.is_file() or path.stat().st_size != file.size:
            return None
        size, digest = _hash(path)
    except OSError:
        return None
    if file.sha256 is not None and digest != file.sha256:
        return None
    return size, digest


class _Retry(Exception):
    pass


def _copy_to(fd: int, source, expected: int | None) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        for chunk in source:
            if not chunk:
                continue
            out.write(chunk)
            h.update(chunk)
            size += len(chunk)
            if expected is not None and size > expected:
                raise DownloadFailed(f"more bytes than the {expected} the worker reported")
        out.flush()
        os.fsync(out.fileno())
    return size, h.hexdigest()


def _fetch_once(session: requests.Session, file: ResultFile, fd: int, timeout: tuple[float, float]) -> tuple[int, str]:
    if file.url.startswith("/"):  # worker with local storage on a shared disk: the URL is the path
        try:
            with open(file.url, "rb") as src:
                return _copy_to(fd, iter(lambda: src.read(_CHUNK), b""), file.size)
        except OSError as exc:
            raise DownloadFailed(f"cannot read {file.url}: {exc.strerror or exc}") from None
    try:
        resp = session.get(file.url, stream=True, timeout=timeout, allow_redirects=True)
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise _Retry(f"{type(exc).__name__}") from None
    with resp:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retry(f"HTTP {resp.status_code}")
        if resp.status_code >= 400:
            hint = " (the URL may have expired: run the story again)" if resp.status_code in (401, 403) else ""
            raise DownloadFailed(f"HTTP {resp.status_code}{hint}")
        length = resp.headers.get("Content-Length")
        try:
            size, digest = _copy_to(fd, resp.iter_content(_CHUNK), file.size)
        except (requests.RequestException, OSError) as exc:
            raise _Retry(f"transfer broken: {type(exc).__name__}") from None
    if length is not None and length.isdigit() and int(length) != size:
        raise _Retry(f"got {size} of {length} bytes")
    return size, digest


def download_file(file: ResultFile, folder: Path, *, session: requests.Session | None = None,
                  timeout: tuple[float, float] = (10.0, 60.0), sleep: Callable[[float], None] = time.sleep) -> FileState:
    """Make ``folder/file.name`` hold ``file``: skip it when complete, else download it
    to a temporary file, verify it, and rename it into place."""
    target = folder / file.name
    state = complete_state(target, file)
    if state is not None:
        log.info("%s %s: %s already complete, not downloaded again", file.scene_id, file.kind, target)
        return FileState(file, target, state[0], state[1], skipped=True)
    session = session or requests.Session()
    where = f"{file.scene_id} {file.kind} from {describe_source(file.url)}"
    last = ""
    for attempt in range(1, _ATTEMPTS + 1):
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{file.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            size, digest = _fetch_once(session, file, fd, timeout)
            if file.size is not None and size != file.size:
                raise DownloadFailed(f"got {size} bytes, the worker reported {file.size}")
            if file.sha256 is not None and digest != file.sha256:
                raise DownloadFailed(f"SHA-256 {digest} differs from the worker's {file.sha256}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except _Retry as exc:
            last = str(exc)
            log.warning("downloading %s: %s (attempt %d/%d)", where, last, attempt, _ATTEMPTS)
            if attempt < _ATTEMPTS:
                sleep(0.5 * 2 ** (attempt - 1))
            continue
        except DownloadFailed as exc:
            raise DownloadFailed(f"downloading {where}: {exc.message}") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        log.info("%s %s: downloaded %d bytes to %s", file.scene_id, file.kind, size, target)
        return FileState(file, target, size, digest, skipped=False)
    raise DownloadFailed(f"downloading {where}: {last} after {_ATTEMPTS} attempts")


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """``result.json``: the story's fingerprint, the job's result and the file records."""

    result: StoryResult
    story_sha256: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": MANIFEST_VERSION, "story_sha256": self.story_sha256, "job_id": self.result.job_id,
                "project_id": self.result.project_id, "ok": self.result.ok,
                "result": self.result.to_dict(), "files": self.files}

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest in ``folder``, or ``None`` if there is none or it is unreadable."""
        path = folder / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != MANIFEST_VERSION:
                return None
            result = StoryResult.from_output(data["result"])
            files = data.get("files") or {}
            return cls(result, data.get("story_sha256"), dict(files) if isinstance(files, dict) else {})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, BackendError) as exc:
            log.warning("ignoring unreadable manifest %s: %s", path, exc)
            return None

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_NAME
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MANIFEST_NAME}.", suffix=".part")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)  # holds presigned URLs
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def _with_paths(result: StoryResult, folder: Path, done: dict[str, FileState]) -> StoryResult:
    scenes: list[SceneResult] = []
    for scene in result.scenes:
        img = done.get(file_name(scene.scene_id, "image"))
        vid = done.get(file_name(scene.scene_id, "video"))
        scenes.append(replace(scene, image_path=img.path if img else None, video_path=vid.path if vid else None))
    return replace(result, scenes=scenes, download_dir=folder)


def download_story(
    result: StoryResult,
    folder: Path | str,
    *,
    story_sha256: str | None = None,
    previous: Manifest | None = None,
    session: requests.Session | None = None,
    on_file: Callable[[FileState], None] | None = None,
) -> StoryResult:
    """Write every scene's PNG and MP4 and ``result.json`` to ``folder``; return the
    result with ``image_path``/``video_path`` set. Files already complete are skipped.
    Raises :class:`DownloadFailed` (after writing the manifest) when a file cannot be
    fetched; running again fetches only what is still missing."""
    folder = Path(folder).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadFailed(f"cannot create download folder {folder}: {exc.strerror or exc}") from None
    files = result_files(result, previous)
    manifest = Manifest(result, story_sha256, {
        f.name: {"scene_id": f.scene_id, "kind": f.kind, "url": f.url, "bytes": f.size, "sha256": f.sha256,
                 "complete": False} for f in files})
    manifest.write(folder)
    done: dict[str, FileState] = {}
    failures: list[str] = []
    session = session or requests.Session()
    try:
        for f in files:
            try:
                state = download_file(f, folder, session=session)
            except DownloadFailed as exc:
                failures.append(exc.message)
                log.error("%s", exc.message)
                continue
            done[f.name] = state
            manifest.files[f.name].update(bytes=state.size, sha256=state.sha256, complete=True)
            if on_file is not None:
                on_file(state)
    finally:
        final = _with_paths(result, folder, done)
        manifest.result = final
        manifest.write(folder)
    if failures:
        raise DownloadFailed(f"{len(failures)} of {len(files)} file(s) not downloaded "
                             f"(run again to fetch only those): " + "; ".join(failures[:3]))
    return final
