"""Where a model's weight bytes are: tensor sources in safetensors and torch files, bound to a module.

The engines no longer read weights themselves. An engine loader builds its modules
on ``meta`` (architecture only, nothing allocated) and describes, for every weight,
where its bytes sit on disk: a :class:`FileSpan` (file, offset, length, stored dtype
and shape). The ModelManager then reads those spans straight into the component's
flat host/device buffers (:mod:`storystudio.models.weight_loader`). Describing
instead of reading is what lets the bytes land, once, in the page-locked parking
buffer the manager keeps for the component.

* safetensors: the JSON header gives each tensor's dtype, shape and byte range;
* torch zip files (``.pth``/``.bin`` saved by ``torch.save``): each storage is a stored
  (uncompressed) zip member, so its file offset is known from the zip directory. The
  state dict is opened with ``mmap=True`` (nothing read) and every storage is matched
  to its member; a file that does not map cleanly (views into shared storages,
  legacy pre-1.6 format) falls back to :class:`InMemory` sources;
* :class:`InMemory`: a CPU tensor already at hand (legacy files, buffers an
  ``__init__`` computed).

:func:`bind` checks sources against a module (unexpected, missing, wrong shape →
``checkpoint_mismatch``) and gives each covered tensor its target dtype on ``meta``.
A :class:`LoadPlan` is what an engine loader hands the ModelManager.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from storystudio.errors import CheckpointError

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class FileSpan:
    """One tensor's bytes in a file: ``nbytes`` from ``offset``, stored as ``dtype`` × ``shape``, C order."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InMemory:
    """A tensor already in host memory (copied, and converted if needed, into the flat buffer)."""

    tensor: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


TensorSource = Union[FileSpan, InMemory]


@dataclass
class LoadPlan:
    """What an engine loader returns to the ModelManager: an engine whose weights are still to be read.

    ``sources[component][tensor name]`` says where each tensor of ``engine.components()[component]``
    comes from (names as in ``named_parameters()`` / ``named_buffers()``). A component
    absent from ``sources`` already holds real weights (e.g. loaded by transformers) and
    is adopted as it is.
    """

    engine: Any
    sources: dict[str, dict[str, TensorSource]] = field(default_factory=dict)
    # Runs once the weights are on the device; components it adds to the engine are
    # adopted by the manager as part of the load (the fast preset's FP8 copy).
    after_load: Callable[[Any], None] | None = None

    def by_tensor(self) -> dict[int, TensorSource]:
        """The sources keyed by tensor identity (``id`` of the Parameter/buffer object).

        The manager lays components out by tensor, so an engine may report the same
        tensors grouped differently from the modules it named them in.
        """
        comps = self.engine.components()
        out: dict[int, TensorSource] = {}
        for cname, named in self.sources.items():
            module = comps[cname]
            tensors = dict(module.named_parameters(remove_duplicate=False))
            tensors.update(module.named_buffers(remove_duplicate=False))
            for name, src in named.items():
                out[id(tensors[name])] = src
        return out


# ----------------------------------------------------------------------------- safetensors


def safetensors_sources(path: Path, *, strip_prefix: str = "") -> dict[str, FileSpan]:
    """Every tensor of one safetensors file, keyed by name (``strip_prefix`` removed where present)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
            raise ValueError(f"{path.name}: header length out of range")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, FileSpan] = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = (int(x) for x in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
            raise ValueError(f"{path.name}: tensor {name} has an inconsistent or truncated byte range")
        key = name[len(strip_prefix) :] if strip_prefix and name.startswith(strip_prefix) else name
        out[key] = FileSpan(path, base + begin, end - begin, dtype, shape)
    return out


def sharded_safetensors_sources(folder: Path, stem: str, *, strip_prefix: str = "") -> dict[str, FileSpan]:
    """The tensors of ``<stem>.safetensors`` or of the shards its ``.index.json`` lists (diffusers/transformers layout)."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [f"{stem}.safetensors"]
    out: dict[str, FileSpan] = {}
    for name in files:
        out.update(safetensors_sources(folder / name, strip_prefix=strip_prefix))
    return out


# ----------------------------------------------------------------------------- torch files


