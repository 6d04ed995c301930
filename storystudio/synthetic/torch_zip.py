"""A streaming writer of ``torch.save``'s zip format, for synthetic checkpoints.

``torch.save`` needs the whole state dict in memory; a full-size synthetic T5 (11 GB)
should not. This writer pickles lightweight stand-ins that unpickle as tensors (built
with torch's private ``torch._utils._rebuild_tensor_v2``, which is exactly what
``torch.save`` emits) and then streams each tensor's bytes into its zip record as it
is produced. Test / bench tooling only: the worker never imports it.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch


class Spec(Protocol):
    """What the writers need to know of a tensor before it exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int: ...


def host_bytes(t: torch.Tensor):
    """A buffer of the tensor's bytes on the host (one tensor at a time)."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


class _StorageRef:
    """Stands for one storage in the pickle of a torch zip checkpoint."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles like a contiguous tensor over a :class:`_StorageRef` (torch.save's format)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


_STORAGE_TYPES = {torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage", torch.float32: "FloatStorage"}


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_torch_zip_streaming(path: Path, specs: Sequence[Spec], produce: Callable[[Spec], torch.Tensor]) -> int:
    """Write ``torch.save(state_dict)``'s zip format tensor by tensor.

    Loadable with ``torch.load(..., weights_only=True)`` (and ``mmap=True``: data records
    are 64-byte aligned like torch's own writer); CRCs are real, so ``unzip -t`` passes.
    """
    archive = path.name.rsplit(".", 1)[0]
    refs = collections.OrderedDict()
    for i, s in enumerate(specs):
        refs[s.name] = _TensorRef(_StorageRef(str(i), s.dtype, math.prod(s.shape)), s.shape)
    buf = io.BytesIO()
    _RefPickler(buf, protocol=2).dump(refs)
    tmp = path.with_name(path.name + ".part")
    total = 0
    with tmp.open("wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{archive}/data.pkl", buf.getvalue())
        zf.writestr(f"{archive}/byteorder", "little")
        for i, s in enumerate(specs):
            name = f"{archive}/data/{i}"
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            # Pad the local header's extra field so the data starts 64-byte aligned.
            start = raw.tell() + 30 + len(name.encode()) + 20 + 4  # +zip64 extra +pad-field header
            zi.extra = struct.pack("<HH", 0x4246, -start % 64) + b"Z" * (-start % 64)
            t = produce(s)
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise RuntimeError(f"{s.name}: produced {tuple(t.shape)} {t.dtype}, expected {s.shape} {s.dtype}")
            with zf.open(zi, "w", force_zip64=True) as f:
                f.write(host_bytes(t))
            total += s.nbytes
            del t
        zf.writestr(f"{archive}/version", "3\n")
    tmp.replace(path)
    return total
