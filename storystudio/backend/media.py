"""Local media files named in a story: find them, hash them, swap them for URLs or data URIs.

A story app keeps its narration (TTS output) and often its reference images as local
files. In a story, each media field — a scene's ``audio``, ``image`` and
``pose_video``, a video job's ``image``, ``audio`` and ``pose_video`` (and the
``audio_url``/``image_url`` spellings) — may name one:

* ``file:///abs/path.wav`` (or ``file:rel/path.wav``, relative to the story file);
* an absolute path, ``~/path``, or a path relative to the story file's folder (for a
  story given as a mapping: ``base_dir``, default the current folder).

Everything else is left for the worker: ``http(s)://`` URLs, ``data:`` URIs, other
schemes (which the worker refuses) and raw base64. A value that names no existing
file is raw base64 only if every character is in the base64 alphabet; anything else
(a ``.``, a space, ``~``...) is a path, and a missing one is a
:class:`~storystudio.backend.errors.LocalMediaError` naming the field and the path,
rather than a confusing ``input_invalid_base64`` from the worker later.

Each file is read once and hashed (SHA-256). :meth:`LocalMedia.substitute` then builds
the input that is sent, with every reference replaced by what a callback returns for
its file (a presigned URL of the uploaded copy, or a ``data:`` URI), and
:meth:`LocalMedia.fingerprint` identifies the story *with the content of its files*,
so a re-run of an unchanged story can be recognised without uploading anything.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import mimetypes
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from .errors import LocalMediaError
from .story import Story

Kind = Literal["image", "audio", "video"]

#: Job fields that carry media, and the kind of each (the worker's size caps and the
#: fallback content type follow the kind). ``*_url`` are the first specification's names.
MEDIA_FIELDS: dict[str, Kind] = {
    "image": "image",
    "image_url": "image",
    "audio": "audio",
    "audio_url": "audio",
    "pose_video": "video",
}
_FALLBACK_TYPE: dict[Kind, str] = {"image": "image/png", "audio": "audio/mpeg", "video": "video/mp4"}
_PASS_THROUGH = ("http://", "https://", "data:")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")  # 2+ letters: "C:\..." is not a scheme
_BASE64_ONLY = re.compile(r"^[A-Za-z0-9+/=_\-\s]*$")
_EXT = re.compile(r"^[a-z0-9]{1,10}$")
_MAX_PATH = 4096
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class MediaRef:
    """One media field of the input that names a local file."""

    location: tuple[str | int, ...]  # keys into the job input, e.g. ("scenes", 0, "audio")
    kind: Kind
    path: Path

    @property
    def field(self) -> str:
        """``scenes[0].audio``: how worker messages name the field."""
        out = ""
        for part in self.location:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out


@dataclass(frozen=True)
class LocalFile:
    """A local media file, read once: size, SHA-256, content type, extension."""

    path: Path
    size: int
    sha256: str
    content_type: str
    ext: str

    def read(self) -> bytes:
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise LocalMediaError(f"local file {self.path} changed while the story was being prepared")
        return data

    @property
    def data_uri_length(self) -> int:
        """Length of :meth:`data_uri` without reading the file (base64: 4 chars per 3 bytes)."""
        return len(f"data:{self.content_type};base64,") + 4 * ((self.size + 2) // 3)

    def data_uri(self) -> str:
        return f"data:{self.content_type};base64," + base64.b64encode(self.read()).decode("ascii")


def local_path(value: str, base_dir: Path, *, field: str = "input") -> Path | None:
    """The local file ``value`` names, or ``None`` when it is for the worker (URL, data
    URI, other scheme, raw base64). See the module docstring for the rules."""
    s = value.strip()
    low = s[:8].lower()
    if low.startswith(_PASS_THROUGH):
        return None
    if low.startswith("file:"):
        parts = urlsplit(s)
        if parts.netloc not in ("", "localhost"):
            raise LocalMediaError(f"{field}: file: URL {s!r} names another host; only local files can be sent")
        candidate = Path(url2pathname(unquote(parts.path)))
        return _existing(candidate if candidate.is_absolute() else base_dir / candidate, field, s)
    if _SCHEME.match(s):
        return None
    if not s or len(s) > _MAX_PATH or "\n" in s or "\0" in s:
        return None
    candidate = Path(s).expanduser()
    candidate = candidate if candidate.is_absolute() else base_dir / candidate
    try:
        exists = candidate.exists()
    except OSError:  # e.g. a name too long for the file system: base64
        exists = False
    if exists:
        return _existing(candidate, field, s)
    if _BASE64_ONLY.fullmatch(s):
        return None
    raise LocalMediaError(f"{field}: local file not found: {candidate} (from {s!r})")


def _existing(path: Path, field: str, given: str) -> Path:
    if not path.exists():
        raise LocalMediaError(f"{field}: local file not found: {path} (from {given!r})")
    if not path.is_file():
        raise LocalMediaError(f"{field}: {path} is not a regular file")
    return path.resolve()


def _media_slots(job_input: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], Kind, Any]]:
    """``(location, kind, value)`` of every media field: the scenes' for a batch (its
    top-level ``image`` is the image *settings*), the top level's for single jobs."""
    if job_input.get("task") == "batch":
        scenes = job_input.get("scenes")
        for i, scene in enumerate(scenes if isinstance(scenes, list) else []):
            if isinstance(scene, dict):
                for name, kind in MEDIA_FIELDS.items():
                    if name in scene:
                        yield ("scenes", i, name), kind, scene[name]
        return
    for name, kind in MEDIA_FIELDS.items():
        if name in job_input:
            yield (name,), kind, job_input[name]


