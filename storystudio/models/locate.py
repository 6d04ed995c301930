"""Where the model folders are: RunPod's cached models, a Hugging Face cache, or a flat folder.

A worker can find each model in one of three deployments, tried in this order:

1. an explicit folder (``STORYSTUDIO_ZIMAGE_DIR`` / ``STORYSTUDIO_WAN_DIR``) — when set,
   the only candidate;
2. the flat models folder, ``$STORYSTUDIO_MODELS_DIR/<name>`` (a network volume filled by
   ``storystudio-download``, or ``/models`` baked into the image);
3. RunPod's cached models: an endpoint configured with a Hugging Face model gets it at
   ``/runpod-volume/huggingface-cache/hub/models--<org>--<name>/snapshots/<rev>/``;
4. a standard Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``), same layout.

In a cache, the snapshot is the one ``refs/main`` names, else the only one, else the
newest. Snapshot files are symlinks into ``blobs/``; the loaders read through them.
Every candidate that exists is checked with the model's validator; the first valid
one wins, and a broken one on the way is logged (a half-copied volume next to a good
cache should not stop the worker). When none is valid, the error lists every
candidate and why it was refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from storystudio.errors import CheckpointError

logger = logging.getLogger(__name__)

DEFAULT_MODELS_DIR = "/runpod-volume/models"
CACHED_MODELS_HUB = Path("/runpod-volume/huggingface-cache/hub")


@dataclass(frozen=True)
class ModelRef:
    """One model the worker serves: its Hugging Face repository and how it is found and checked."""

    repo_id: str  # "<org>/<name>"
    folder: str  # name inside a flat models folder
    dir_env: str  # explicit-folder override
    validator: Callable[[Path], None]

    @property
    def cache_dirname(self) -> str:
        return "models--" + self.repo_id.replace("/", "--")


def _zimage_validator(path: Path) -> None:
    from storystudio.models.checkpoints.zimage import validate_zimage

    validate_zimage(path)


def _wan_validator(path: Path) -> None:
    from storystudio.models.checkpoints.wan_s2v import validate_wan_s2v

    validate_wan_s2v(path)


ZIMAGE = ModelRef("Tongyi-MAI/Z-Image-Turbo", "Z-Image-Turbo", "STORYSTUDIO_ZIMAGE_DIR", _zimage_validator)
WAN = ModelRef("Wan-AI/Wan2.2-S2V-14B", "Wan2.2-S2V-14B", "STORYSTUDIO_WAN_DIR", _wan_validator)


@dataclass(frozen=True)
class Candidate:
    kind: str  # "explicit" | "flat" | "runpod-cache" | "hf-cache"
    path: Path | None  # None: a cache without a usable snapshot
    note: str = ""  # why there is no path


@dataclass(frozen=True)
class Located:
    """A model folder that passed its validator."""

    path: Path
    kind: str


@dataclass(frozen=True)
class ModelSearch:
    """Where to look for the models besides an explicit folder."""

    models_dir: Path = Path(DEFAULT_MODELS_DIR)
    runpod_cache: Path = CACHED_MODELS_HUB
    hf_cache: Path = Path.home() / ".cache" / "huggingface" / "hub"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ModelSearch:
        return cls(models_dir=Path(env.get("STORYSTUDIO_MODELS_DIR") or DEFAULT_MODELS_DIR), hf_cache=hf_cache_dir(env))


def hf_cache_dir(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def snapshot_dir(cache: Path, ref: ModelRef) -> tuple[Path | None, str]:
    """The snapshot folder of ``ref`` in a hub cache: ``refs/main``'s, else the only or the newest one."""
    repo = cache / ref.cache_dirname
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None, f"no {snapshots}"
    main = repo / "refs" / "main"
    if main.is_file():
        rev = main.read_text().strip()
        if (snapshots / rev).is_dir():
            return snapshots / rev, ""
    found = [p for p in snapshots.iterdir() if p.is_dir()]
    if not found:
        return None, f"{snapshots} is empty"
    return max(found, key=lambda p: p.stat().st_mtime), ""


def candidates(ref: ModelRef, explicit: Path | None, search: ModelSearch) -> list[Candidate]:
    """The folders to try for ``ref``, in order (only the explicit one when it is given)."""
    if explicit is not None:
        return [Candidate("explicit", Path(explicit))]
    out = [Candidate("flat", search.models_dir / ref.folder)]
    seen: set[Path] = set()
    for kind, cache in (("runpod-cache", search.runpod_cache), ("hf-cache", search.hf_cache)):
        if cache in seen:
            continue
        seen.add(cache)
        path, note = snapshot_dir(cache, ref)
        out.append(Candidate(kind, path, note))
    return out


def locate(ref: ModelRef, explicit: Path | None = None, search: ModelSearch | None = None) -> Located:
    """The first valid folder of ``ref``; raises :class:`CheckpointError` listing every candidate tried."""
    search = search or ModelSearch.from_env(os.environ)
    tried: list[str] = []
    codes: list[str] = []
    for cand in candidates(ref, explicit, search):
        if cand.path is None:
            tried.append(f"{cand.kind}: {cand.note}")
            continue
        if not cand.path.is_dir():
            tried.append(f"{cand.kind}: {cand.path} does not exist")
            codes.append("checkpoint_missing")
            continue
        try:
            ref.validator(cand.path)
        except CheckpointError as exc:
            tried.append(f"{cand.kind}: {cand.path} is not usable ({exc.code}: {exc.message})")
            codes.append(exc.code)
            logger.warning("%s at %s (%s) is not usable: %s", ref.repo_id, cand.path, cand.kind, exc.message)
            continue
        logger.info("%s found at %s (%s)", ref.repo_id, cand.path, cand.kind)
        return Located(cand.path, cand.kind)
    # A damaged copy is more actionable than "not found anywhere".
    code = next((c for c in codes if c != "checkpoint_missing"), "checkpoint_missing")
    raise CheckpointError(f"{ref.repo_id} not found; tried: " + "; ".join(tried), code=code)
