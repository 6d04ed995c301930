"""8-bit attention candidate (storystudio/models/attention8.py): SageAttention is not installed
here, so the self-check and the dispatcher are exercised with stand-in kernels."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from storystudio.models import attention8
from storystudio.patches import wan22


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(attention8, "_cache", {})
    monkeypatch.setattr(attention8, "MIN_TOKENS", 16)  # the tests' 16-token calls count as long
    wan22.import_wan()


def _exact(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=None):
    assert tensor_layout == "NHD" and not is_causal
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=sm_scale)
    return out.transpose(1, 2)


def _stand_in(kernel, calls: list | None = None):
    def load():
        def sageattn(*a, **kw):
            if calls is not None:
                calls.append(a[0].shape)
            return kernel(*a, **kw)

        return sageattn, "sageattention 9.9 (stand-in)"

    return load


def test_not_installed_is_unavailable_and_changes_nothing():
    status = attention8.attention8_status("cpu")
    assert not status.available and "sageattention is not installed" in status.detail
    assert "cuDNN FP8" in status.detail and status.kernel is None  # both candidates say why not
    before = {n: sys.modules[n].flash_attention for n in attention8.DIT_ATTENTION_MODULES}
    with attention8.attention_8bit("cpu") as st:
        assert st == status
        assert {n: sys.modules[n].flash_attention for n in attention8.DIT_ATTENTION_MODULES} == before


def test_a_kernel_that_agrees_is_used_for_plain_calls_only(monkeypatch):
    calls: list = []
    noisy = lambda q, k, v, **kw: _exact(q, k, v, **kw) * 1.01  # 1 % off: within the limit  # noqa: E731
    monkeypatch.setattr(attention8, "_load_sageattn", _stand_in(noisy, calls))
    status = attention8.attention8_status("cpu")
    assert status.available and "self-check error 1.00%" in status.detail
    model = sys.modules["wan.modules.model"]
    previous = model.flash_attention
    q = k = v = torch.randn(1, 16, 2, 64)
    calls.clear()
    with attention8.attention_8bit("cpu"):
        assert model.flash_attention is not previous
        plain = model.flash_attention(q, k, v)
        assert len(calls) == 1 and torch.allclose(plain, previous(q, k, v) * 1.01, atol=1e-5)
        # Padding masks, causal masks and unsupported head dims go to the exact function.
        masked = model.flash_attention(q, k, v, k_lens=torch.tensor([10]))
        assert torch.allclose(masked, previous(q, k, v, k_lens=torch.tensor([10])))
        model.flash_attention(q, k, v, causal=True)
        model.flash_attention(torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32))
        assert len(calls) == 1
        # Full-length lens are no mask: the kernel takes them.
        model.flash_attention(q, k, v, k_lens=torch.tensor([16]))
        assert len(calls) == 2
    assert model.flash_attention is previous


def test_a_kernel_that_disagrees_is_refused(monkeypatch):
    monkeypatch.setattr(attention8, "_load_sageattn", _stand_in(lambda q, k, v, **kw: torch.zeros_like(q)))
    status = attention8.attention8_status("cpu")
    assert not status.available and "differs from exact attention by 100.0%" in status.detail
    model = sys.modules["wan.modules.model"]
    previous = model.flash_attention
    with attention8.attention_8bit("cpu"):
        assert model.flash_attention is previous


def test_a_kernel_that_crashes_is_refused(monkeypatch):
    def boom(q, k, v, **kw):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(attention8, "_load_sageattn", _stand_in(boom))
    status = attention8.attention8_status("cpu")
    assert not status.available and "failed its self-check: RuntimeError: no kernel image" in status.detail


def test_a_broken_install_is_unavailable(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "sageattention":
            raise ImportError("libcuda.so.1: cannot open shared object file")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    status = attention8.attention8_status("cpu")
    assert not status.available and "cannot be imported: ImportError: libcuda" in status.detail


def test_the_preferred_candidate_wins_a_tie_and_the_status_names_it(monkeypatch):
    cudnn_calls: list = []
    sage_calls: list = []
    monkeypatch.setattr(attention8, "_load_cudnn_fp8", _stand_in(_exact, cudnn_calls))
    monkeypatch.setattr(attention8, "_load_sageattn", _stand_in(_exact, sage_calls))
    status = attention8.attention8_status("cpu")
    assert status.available and status.kernel == "cudnn_fp8"  # no timing on a CPU: the preference order
    q = k = v = torch.randn(1, 16, 2, 64)
    cudnn_calls.clear()
    with attention8.attention_8bit("cpu"):
        sys.modules["wan.modules.model"].flash_attention(q, k, v)
    assert len(cudnn_calls) == 1 and sage_calls == [(1, 1024, 4, 128)]  # sage only ran its self-check


def test_a_failing_candidate_leaves_the_other(monkeypatch):
    monkeypatch.setattr(attention8, "_load_cudnn_fp8", _stand_in(lambda q, k, v, **kw: torch.zeros_like(q)))
    monkeypatch.setattr(attention8, "_load_sageattn", _stand_in(_exact))
    status = attention8.attention8_status("cpu")
    assert status.available and status.kernel == "sageattention"


def test_compiled_blocks_reach_the_kernel_through_the_op_without_a_graph_break(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    calls: list = []
    monkeypatch.setattr(attention8, "_load_sageattn", _stand_in(lambda q, k, v, **kw: _exact(q, k, v, **kw) * 1.01,
                                                                calls))
    attention8.attention8_status("cpu")
    model = sys.modules["wan.modules.model"]
    previous = model.flash_attention
    q = k = v = torch.randn(1, 16, 2, 64)
    counter = CompileCounterWithBackend("aot_eager")
    torch.compiler.reset()
    with attention8.attention_8bit("cpu"):
        fn = torch.compile(lambda q, k, v, lens: model.flash_attention(q, k, v, k_lens=lens) + 1,
                           backend=counter, fullgraph=True)  # fullgraph: a graph break would raise
        calls.clear()
        full = fn(q, k, v, torch.tensor([16]))
        assert len(calls) == 1
        torch.testing.assert_close(full, previous(q, k, v) * 1.01 + 1, rtol=1e-5, atol=1e-5)
        padded = fn(q, k, v, torch.tensor([10]))  # the padding check runs at call time, in the op
        assert len(calls) == 1
        torch.testing.assert_close(padded, previous(q, k, v, k_lens=torch.tensor([10])) + 1, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_fp8_quantize_round_trips_within_e4m3_precision():
    from storystudio.models.attention_fp8 import E4M3_MAX, quantize

    x = torch.randn(2, 64, 4, 32) * 3
    x8, descale = quantize(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert x8.float().abs().max().item() == E4M3_MAX  # the largest magnitude maps to e4m3's max
    back = x8.float() * descale
    rel = ((back - x).norm() / x.norm()).item()
    assert 0 < rel < 0.04  # 3 mantissa bits: ~2 % rms


def test_cudnn_fp8_is_unavailable_here_with_the_reason():
    from storystudio.models import attention_fp8

    kernel, why = attention_fp8.load()
    assert kernel is None and why.startswith("cuDNN FP8: ")


def test_short_calls_and_unsupported_shapes_stay_exact(monkeypatch):
    calls: list = []

    def picky(q, k, v, **kw):
        if k.size(1) == 24:
            raise NotImplementedError("no plan for this shape")
        calls.append(q.shape)
        return _exact(q, k, v, **kw)

    monkeypatch.setattr(attention8, "_load_sageattn", _stand_in(picky))
    attention8.attention8_status("cpu")
    model = sys.modules["wan.modules.model"]
    previous = model.flash_attention
    q = torch.randn(1, 16, 2, 64)
    with attention8.attention_8bit("cpu"):
        calls.clear()
        model.flash_attention(q, torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64))  # 8 keys < MIN_TOKENS
        assert calls == []
        k = v = torch.randn(1, 24, 2, 64)
        got = model.flash_attention(q, k, v)  # the kernel refuses the shape: exact instead of an error
        assert calls == [] and torch.allclose(got, previous(q, k, v))
        model.flash_attention(q, q, q)
        assert len(calls) == 1


class _FakeTensor:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_output(self, *_):
        return self

    set_dim = set_stride = set_data_type = set_output


class _FakeGraph:
    """Records the cuDNN frontend calls; enough of its API for CudnnFP8Attention._build."""

    def __init__(self, **kw) -> None:
        self.kw = kw

    def tensor(self, **kw):
        return _FakeTensor()

    def sdpa_fp8(self, **kw):
        assert kw["descale_q"] is not None and kw["use_causal_mask"] is False
        return _FakeTensor(), None, _FakeTensor(), _FakeTensor()

    def validate(self):
        pass

    build_operation_graph = check_support = build_plans = validate

    def create_execution_plans(self, modes):
        pass

    def get_workspace_size(self):
        return 64


class _FakeCudnn:
    class data_type:
        FP8_E4M3, FLOAT = "e4m3", "f32"

    class heur_mode:
        A, FALLBACK = "A", "FALLBACK"

    def __init__(self, fail: bool = False) -> None:
        self.handles, self.fail = 0, fail

    def create_handle(self):
        self.handles += 1
        return object()

    def pygraph(self, **kw):
        if self.fail:
            raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED")
        return _FakeGraph(**kw)


def test_cudnn_fp8_graph_build_takes_its_lock_once_and_memoizes(monkeypatch):
    # A graph build asks for the device's handle under the same lock: it must not deadlock
    # (it did on the H100 before the lock became re-entrant), and each shape builds once.
    import threading

    from storystudio.models.attention_fp8 import CudnnFP8Attention

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: __import__("contextlib").nullcontext())
    fake = _FakeCudnn()
    kernel = CudnnFP8Attention(fake)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(kernel._graph(1, 2, 64, 64, 128, 0.1, torch.device("cuda"))),
                              daemon=True)
    worker.start()
    worker.join(5)
    assert done, "the graph build deadlocked"
    assert kernel._graph(1, 2, 64, 64, 128, 0.1, torch.device("cuda")) is done[0] and fake.handles == 1
    refused = CudnnFP8Attention(_FakeCudnn(fail=True))
    for _ in range(2):  # remembered: the second call does not try again
        with pytest.raises(NotImplementedError, match="no plan for .*CUDNN_STATUS_NOT_SUPPORTED"):
            refused._graph(1, 2, 64, 64, 128, 0.1, torch.device("cuda"))
