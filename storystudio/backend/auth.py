"""RunPod API key handling: where the key comes from, and how it stays out of logs.

The key is read from exactly one place:

1. an explicit file (``--api-key-file PATH`` on the CLI, ``key_file=`` here), else
2. ``RUNPOD_API_KEY_FILE`` (path to a file holding the key, e.g. a mounted secret), or
3. ``RUNPOD_API_KEY`` (the key itself).

Setting both environment variables is an error (ambiguous). There is deliberately no
``--api-key VALUE`` option: command lines are visible to every user via ``ps``.

The key is wrapped in :class:`ApiKey`, whose ``str``/``repr`` are redacted; only
:meth:`ApiKey.reveal` returns it, and only the HTTP layer calls that to build the
``Authorization`` header. :func:`scrub` removes it from any text the client formats.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV_KEY = "RUNPOD_API_KEY"
ENV_KEY_FILE = "RUNPOD_API_KEY_FILE"

REDACTED = "***"


class ApiKey:
    """An API key that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        value = value.strip()
        if not value:
            raise ConfigError("the RunPod API key is empty")
        if any(c.isspace() for c in value):
            raise ConfigError("the RunPod API key contains whitespace")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ApiKey({REDACTED})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("ApiKey", self._value))

    def __reduce__(self):  # pragma: no cover - refuse to pickle the secret by accident
        raise TypeError("ApiKey cannot be pickled")


def _read_key_file(path: Path) -> ApiKey:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read API key file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API key file %s is readable by group/others; consider chmod 600", path)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ConfigError(
            f"API key file {path} must hold exactly one non-empty line (found {len(lines)})"
        )
    return ApiKey(lines[0])


def load_api_key(
    key_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> ApiKey:
    """Return the API key from ``key_file``, ``RUNPOD_API_KEY_FILE`` or ``RUNPOD_API_KEY``."""
    env = os.environ if env is None else env
    if key_file is not None:
        return _read_key_file(Path(key_file))
    raw = env.get(ENV_KEY, "")
    file_name = env.get(ENV_KEY_FILE, "")
    if raw.strip() and file_name.strip():
        raise ConfigError(f"set only one of {ENV_KEY} and {ENV_KEY_FILE}, not both")
    if file_name.strip():
        return _read_key_file(Path(file_name))
    if raw.strip():
        return ApiKey(raw)
    raise ConfigError(
        f"no RunPod API key: set {ENV_KEY}, or {ENV_KEY_FILE} / --api-key-file to a file holding it"
    )


def scrub(text: str, key: ApiKey | None) -> str:
    """``text`` with every occurrence of the key replaced by ``***``."""
    if key is None or not text:
        return text
    return text.replace(key.reveal(), REDACTED)