def local_references(story: Story) -> list[MediaRef]:
    """The media fields of ``story`` that name local files (nothing is read)."""
    refs: list[MediaRef] = []
    for location, kind, value in _media_slots(story.job_input):
        if isinstance(value, str):
            path = local_path(value, story.base_dir, field=MediaRef(location, kind, Path()).field)
            if path is not None:
                refs.append(MediaRef(location, kind, path))
    return refs


def hash_file(path: Path) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise LocalMediaError(f"cannot read local file {path}: {exc.strerror or exc}") from None
    return size, h.hexdigest()


def _describe_file(path: Path, kind: Kind) -> LocalFile:
    size, digest = hash_file(path)
    if size == 0:
        raise LocalMediaError(f"local file {path} is empty")
    ext = path.suffix.lower().lstrip(".")
    if not _EXT.fullmatch(ext):
        ext = "bin"
    content_type = mimetypes.guess_type(path.name)[0] or _FALLBACK_TYPE[kind]
    return LocalFile(path, size, digest, content_type, ext)


@dataclass(frozen=True)
class LocalMedia:
    """The local files a story names (``refs``), each read and hashed once (``files``)."""

    refs: tuple[MediaRef, ...]
    files: dict[Path, LocalFile]

    @classmethod
    def scan(cls, story: Story) -> LocalMedia:
        """Find and hash every local file ``story`` names."""
        refs = local_references(story)
        files: dict[Path, LocalFile] = {}
        for ref in refs:
            if ref.path not in files:
                files[ref.path] = _describe_file(ref.path, ref.kind)
        return cls(tuple(refs), files)

    def __bool__(self) -> bool:
        return bool(self.refs)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def file(self, ref: MediaRef) -> LocalFile:
        return self.files[ref.path]

    def substitute(self, job_input: dict[str, Any], value_for: Callable[[LocalFile], str]) -> dict[str, Any]:
        """A copy of ``job_input`` with every reference replaced by ``value_for(file)``
        (called once per distinct file)."""
        out = copy.deepcopy(job_input)
        cache: dict[Path, str] = {}
        for ref in self.refs:
            if ref.path not in cache:
                cache[ref.path] = value_for(self.files[ref.path])
            target: Any = out
            for part in ref.location[:-1]:
                target = target[part]
            target[ref.location[-1]] = cache[ref.path]
        return out

    def fingerprint(self, job_input: dict[str, Any]) -> str:
        """SHA-256 of the input with each local reference replaced by its content hash:
        equal for the same story and the same file contents, wherever the files are."""
        canonical = self.substitute(job_input, lambda f: f"sha256:{f.sha256}")
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
