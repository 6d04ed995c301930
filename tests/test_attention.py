"""Attention backends: the self-check's choice, forced and failing candidates, masks, dense dispatch."""

from __future__ import annotations

import pytest
import torch

from storystudio.models import attention
from storystudio.models.attention import reference_attention, select_backend
from storystudio.patches import wan22

CPU = torch.device("cpu")
# Kernels this CPU build of torch runs (cuDNN / efficient / flash-attn need CUDA).
CPU_BACKENDS = ("flash", "math", "sdpa")


def _select(**kw):
    return select_backend(device=CPU, dtype=torch.float32, heads=4, head_dim=16, **kw)


def test_auto_on_cpu_picks_a_working_kernel_and_reports_every_candidate():
    sel = _select()
    checks = {c.name: c for c in sel.checks}
    assert set(checks) == set(attention.CANDIDATES)
    assert sel.backend in ("flash", "efficient", "math") and checks[sel.backend].ok
    # The first passing candidate in preference order wins where nothing is timed.
    assert sel.backend == next(c.name for c in sel.checks if c.ok)
    for name in ("fa3", "fa4", "fa2", "cudnn"):
        assert not checks[name].ok and checks[name].note.startswith(("unavailable", "failed")), checks[name]
    assert all(c.ms is None for c in sel.checks) and sel.timing_shape is None
    assert checks["math"].ok and checks["math"].rel_error < 1e-5
    d = sel.as_dict()
    assert d["backend"] == sel.backend and d["checks"]["math"]["ok"] is True


def test_forced_backend_is_used_when_it_passes():
    sel = _select(requested="math")
    assert (sel.backend, sel.note) == ("math", "forced")


def test_forced_backend_that_fails_falls_back_to_auto_with_a_note():
    sel = _select(requested="cudnn")  # no cuDNN attention on the CPU
    assert sel.backend in ("flash", "efficient", "math")
    assert "requested cudnn did not pass the self-check" in sel.note


def test_default_and_sdpa_are_taken_without_a_check():
    assert _select(requested="default").backend == "default"
    sel = _select(requested="sdpa")
    assert sel.backend == "sdpa" and sel.checks == []


def test_unknown_request_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        _select(requested="sage")


def test_wrong_and_crashing_candidates_are_skipped():
    def runner(name, q, k, v):
        if name == "math":
            raise RuntimeError("kernel exploded")
        out = attention.attention(name, q, k, v)
        if name == "flash":
            return out * 1.1  # a kernel that computes the wrong thing
        return out

    sel = _select(runner=runner, candidates=("flash", "math", "sdpa"))
    checks = {c.name: c for c in sel.checks}
    assert not checks["flash"].ok and "relative error" in checks["flash"].note and checks["flash"].rel_error > 0.05
    assert not checks["math"].ok and checks["math"].note == "failed: RuntimeError: kernel exploded"
    assert sel.backend == "sdpa" and checks["sdpa"].ok


def test_nothing_passing_leaves_torch_sdpa():
    def runner(name, q, k, v):
        raise attention.BackendUnavailable("absent")

    sel = _select(runner=runner, candidates=("flash", "math"))
    assert sel.backend == "sdpa" and "no candidate passed" in sel.note


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "b,lq,lk,nq,nk,c,q_lens,k_lens",
    [
        (1, 7, 7, 2, 2, 8, None, None),
        (2, 5, 9, 4, 4, 16, None, [9, 4]),
        (3, 6, 6, 2, 2, 8, [6, 3, 1], [6, 2, 5]),
        (2, 4, 11, 4, 2, 8, [2, 4], [11, 7]),  # grouped-query heads
        (2, 3, 5, 2, 2, 4, [3, 2], [0, 5]),  # a sample with no keys -> zeros
        (2, 6, 6, 2, 2, 8, [6, 6], [6, 6]),  # lengths that pad nothing (Wan S2V self-attention)
    ],
)
def test_wan_shim_matches_masked_softmax_reference(backend, b, lq, lk, nq, nk, c, q_lens, k_lens):
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q = torch.randn(b, lq, nq, c, generator=g)
    k = torch.randn(b, lk, nk, c, generator=g)
    cv = c if backend == "flash" else c + 2  # the flash kernel needs equal head sizes (as in Wan)
    v = torch.randn(b, lk, nk, cv, generator=g)
    ql = None if q_lens is None else torch.tensor(q_lens, dtype=torch.int32)
    kl = None if k_lens is None else torch.tensor(k_lens, dtype=torch.int32)
    with wan22.use_attention(backend):
        got = wan22.flash_attention(q, k, v, q_lens=ql, k_lens=kl)
    want = reference_attention(q, k, v, q_lens=ql, k_lens=kl)
    assert got.shape == (b, lq, nq, cv) and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # Padding really is ignored: garbage beyond k_lens changes nothing.
    if kl is not None:
        k2, v2 = k.clone(), v.clone()
        for i, n in enumerate(k_lens):
            k2[i, n:] = 1e3
            v2[i, n:] = -1e3
        with wan22.use_attention(backend):
            torch.testing.assert_close(wan22.flash_attention(q, k2, v2, q_lens=ql, k_lens=kl), got)


def test_scale_and_causal_follow_flash_attn():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    with wan22.use_attention("math"):
        got = wan22.flash_attention(q, k, v, softmax_scale=0.3)
        causal = wan22.flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, softmax_scale=0.3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal[0, 0], v[0, 0])  # the first query only sees the first key


def test_dense_kernel_only_when_nothing_is_padded(monkeypatch):
    calls = []
    real_dense, real_masked = attention.dense_attention, attention.masked_sdpa
    monkeypatch.setattr(attention, "dense_attention", lambda *a, **k: calls.append("dense") or real_dense(*a, **k))
    monkeypatch.setattr(attention, "masked_sdpa", lambda *a, **k: calls.append("masked") or real_masked(*a, **k))
    q = torch.randn(2, 6, 2, 8)
    full = torch.tensor([6, 6])
    with wan22.use_attention("math"):
        wan22.flash_attention(q, q, q)  # cross-attention: no lengths
        wan22.flash_attention(q, q, q, k_lens=full)  # self-attention, CFG batch of 2: equal full lengths
        wan22.flash_attention(q, q, q, k_lens=torch.tensor([6, 4]))
        wan22.flash_attention(q, q, q, causal=True)
    assert calls == ["dense", "dense", "masked", "masked"]


def test_default_backend_outside_a_scope_and_scope_restores():
    assert wan22.active_attention() == "default"
    with wan22.use_attention("math"):
        assert wan22.active_attention() == "math"
        with wan22.use_attention("flash"):
            assert wan22.active_attention() == "flash"
        assert wan22.active_attention() == "math"
    assert wan22.active_attention() == "default"
    with pytest.raises(ValueError, match="unknown attention backend"):
        with wan22.use_attention("sage"):
            pass


def test_custom_op_used_inside_compiled_code_matches_eager():
    # Inside torch.compile the shim calls the opaque storystudio::wan_attention op; the
    # padding check then runs at call time on the real lengths.
    q = torch.randn(2, 6, 2, 8)
    kl = torch.tensor([6, 3])

    def f(q, k_lens):
        return wan22.flash_attention(q * 2, q, q, k_lens=k_lens) + 1

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with wan22.use_attention("math"):
        torch.testing.assert_close(compiled(q, kl), f(q, kl))
        torch.testing.assert_close(compiled(q, torch.tensor([6, 6])), f(q, torch.tensor([6, 6])))
