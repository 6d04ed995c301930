"""Page-locked parking buffers on a real CUDA device (``gpu`` marker; skipped without CUDA).

What the first H100 run of issue 13 tripped over: a refused registration left an error that
PyTorch raised later from an unrelated ``torch.empty``, buffers freed while still registered
made the next buffers unregistrable and device allocations fail, and the refusal was logged
as ``cudaError.???``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch

from storystudio.models import cuda_host_register
from storystudio.models.host_memory import HostBuffer, plan_chunks, registered_bytes
from storystudio.models.weight_files import InMemory
from storystudio.models.weight_loader import Layout, fill

pytestmark = pytest.mark.gpu

MiB = 1024**2


@pytest.fixture
def dev() -> Iterator[torch.device]:
    assert registered_bytes() == 0, "an earlier test left host memory registered"
    yield torch.device("cuda", torch.cuda.current_device())
    gc.collect()
    assert registered_bytes() == 0, "the test left host memory registered"


def _work(dev: torch.device, fill_value: int) -> int:
    """An unrelated allocation and kernel: where the leftover CUDA error used to be raised."""
    x = torch.empty(256 * MiB, dtype=torch.uint8, device=dev)
    x.fill_(fill_value)
    torch.cuda.synchronize(dev)
    return int(x[-1])


def test_a_refused_registration_is_named_and_leaves_no_error_for_torch(dev):
    buf = HostBuffer("gpu.twice", 64 * MiB, [(0, 64 * MiB)], device=dev)
    buf.pin()
    assert buf.pinned_bytes == 64 * MiB and buf.tensor.is_pinned()
    driver = cuda_host_register.driver()
    assert driver is not None
    again = driver.register(buf.tensor.data_ptr(), 64 * MiB, dev.index)  # the same range once more
    assert again.code == cuda_host_register.HOST_MEMORY_ALREADY_REGISTERED
    assert again.name == "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED" and "???" not in str(again)
    assert _work(dev, 3) == 3, "the refusal surfaced in torch"
    buf.release()
    assert registered_bytes() == 0 and not buf.tensor.is_pinned()
    assert _work(dev, 4) == 4


def test_buffers_freed_without_release_unregister_and_the_next_ones_pin_and_copy_right(dev):
    for round_ in range(4):
        n = 512 * MiB
        buf = HostBuffer(f"gpu.round{round_}", n, plan_chunks([(0, n // 2), (n // 2, n)], n), device=dev)
        buf.tensor.fill_(round_ + 1)
        buf.pin()
        assert buf.pinned_bytes == n, f"round {round_}: a chunk could not be pinned (see the warning)"
        flat = torch.empty(n, dtype=torch.uint8, device=dev)
        buf.copy_to(flat)
        torch.cuda.synchronize(dev)
        assert int(flat[0]) == int(flat[-1]) == round_ + 1, "a copy read pages other than the buffer's"
        del buf, flat  # no release(): the memory's own finaliser unregisters before it is unmapped
        gc.collect()
        assert registered_bytes() == 0
        assert _work(dev, round_) == round_, "a device allocation failed after a buffer went away"


def test_reader_threads_pin_chunks_in_the_devices_context(dev):
    module = torch.nn.Module()
    for i in range(8):
        module.register_parameter(f"w{i}", torch.nn.Parameter(torch.empty(8 * MiB, dtype=torch.bfloat16, device="meta"),
                                                             requires_grad=False))
    layout = Layout(module)
    values = {f"w{i}": InMemory(torch.full((8 * MiB,), float(i), dtype=torch.bfloat16)) for i in range(8)}
    host = HostBuffer("gpu.loader", layout.nbytes, plan_chunks(layout.ranges(), layout.nbytes, chunk_bytes=32 * MiB),
                      device=dev)
    flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=dev)
    fill(layout, layout.complete(values), flat, host=host, pin=True, threads=8)
    torch.cuda.synchronize(dev)
    assert host.pinned_bytes == layout.nbytes and len(host.chunks) == 4
    layout.point(flat)
    assert [float(p[-1]) for p in module.parameters()] == [float(i) for i in range(8)]
    assert _work(dev, 9) == 9
    host.release()
    assert registered_bytes() == 0
