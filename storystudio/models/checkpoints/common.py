"""Pieces shared by the checkpoint validators and loaders of both model layouts.

The validators collect *every* problem in a folder before raising, so an operator
who copied half a model to the network volume sees the whole list at once instead
of fixing one file per cold start.
"""

from __future__ import annotations

import contextlib
import functools
import json
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from storystudio.errors import CheckpointError


# accelerate's ``init_empty_weights`` patches ``torch.nn.Module.register_parameter`` for the
# whole process while it is active: a module built meanwhile in another thread (a second
# worker's engine, transformers' wav2vec2) would silently get ``meta`` parameters. Engines
# build their modules under this one process-wide lock, and every use of the patch takes it
# too (:func:`empty_weights`): a validator building a meta DiT in one thread while another
# thread loads wav2vec2 made that load fail with "Cannot copy out of meta tensor".
_MODEL_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """accelerate's ``init_empty_weights``, held under the process-wide build lock."""
    from accelerate import init_empty_weights

    with _MODEL_BUILD_LOCK, init_empty_weights(include_buffers=include_buffers):
        yield


def serialized_build(fn):
    """Run ``fn`` (an engine's ``plan``/``from_pretrained``) while no other thread builds modules."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _MODEL_BUILD_LOCK:
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class Problems:
    """Accumulates missing/corrupt/mismatched files of one checkpoint folder."""

    root: Path
    what: str
    items: list[tuple[str, str]] = field(default_factory=list)  # (code, message)

    def missing(self, rel: str, hint: str = "") -> None:
        msg = f"missing file {self.root / rel}"
        self.items.append(("checkpoint_missing", msg + (f" ({hint})" if hint else "")))

    def corrupt(self, rel: str, why: str) -> None:
        self.items.append(("checkpoint_corrupt", f"corrupt file {self.root / rel}: {why}"))

    def mismatch(self, rel: str, why: str) -> None:
        self.items.append(("checkpoint_mismatch", f"mismatched file {self.root / rel}: {why}"))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        codes = {c for c, _ in self.items}
        # The most actionable code wins: a missing file beats a corrupt one.
        for code in ("checkpoint_missing", "checkpoint_corrupt", "checkpoint_mismatch"):
            if code in codes:
                break
        lines = "; ".join(m for _, m in self.items)
        raise CheckpointError(f"{self.what} checkpoint at {self.root} is not usable: {lines}", code=code)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header without reading tensor data.

    Raises ``ValueError`` with a short reason for truncated or garbled files, and
    checks that the data section is as long as the header says, which catches the
    common half-copied file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
            raise ValueError("header length out of range (not a safetensors file?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from exc
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: data needs {8 + n + end} bytes, file has {size}")
    return header


def read_json(path: Path) -> dict:
    """Load a JSON config file; raises ``ValueError`` with the reason when unreadable."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
