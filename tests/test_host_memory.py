"""Page-locked host buffers without a GPU: registration lifetime, errors by name, no error left behind.

The CUDA driver is replaced by fakes with its semantics (a range overlapping a live
registration is refused with 712, unregistering wants the pointer that was registered),
so what broke the GPU tests on the H100 (issue 13) is checked here: buffers freed while
still registered, a second manager in the same process, errors logged as ``cudaError.???``
and a failed registration leaving an error for PyTorch to raise later.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading

import pytest
import torch

from storystudio.models import cuda_host_register, host_memory
from storystudio.models.cuda_host_register import CudaResult, DriverRegistrar
from storystudio.models.host_memory import HostBuffer, plan_chunks, registered_bytes
from storystudio.models.model_manager import GiB, ModelManager
from storystudio.models.weight_loader import Layout, fill
from storystudio.models.weight_files import InMemory
from tests.test_model_manager import MiB, FakeEngine

OK = CudaResult(0, "CUDA_SUCCESS")
ALREADY = CudaResult(712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
                     "part or all of the requested memory range is already mapped")
NOT_REGISTERED = CudaResult(713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region")


class FakeDriver:
    """``cuMemHostRegister`` semantics: an overlap with a live registration is 712; unregister needs its pointer."""

    def __init__(self, fail: CudaResult | None = None) -> None:
        self.live: dict[int, tuple[int, int]] = {}  # ptr -> (bytes, device index)
        self.calls: list[tuple[str, int, int, str]] = []  # (call, ptr, device index, thread name)
        self.fail = fail
        self.refused = 0  # 712 answers
        self._lock = threading.Lock()

    def register(self, ptr: int, nbytes: int, device_index: int) -> CudaResult:
        with self._lock:
            self.calls.append(("register", ptr, device_index, threading.current_thread().name))
            if self.fail is not None:
                return self.fail
            if any(ptr < p + n and p < ptr + nbytes for p, (n, _) in self.live.items()):
                self.refused += 1
                return ALREADY
            self.live[ptr] = (nbytes, device_index)
            return OK

    def unregister(self, ptr: int, device_index: int) -> CudaResult:
        with self._lock:
            self.calls.append(("unregister", ptr, device_index, threading.current_thread().name))
            if self.live.pop(ptr, None) is None:
                return NOT_REGISTERED
            return OK

    def live_bytes(self) -> int:
        return sum(n for n, _ in self.live.values())


@pytest.fixture
def driver(monkeypatch) -> FakeDriver:
    """The fake stands in for the process's driver registrar (what ModelManager's buffers use)."""
    fake = FakeDriver()
    monkeypatch.setattr(cuda_host_register, "driver", lambda: fake)
    yield fake
    gc.collect()


def _buffer(nbytes: int = 8 * MiB, chunk: int = 2 * MiB, **kw) -> HostBuffer:
    return HostBuffer("t.comp", nbytes, plan_chunks([(a, a + chunk) for a in range(0, nbytes, chunk)], nbytes,
                                                   chunk_bytes=chunk), **kw)


def test_a_buffer_freed_without_release_unregisters_before_its_memory_is_unmapped(driver):
    """The H100 failure: buffers went away still registered, so new memory mapped at their addresses could not
    be registered (712) and device allocations failed (cudaErrorAlreadyMapped)."""
    buf = _buffer()
    buf.pin()
    assert driver.live_bytes() == 8 * MiB == registered_bytes() == buf.pinned_bytes
    view = buf.tensor[MiB : 2 * MiB]  # a parked parameter: a view keeps the memory (and its pinning) alive
    del buf
    gc.collect()
    assert driver.live_bytes() == 8 * MiB, "unregistered while a tensor still views the memory"
    del view
    gc.collect()
    assert driver.live == {} and registered_bytes() == 0
    again = _buffer()  # may be mapped at the same address: registers cleanly
    again.pin()
    assert again.pinned_bytes == 8 * MiB


def test_release_unregisters_every_chunk_once_and_keeps_the_memory(driver):
    buf = _buffer()
    buf.tensor.fill_(7)
    buf.pin()
    buf.pin()  # pinned twice: no second registration of the same ranges
    assert sum(c[0] == "register" for c in driver.calls) == 4
    buf.release()
    assert driver.live == {} and registered_bytes() == 0 and buf.pinned_bytes == 0
    assert int(buf.tensor[5 * MiB]) == 7, "release gives back the pinning, not the memory"
    buf.release()
    assert sum(c[0] == "unregister" for c in driver.calls) == 4


def test_a_failed_registration_is_logged_by_name_and_leaves_the_chunk_pageable(monkeypatch, caplog):
    """The log said ``cudaHostRegister error cudaError.???``: torch's cudart enum names only ``success``."""
    fake = FakeDriver(fail=CudaResult(2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"))
    buf = _buffer(registrar=fake, device=torch.device("cuda", 0))
    with caplog.at_level(logging.WARNING, logger="storystudio.models.host_memory"):
        buf.pin()
    assert buf.pinned_bytes == 0 and registered_bytes() == 0
    assert sum(c[0] == "register" for c in fake.calls) == 1, "a resource failure stops pinning the other chunks"
    assert "CUDA_ERROR_OUT_OF_MEMORY (2): out of memory" in caplog.text and "???" not in caplog.text
    buf.copy_to(out := torch.empty(buf.nbytes, dtype=torch.uint8))  # still usable, pageable
    assert torch.equal(out, buf.tensor)


def test_a_range_someone_else_registered_is_named_skipped_and_never_unregistered_here(caplog):
    fake = FakeDriver()
    buf = _buffer(registrar=fake, device=torch.device("cuda", 0))
    stale = buf.tensor.data_ptr() + 2 * MiB + 4096  # a stale registration inside chunk 1
    fake.live[stale] = (4096, 0)
    with caplog.at_level(logging.WARNING, logger="storystudio.models.host_memory"):
        buf.pin()
    assert buf.pinned_bytes == 6 * MiB, "the other chunks are still pinned"
    assert "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED (712)" in caplog.text
    buf.release()
    assert fake.live == {stale: (4096, 0)}, "a registration this buffer does not own is left alone"
    assert registered_bytes() == 0


def test_a_registration_the_driver_keeps_keeps_its_memory_mapped(caplog):
    """Unmapping memory that is still registered is what poisons later allocations: such a mapping is kept."""

    class Stubborn(FakeDriver):
        def unregister(self, ptr, device_index):
            return CudaResult(999, "CUDA_ERROR_UNKNOWN", "unknown error")

    fake = Stubborn()
    buf = _buffer(registrar=fake, device=torch.device("cuda", 0))
    buf.pin()
    mapping = buf._mapping
    quarantined = len(host_memory._quarantine)
    del buf, mapping
    with caplog.at_level(logging.WARNING, logger="storystudio.models.host_memory"):
        gc.collect()
    assert len(host_memory._quarantine) == quarantined + 1 and not host_memory._quarantine[-1].closed
    assert "CUDA_ERROR_UNKNOWN (999)" in caplog.text
    host_memory._quarantine[-1].registrations.clear()  # the test's own bookkeeping: forget the fake's ranges
    for ptr in list(fake.live):
        host_memory._live.pop(ptr, None)


def test_chunks_pinned_by_reader_threads_use_the_buffers_device(driver):
    """The loader pins from its reader threads: the registration goes to the buffer's device, not the thread's."""
    module = torch.nn.Module()
    for i in range(8):
        module.register_parameter(f"w{i}", torch.nn.Parameter(torch.empty(4096, device="meta"), requires_grad=False))
    layout = Layout(module)
    values = {f"w{i}": InMemory(torch.full((4096,), float(i))) for i in range(8)}
    host = HostBuffer("x.m", layout.nbytes, plan_chunks(layout.ranges(), layout.nbytes, chunk_bytes=2 * 16384),
                      device=torch.device("cuda", 3))
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    fill(layout, layout.complete(values), flat, host=host, pin=True, threads=4, block_bytes=4096)
    regs = [c for c in driver.calls if c[0] == "register"]
    assert len(regs) == len(host.chunks) == 4 and {c[2] for c in regs} == {3}
    assert any(c[3].startswith("weights") for c in regs), "pinned by the reader threads"
    assert host.pinned_bytes == layout.nbytes == 8 * 4096 * 4


def _manager(**kw) -> ModelManager:
    mgr = ModelManager("cpu", budget_gib=60 * MiB / GiB, pin_memory=True, **kw)
    mgr.register("a", lambda d: FakeEngine(d, {"big": 40, "small": 2}, 1))
    mgr.register("b", lambda d: FakeEngine(d, {"big": 30}, 2), size_hint_bytes=30 * MiB)
    return mgr


def test_close_unregisters_every_parking_buffer_and_a_new_manager_pins_cleanly(driver):
    """The GPU tests make one manager after another in one process."""
    mgr = _manager()
    a = mgr.ensure("a")
    s = a.checksum()
    mgr.ensure("b")
    assert registered_bytes() > 70 * MiB and driver.live_bytes() == registered_bytes()
    mgr.close()
    assert driver.live == {} and registered_bytes() == 0
    assert not mgr.is_loaded("a") and mgr.component_residency() == {}
    assert all(p.is_meta for m in a.components().values() for p in m.parameters()), "the closed set's weights are gone"
    second = _manager()
    assert second.ensure("a").checksum() == s
    second.ensure("b")
    assert driver.refused == 0, "a range was registered twice"
    assert registered_bytes() == driver.live_bytes() > 70 * MiB
    second.close()
    assert registered_bytes() == 0


def test_a_manager_dropped_without_close_leaves_nothing_registered(driver):
    mgr = _manager()
    mgr.ensure("a")
    mgr.ensure("b")
    assert registered_bytes() > 0
    del mgr
    gc.collect()
    assert driver.live == {} and registered_bytes() == 0


def test_a_failed_load_unregisters_what_it_pinned(driver):
    mgr = ModelManager("cpu", budget_gib=60 * MiB / GiB, pin_memory=True)
    engine = FakeEngine(torch.device("cpu"), {"first": 4}, 1)
    engine.mods["second"] = torch.nn.Linear(4, 4, device="meta")  # no sources: the load fails after "first"
    mgr.register("x", lambda d: engine)
    with pytest.raises(ValueError, match="meta tensors"):
        mgr.ensure("x")
    assert any(c[0] == "register" for c in driver.calls), "the first component was pinned"
    assert driver.live == {} and registered_bytes() == 0


class FakeLibcuda:
    """The few ``libcuda.so.1`` entry points DriverRegistrar calls; a current-context stack per thread."""

    NAMES = {712: (b"CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", b"part or all of the requested memory range is already mapped")}

    def __init__(self, register_rc: int = 0) -> None:
        local = threading.local()
        self.log: list[tuple] = []

        def stack() -> list[int]:
            if not hasattr(local, "stack"):
                local.stack = []
            return local.stack

        def fn(f):
            def call(*args):
                return f(*args)
            return call

        def set_out(ref, value):
            ref._obj.value = value
            return 0

        self.cuInit = fn(lambda flags: 0)
        self.cuDeviceGet = fn(lambda out, ordinal: set_out(out, ordinal))
        self.cuDevicePrimaryCtxRetain = fn(lambda out, dev: set_out(out, 0x1000 + dev))
        self.cuCtxGetCurrent = fn(lambda out: set_out(out, stack()[-1] if stack() else None))
        self.cuCtxPushCurrent_v2 = fn(lambda ctx: stack().append(ctx.value) or 0)
        self.cuCtxPopCurrent_v2 = fn(lambda out: set_out(out, stack().pop()))

        def register(ptr, nbytes, flags):
            self.log.append(("register", ptr, nbytes, flags, stack()[-1] if stack() else None))
            return register_rc

        self.cuMemHostRegister_v2 = fn(register)
        self.cuMemHostUnregister = fn(lambda ptr: self.log.append(("unregister", ptr,
                                                                   stack()[-1] if stack() else None)) or 0)

        def name(i):
            def get(code, out):
                if code not in self.NAMES:
                    return 1  # CUDA_ERROR_INVALID_VALUE: the driver does not know the code
                return set_out(out, self.NAMES[code][i])
            return get

        self.cuGetErrorName = fn(name(0))
        self.cuGetErrorString = fn(name(1))
        self.stack = stack


def test_driver_registrar_pins_in_the_devices_primary_context_and_restores_the_threads_own():
    lib = FakeLibcuda()
    reg = DriverRegistrar(lib)
    assert reg.register(0x7000, 4096, 2).ok
    assert lib.log[-1] == ("register", 0x7000, 4096, cuda_host_register.CU_MEMHOSTREGISTER_PORTABLE, 0x1002)
    assert lib.stack() == [], "no context is left current on a reader thread"
    lib.stack().append(0x1000)  # the main thread of a process on cuda:0
    assert reg.unregister(0x7000, 2).ok
    assert lib.log[-1] == ("unregister", 0x7000, 0x1002) and lib.stack() == [0x1000]
    lib.stack()[-1] = 0x1002
    reg.register(0x9000, 4096, 2)
    assert lib.stack() == [0x1002], "already current: nothing pushed or popped"


def test_driver_registrar_names_errors_and_returns_them_instead_of_leaving_them_set():
    reg = DriverRegistrar(FakeLibcuda(register_rc=712))
    res = reg.register(0x7000, 4096, 0)
    assert not res.ok and res.code == 712
    assert str(res) == ("CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED (712): "
                        "part or all of the requested memory range is already mapped")
    odd = DriverRegistrar(FakeLibcuda(register_rc=208)).register(0x7000, 4096, 0)
    assert str(odd) == "CUDA_ERROR_ALREADY_MAPPED (208)", "a code the driver cannot name is named from the table"


def test_host_buffers_never_use_torchs_cudart_binding(monkeypatch, driver):
    """torch.cuda.cudart().cudaHostRegister leaves the runtime's last error set on failure (torch cannot clear it),
    which PyTorch then raised from an unrelated torch.empty: nothing here may call it."""

    def forbidden():
        raise AssertionError("torch.cuda.cudart() called")

    monkeypatch.setattr(torch.cuda, "cudart", forbidden)
    buf = _buffer()
    buf.pin()
    buf.release()
    assert buf.pinned_bytes == 0 and sum(c[0] == "register" for c in driver.calls) == 4


def test_zero_byte_buffer_needs_no_mapping(driver):
    buf = HostBuffer("empty", 0, [(0, 0)])
    buf.pin()
    assert buf.nbytes == 0 and driver.calls == []
    buf.release()

