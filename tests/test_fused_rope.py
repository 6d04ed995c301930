"""The exact path's RoPE (storystudio/models/fused_rope.py) against the official functions."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from storystudio.models.fused_rope import CompactTables, compact_table, fused_rope, is_active, rope_apply
from storystudio.patches import wan22

wan22.import_wan()
s2v = sys.modules["wan.modules.s2v.model_s2v"]
OFFICIAL_ROPE = s2v.rope_apply
from wan.modules.s2v.s2v_utils import rope_precompute  # noqa: E402


def _official_table(b: int, f: int, h: int, w: int, heads: int, dim: int) -> torch.Tensor:
    """The S2V table ``rope_precompute`` builds for a [f, h, w] token grid (as the DiT's forward does)."""
    d = dim
    freqs = torch.cat([s2v.rope_params(1024, d - 4 * (d // 6)), s2v.rope_params(1024, 2 * (d // 6)),
                       s2v.rope_params(1024, 2 * (d // 6))], dim=1)
    grid = [torch.zeros(b, 3, dtype=torch.long), torch.tensor([[f, h, w]] * b), torch.tensor([[f, h, w]] * b)]
    x = torch.randn(b, f * h * w, heads, d)
    return rope_precompute(x, [grid], freqs, start=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_apply_equals_the_official_function(dtype):
    table = _official_table(2, 3, 4, 5, heads=4, dim=16)
    x = torch.randn(2, 60, 4, 16).to(dtype)
    want = OFFICIAL_ROPE(x, None, table)
    got = rope_apply(x, None, table)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The rotation really happened (positions > 0 move the values).
    assert not torch.allclose(got, x.float())


def test_float32_rotation_matches_the_official_float64_at_full_size_positions():
    # A 480p clip's grid (21 x 28 x 52 latent positions; the table goes up to 1024 per axis):
    # the largest angles, where a float32 rotation would first drift from float64.
    table = _official_table(1, 21, 28, 52, heads=1, dim=128)
    x = torch.randn(1, 21 * 28 * 52, 1, 128) * 4
    got, want = rope_apply(x, None, table), OFFICIAL_ROPE(x, None, table)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-6, rel  # bf16, what attention receives, rounds at 2^-8 ~ 4e-3
    assert (got.to(torch.bfloat16) != want.to(torch.bfloat16)).float().mean().item() < 1e-3


def test_compact_table_keeps_one_row_per_token_with_the_same_values():
    table = _official_table(2, 3, 4, 5, heads=4, dim=16)
    compact = compact_table(table)
    assert compact.shape == (2, 60, 1, 8)
    assert torch.equal(compact.expand_as(table), table)
    x = torch.randn(2, 60, 4, 16)
    torch.testing.assert_close(rope_apply(x, None, compact), OFFICIAL_ROPE(x, None, table), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(OFFICIAL_ROPE(x, None, compact), OFFICIAL_ROPE(x, None, table), rtol=0, atol=0)


def test_a_table_whose_heads_differ_is_left_whole():
    table = _official_table(1, 2, 2, 2, heads=3, dim=16).clone()
    table[0, 5, 2, 1] = 0.5 + 0.5j  # e.g. a position rope_precompute did not cover keeps per-head values
    assert compact_table(table) is table


def test_compact_tables_memo_is_per_forward():
    memo = CompactTables()
    a = _official_table(1, 2, 2, 2, heads=3, dim=16)
    b = _official_table(1, 2, 2, 2, heads=3, dim=16)
    first = memo(a)
    assert memo(a) is first and first.shape == (1, 8, 1, 8, 2)  # one row per token, real (cos, sin) pairs
    assert not first.is_complex() and torch.equal(torch.view_as_complex(first).expand_as(a), a)
    x = torch.randn(1, 8, 3, 16)
    torch.testing.assert_close(rope_apply(x, None, first), OFFICIAL_ROPE(x, None, a), rtol=1e-6, atol=1e-6)
    assert memo(b) is not first
    memo.clear()
    assert memo(a) is not first


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.freqs = torch.randn(8, 4, dtype=torch.complex128)


def test_fused_rope_binds_and_restores_the_official_function_and_table():
    model = _Model()
    table = model.freqs
    assert not is_active()
    with fused_rope(model, torch.device("meta")):
        assert s2v.rope_apply is rope_apply and is_active()
        assert model.freqs.device.type == "meta" and model.freqs.shape == table.shape
    assert s2v.rope_apply is OFFICIAL_ROPE
    assert model.freqs is table  # parking the model afterwards leaves nothing on the GPU

    with fused_rope(model, torch.device("cpu")):  # already there: the same tensor, no copy
        assert model.freqs is table
    assert s2v.rope_apply is OFFICIAL_ROPE


def test_fused_rope_blocks_overlapping_in_threads_restore_the_official_function():
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[object] = []

    def first() -> None:
        with fused_rope(_Model(), torch.device("cpu")):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second() -> None:
        a_in.wait(5)
        with fused_rope(_Model(), torch.device("cpu")):
            b_in.set()
            a_out.wait(5)
            seen.append(s2v.rope_apply)  # the first block closed; this one is still open

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [rope_apply]
    assert s2v.rope_apply is OFFICIAL_ROPE


def test_fused_rope_restores_after_an_error():
    model = _Model()
    table = model.freqs
    with pytest.raises(RuntimeError, match="boom"):
        with fused_rope(model, torch.device("meta")):
            raise RuntimeError("boom")
    assert s2v.rope_apply is OFFICIAL_ROPE and model.freqs is table
