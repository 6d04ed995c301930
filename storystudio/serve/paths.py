"""The two folders the service touches on a caller's behalf, and nothing outside them.

* :class:`MediaRoot` — ``image_path`` / ``audio_path`` of ``/generate/speech-to-video``
  name files on the server. They are read only from ``STORYSTUDIO_MEDIA_ROOT``
  (relative paths are taken from there; absolute ones must lie inside it), after
  resolving ``..`` and symlinks, so ``../../etc/passwd`` or a link pointing out of the
  folder is refused (``input_forbidden``). Without a media root, paths are refused.
* :class:`OutputFolder` — ``/videos`` lists and serves the worker's result files from
  ``STORYSTUDIO_OUTPUT_DIR`` (where :class:`~storystudio.storage.LocalStorage` writes
  them). A name is a storage key (``storystudio/jobs/<job>/video.mp4``): it must pass the
  storage's own key check (no ``..``, no leading dot, no backslash or NUL), end in
  ``.mp4`` or ``.png``, and resolve to a regular file inside the folder. The job
  database lives in a dot folder there and can never be served.

A path outside the folder is refused before the file system is asked whether it
exists, so the answers say nothing about files elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException

from storystudio.errors import InputFetchError, StorageError
from storystudio.inputs import InputLimits, Kind
from storystudio.serve.errors import INPUT_NOT_FOUND
from storystudio.serve.uploads import check_upload
from storystudio.storage import check_key

SERVED_TYPES = {".mp4": "video/mp4", ".png": "image/png"}
VIDEOS_ROUTE = "/videos"


def _inside(root: Path, path: Path) -> bool:
    return path == root or path.is_relative_to(root)


class MediaRoot:
    """Reads caller-named files from one folder, with the worker's size limit per kind."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser().resolve()

    def read(self, user_path: str, kind: Kind, limits: InputLimits, field: str) -> bytes:
        if self.root is None:
            raise InputFetchError(f"{field}: server file paths are disabled; the operator must set "
                                  "STORYSTUDIO_MEDIA_ROOT", code="input_forbidden")
        if not user_path or "\x00" in user_path:
            raise InputFetchError(f"{field}: empty or invalid path", code="input_forbidden")
        given = Path(user_path)
        candidate = given if given.is_absolute() else self.root / given
        lexical = Path(os.path.normpath(candidate))
        if not _inside(self.root, lexical):
            raise InputFetchError(f"{field}: {user_path!r} is outside the media root", code="input_forbidden")
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            raise InputFetchError(f"{field}: {user_path!r} does not exist under the media root",
                                  code=INPUT_NOT_FOUND) from None
        if not _inside(self.root, resolved):  # a symlink pointing out of the folder
            raise InputFetchError(f"{field}: {user_path!r} is outside the media root", code="input_forbidden")
        if not resolved.is_file():
            raise InputFetchError(f"{field}: {user_path!r} is not a file", code=INPUT_NOT_FOUND)
        size = resolved.stat().st_size
        if size > limits.max_bytes(kind):
            raise InputFetchError(f"{field}: the file is {size} bytes, over the limit of "
                                  f"{limits.max_bytes(kind)} bytes", code="input_too_large")
        return check_upload(resolved.read_bytes(), kind, limits, field)


class OutputFolder:
    """The worker's local result folder, as ``/videos`` exposes it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def url_path(self, key: str) -> str:
        return f"{VIDEOS_ROUTE}/{quote(key, safe='/')}"

    def public(self, result: Any, base_url: str) -> Any:
        """A copy of a worker result whose file URLs point at ``/videos``.

        The local storage backend reports a result's ``*_url`` as the absolute path on
        the server, which is no use to an HTTP client; every ``X_url`` that sits next to
        an ``X_key`` (``video_url``/``video_key``, a batch scene's ``image_url``/``image_key``)
        becomes ``<base_url>/videos/<key>``.
        """
        if isinstance(result, list):
            return [self.public(v, base_url) for v in result]
        if not isinstance(result, dict):
            return result
        out = {k: self.public(v, base_url) for k, v in result.items()}
        for k, v in result.items():
            if k.endswith("_key") and isinstance(v, str) and f"{k[:-4]}_url" in out:
                out[f"{k[:-4]}_url"] = base_url.rstrip("/") + self.url_path(v)
        return out

    def resolve(self, name: str) -> Path:
        """The file ``name`` names, or 400 (unsafe name) / 404 (no such result)."""
        try:
            check_key(name)
        except StorageError:
            raise HTTPException(400, "invalid filename: use a name listed by GET /videos") from None
        if "\\" in name:
            raise HTTPException(400, "invalid filename: use a name listed by GET /videos")
        suffix = Path(name).suffix.lower()
        if suffix not in SERVED_TYPES:
            raise HTTPException(400, f"invalid filename: only {', '.join(SERVED_TYPES)} results are served")
        try:
            resolved = (self.root / name).resolve(strict=True)
        except (OSError, RuntimeError):
            raise HTTPException(404, f"no result named {name!r}") from None
        if not _inside(self.root, resolved) or resolved == self.root or not resolved.is_file():
            raise HTTPException(404, f"no result named {name!r}")
        return resolved

    def media_type(self, path: Path) -> str:
        return SERVED_TYPES[path.suffix.lower()]

    def videos(self) -> list[dict[str, Any]]:
        """Every MP4 result, newest first: ``filename`` (the key), ``url``, ``size``, ``modified``."""
        found = []
        if not self.root.is_dir():
            return found
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                path = Path(folder) / name
                if name.startswith(".") or path.suffix.lower() != ".mp4" or path.is_symlink():
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = path.relative_to(self.root).as_posix()
                found.append({"filename": key, "url": self.url_path(key), "size": st.st_size,
                              "modified": round(st.st_mtime, 3)})
        found.sort(key=lambda v: (-v["modified"], v["filename"]))
        return found