def torch_file_sources(path: Path) -> dict[str, TensorSource]:
    """The tensors of a ``torch.save`` state dict, as file spans where the zip layout allows.

    The file is opened with ``mmap=True``: every storage then lives at ``mmap base +
    member offset``, and the one constant base is checked for every storage before any
    span is trusted. Anything that does not fit (a non-zip legacy file, a tensor that is
    a strided view or shares its storage) becomes an :class:`InMemory` source.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: InMemory(v) for k, v in _tensors(state, path).items()}
    members = _zip_data_members(path)
    state = _tensors(torch.load(path, map_location="cpu", mmap=True, weights_only=True), path)
    storages: dict[int, int] = {}  # data_ptr -> nbytes
    for t in state.values():
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    ptrs = sorted(p for p in storages if storages[p] > 0)
    sized = [m for m in members if m[1] > 0]
    base = None
    pairs = list(zip(ptrs, sized))
    if len(ptrs) == len(sized) and all(storages[p] == n for p, (_, n) in pairs):
        bases = {p - off for p, (off, _) in pairs}
        if len(bases) == 1:
            base = bases.pop()
    out: dict[str, TensorSource] = {}
    for k, t in state.items():
        s = t.untyped_storage()
        own = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == s.nbytes()
        if base is not None and own and s.nbytes() > 0:
            out[k] = FileSpan(path, s.data_ptr() - base, s.nbytes(), t.dtype, tuple(t.shape))
        else:
            out[k] = InMemory(t)
    return out


def _tensors(state: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise ValueError(f"{path.name} holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path.name}: entries that are not tensors: {bad[:3]}")
    return dict(state)


def _zip_data_members(path: Path) -> list[tuple[int, int]]:
    """``(data offset, size)`` of every stored ``*/data/<key>`` member, in file order."""
    out = []
    with zipfile.ZipFile(path) as zf, path.open("rb") as f:
        for zi in zf.infolist():
            parts = zi.filename.split("/")
            if len(parts) < 3 or parts[-2] != "data" or zi.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(zi.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path.name}: bad local header for {zi.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out.append((zi.header_offset + 30 + name_len + extra_len, zi.file_size))
    out.sort()
    return out


# ----------------------------------------------------------------------------- binding


def tensor_names(module: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter/buffer, grouped by tensor (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for n, t in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
    for n, t in module.named_buffers(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
    return names


def bind(
    module: nn.Module,
    sources: Mapping[str, TensorSource],
    *,
    what: str,
    where: str,
    dtype: torch.dtype | None = None,
    ignore: tuple[str, ...] = (),
) -> dict[str, TensorSource]:
    """Match ``sources`` to ``module``'s tensors; returns ``{canonical tensor name: source}``.

    Raises ``checkpoint_mismatch`` for a source the module has no tensor for (``ignore``
    lists names that may be skipped, e.g. an unused ``lm_head``), a tensor with the wrong
    shape, or a ``meta`` tensor no source covers. Covered floating-point tensors are set
    to ``dtype`` on ``meta`` (the dtype the engine runs in), the way the former
    ``load_state_dict(assign=True)`` of converted tensors did; ``None`` keeps the module's.
    The canonical name of a tensor is the first one ``named_parameters()`` /
    ``named_buffers()`` give; a source under a tied alias is accepted.
    """
    names = tensor_names(module)
    by_name: dict[str, torch.Tensor] = {}
    canonical: dict[int, str] = {}
    for n, t in list(module.named_parameters()) + list(module.named_buffers()):
        canonical.setdefault(id(t), n)
    for n, t in module.named_parameters(remove_duplicate=False):
        by_name[n] = t
    for n, t in module.named_buffers(remove_duplicate=False):
        by_name[n] = t
    unexpected = [k for k in sources if k not in by_name and k not in ignore]
    if unexpected:
        raise CheckpointError(
            f"{what}: unexpected tensors in {where}: {unexpected[:3]}", code="checkpoint_mismatch"
        )
    bound: dict[str, TensorSource] = {}
    for tid, tnames in names.items():
        src = next((sources[n] for n in tnames if n in sources), None)
        t = by_name[tnames[0]]
        if src is None:
            continue
        if tuple(src.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{what}: tensor {tnames[0]} in {where} has shape {list(src.shape)}, the model needs {list(t.shape)}",
                code="checkpoint_mismatch",
            )
        bound[canonical[tid]] = src
        target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        if t.is_meta and target != t.dtype:
            t.data = torch.empty(t.shape, dtype=target, device="meta")
    missing = [canonical[tid] for tid, tnames in names.items() if canonical[tid] not in bound and by_name[tnames[0]].is_meta]
    if missing:
        raise CheckpointError(
            f"{what}: {len(missing)} weights missing from {where} (e.g. {missing[0]})", code="checkpoint_mismatch"
        )
    return bound


def source_files(sources: Mapping[str, TensorSource]) -> list[Path]:
    """The files a component's sources read (to drop them from the page cache, or to report)."""
    return sorted({s.path for s in sources.values() if isinstance(s, FileSpan)})
