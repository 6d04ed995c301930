"""The weight loader on real files: safetensors and torch zip spans, binding checks, and every fill mode.

Every test reads tensors back and compares them with what was written, bit for bit
(after the dtype conversion the engine asks for).
"""

from __future__ import annotations

import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from storystudio.errors import CheckpointError
from storystudio.models.host_memory import HostBuffer
from storystudio.models.weight_files import (
    FileSpan,
    InMemory,
    LoadPlan,
    bind,
    safetensors_sources,
    sharded_safetensors_sources,
    torch_file_sources,
)
from storystudio.models.weight_loader import Layout, StagingRing, _plan_pieces, fill, materialize


class Net(nn.Module):
    """Parameters of a few shapes, a tied pair and a buffer its __init__ computes (not in any file)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, width)
        self.proj = nn.Linear(width, width * 3)
        self.head = nn.Linear(width, 100, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("freqs", torch.arange(width, dtype=torch.float32) / width, persistent=False)
        self.register_buffer("steps", torch.arange(5, dtype=torch.int64))


def reference_state(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    net = Net()
    return {k: torch.randn(v.shape, generator=g).to(dtype) if v.is_floating_point() else v.clone()
            for k, v in net.state_dict().items() if k != "head.weight"}


def meta_net() -> Net:
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers real (like the engines' builders)
        net = Net()
    net.head.weight = net.emb.weight  # accelerate re-creates parameters on meta, which unties them: tie again
    return net


def assert_matches(module: Net, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for k, v in state.items():
        got = module.get_parameter(k) if k in dict(module.named_parameters()) else module.get_buffer(k)
        want = v.to(dtype) if v.is_floating_point() else v
        assert got.dtype == want.dtype and torch.equal(got, want), k
    assert module.head.weight is module.emb.weight
    assert torch.equal(module.freqs, torch.arange(48, dtype=torch.float32) / 48)


@pytest.fixture()
def st_file(tmp_path):
    state = reference_state()
    path = tmp_path / "net.safetensors"
    save_file(state, str(path))
    return path, state


# ----------------------------------------------------------------------------- sources


def test_safetensors_spans_hold_exactly_the_tensor_bytes(st_file):
    path, state = st_file
    sources = safetensors_sources(path)
    assert set(sources) == set(state)
    raw = path.read_bytes()
    for k, span in sources.items():
        assert isinstance(span, FileSpan) and span.shape == tuple(state[k].shape)
        data = bytearray(raw[span.offset : span.offset + span.nbytes])
        assert torch.equal(torch.frombuffer(data, dtype=span.dtype).reshape(span.shape), state[k])


def test_sharded_sources_follow_the_index_and_strip_a_prefix(tmp_path):
    state = reference_state()
    keys = sorted(state)
    save_file({f"model.{k}": state[k] for k in keys[:2]}, str(tmp_path / "m-1.safetensors"))
    save_file({f"model.{k}": state[k] for k in keys[2:]}, str(tmp_path / "m-2.safetensors"))
    index = {"weight_map": {f"model.{k}": ("m-1.safetensors" if i < 2 else "m-2.safetensors") for i, k in enumerate(keys)}}
    (tmp_path / "m.safetensors.index.json").write_text(__import__("json").dumps(index))
    sources = sharded_safetensors_sources(tmp_path, "m", strip_prefix="model.")
    assert set(sources) == set(keys)
    assert {s.path.name for s in sources.values()} == {"m-1.safetensors", "m-2.safetensors"}


def test_truncated_safetensors_is_refused(st_file):
    path, _ = st_file
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        safetensors_sources(path)


def test_torch_zip_members_become_file_spans(tmp_path):
    state = reference_state(dtype=torch.bfloat16)
    path = tmp_path / "net.pth"
    torch.save(state, path)
    sources = torch_file_sources(path)
    assert all(isinstance(s, FileSpan) for s in sources.values())
    with zipfile.ZipFile(path) as zf:
        assert all(zi.compress_type == zipfile.ZIP_STORED for zi in zf.infolist() if "/data/" in zi.filename)
    raw = path.read_bytes()
    for k, span in sources.items():
        data = bytearray(raw[span.offset : span.offset + span.nbytes])
        assert torch.equal(torch.frombuffer(data, dtype=span.dtype).reshape(span.shape), state[k]), k


def test_views_into_shared_storage_and_legacy_files_are_read_in_memory(tmp_path):
    base = torch.randn(10, 8)
    shared = {"a": base[:5], "b": base[5:], "c": torch.randn(3)}
    torch.save(shared, tmp_path / "views.pth")
    sources = torch_file_sources(tmp_path / "views.pth")
    assert isinstance(sources["a"], InMemory) and isinstance(sources["b"], InMemory)
    assert isinstance(sources["c"], FileSpan)
    assert torch.equal(sources["b"].tensor, base[5:])
    torch.save({"w": torch.randn(4, 4)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = torch_file_sources(tmp_path / "legacy.pth")
    assert isinstance(legacy["w"], InMemory) and legacy["w"].shape == (4, 4)


# ----------------------------------------------------------------------------- bind


def test_bind_retypes_meta_tensors_and_accepts_a_tied_alias(st_file):
    path, state = st_file
    net = meta_net()
    sources = safetensors_sources(path)
    sources["head.weight"] = sources.pop("emb.weight")  # the file names the tied tensor by its other name
    bound = bind(net, sources, what="Net", where="net.safetensors", dtype=torch.bfloat16)
    assert set(bound) == {"emb.weight", "proj.weight", "proj.bias", "steps"}
    assert net.proj.weight.is_meta and net.proj.weight.dtype == torch.bfloat16
    assert net.steps.dtype == torch.int64, "integer buffers keep their dtype"
    assert net.freqs.dtype == torch.float32 and not net.freqs.is_meta, "uncovered real buffers are left alone"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(extra=s["proj.bias"]), "unexpected tensors in net.safetensors: \\['extra'\\]"),
        (lambda s: s.pop("proj.weight"), "1 weights missing from net.safetensors \\(e.g. proj.weight\\)"),
        (lambda s: s.update({"proj.bias": s["emb.weight"]}), "tensor proj.bias in net.safetensors has shape"),
    ],
)
def test_bind_names_what_does_not_fit(st_file, edit, message):
    path, _ = st_file
    sources = safetensors_sources(path)
    edit(sources)
    with pytest.raises(CheckpointError, match=message) as ei:
        bind(meta_net(), sources, what="Net", where="net.safetensors")
    assert ei.value.code == "checkpoint_mismatch"


# ----------------------------------------------------------------------------- pieces and fill


def test_pieces_cover_every_tensor_once_and_never_cross_a_chunk(st_file):
    path, _ = st_file
    net = meta_net()
    bound = bind(net, safetensors_sources(path), what="Net", where="x")
    layout = Layout(net)
    sources = layout.complete(bound)
    for chunks in (layout.host_chunks(), [(a, min(a + 512, layout.nbytes)) for a in range(0, layout.nbytes, 512)]):
        per_chunk = _plan_pieces(layout, sources, chunks, block=1000)
        covered = {s.name: 0 for s in layout.slots}
        for (a, b), pieces in zip(chunks, per_chunk):
            for p in pieces:
                assert a <= p.dst and p.dst + p.nbytes <= b
                assert p.nbytes <= 1000 and p.nbytes % p.slot.dtype.itemsize == 0
                covered[p.slot.name] += p.e1 - p.e0
        assert covered == {s.name: s.tensor.numel() for s in layout.slots}


@pytest.mark.parametrize("mode", ["direct", "host", "ring"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fill_reads_the_files_into_one_flat_buffer(st_file, mode, dtype, monkeypatch):
    path, state = st_file
    net = meta_net()
    layout_sources = bind(net, safetensors_sources(path), what="Net", where="x", dtype=dtype)
    layout = Layout(net)
    sources = layout.complete(layout_sources)
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    pinned: list[int] = []
    monkeypatch.setattr(HostBuffer, "pin_chunk", lambda self, i: pinned.append(i) or True)
    # chunk boundaries between tensors, as plan_chunks makes them, small enough for several chunks
    host = HostBuffer("net", layout.nbytes, _tensor_aligned(layout, 2048)) if mode == "host" else None
    ring = StagingRing(slots=2, slot_bytes=1024, pin=False) if mode == "ring" else None
    stats = fill(layout, sources, flat, host=host, pin=True, ring=ring, threads=4, block_bytes=512)
    assert stats.file_bytes == sum(s.nbytes for s in safetensors_sources(path).values())
    layout.point(flat)
    assert_matches(net, state, dtype)
    if host is not None:
        assert sorted(pinned) == list(range(len(host.chunks))) and len(host.chunks) > 1
        assert all(torch.equal(host.tensor[s.offset : s.offset + s.nbytes], flat[s.offset : s.offset + s.nbytes])
                   for s in layout.slots), "the parking buffer holds the same bytes as the device buffer"


def _tensor_aligned(layout: Layout, chunk: int) -> list[tuple[int, int]]:
    from storystudio.models.host_memory import plan_chunks

    return plan_chunks(layout.ranges(), layout.nbytes, chunk_bytes=chunk)


def test_a_file_that_shrank_after_planning_fails_the_read(st_file):
    path, _ = st_file
    net = meta_net()
    layout_sources = bind(net, safetensors_sources(path), what="Net", where="x")
    layout = Layout(net)
    sources = layout.complete(layout_sources)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OSError, match="unexpected end of file"):
        fill(layout, sources, torch.empty(layout.nbytes, dtype=torch.uint8), threads=2)


def test_materialize_builds_flat_views_on_the_device(st_file):
    path, state = st_file

    class Engine:
        def __init__(self) -> None:
            self.net = meta_net()

        def components(self):
            return {"net": self.net}

    engine = Engine()
    plan = LoadPlan(engine, {"net": bind(engine.net, safetensors_sources(path), what="Net", where="x")})
    materialize(plan, torch.device("cpu"), threads=3)
    assert_matches(engine.net, state, torch.float32)
    ptrs = sorted(p.data_ptr() for p in engine.net.parameters())
    assert ptrs[-1] - ptrs[0] < Layout(engine.net).nbytes, "every tensor is a view into one flat buffer"
