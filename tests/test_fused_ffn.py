"""The exact path's FFN with its GELU in the GEMM epilogue: same results, same model afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from storystudio.models.fused_ffn import FusedAwayGELU, LinearGeluTanh, fused_ffn, linear_gelu_tanh


class _Block(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 40, act: nn.Module | None = None) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), act or nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class _Model(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


def _run(model: _Model, x: torch.Tensor) -> torch.Tensor:
    for b in model.blocks:
        x = x + b.ffn(x)
    return x


def test_fused_ffn_equals_the_official_ffn_and_restores_the_model():
    torch.manual_seed(0)
    model = _Model(_Block(), _Block())
    x = torch.randn(3, 7, 16)
    want = _run(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with fused_ffn(model) as n:
        assert n == 2
        assert type(model.blocks[0].ffn[0]) is LinearGeluTanh and type(model.blocks[0].ffn[1]) is FusedAwayGELU
        got = _run(model, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [type(m) for m in model.blocks[1].ffn] == [nn.Linear, nn.GELU, nn.Linear]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_classes_come_back_after_an_exception():
    model = _Model(_Block())
    with pytest.raises(RuntimeError, match="boom"):
        with fused_ffn(model):
            raise RuntimeError("boom")
    assert [type(m) for m in model.blocks[0].ffn] == [nn.Linear, nn.GELU, nn.Linear]


def test_other_ffns_are_left_alone():
    class NotPlainLinear(nn.Linear):  # e.g. the fast preset's FP8 linear, swapped in before
        pass

    exact_gelu = _Block(act=nn.GELU())  # erf GELU: the epilogue's tanh would change the math
    swapped_in = _Block()
    swapped_in.ffn[0].__class__ = NotPlainLinear
    with fused_ffn(_Model(exact_gelu, swapped_in, _Block())) as n:
        assert n == 1
        assert type(exact_gelu.ffn[0]) is nn.Linear and type(swapped_in.ffn[0]) is NotPlainLinear


def test_under_autocast_it_computes_in_the_autocast_dtype_like_nn_linear():
    torch.manual_seed(1)
    model = _Model(_Block())
    x = torch.randn(4, 16)  # float32 input, as the official block feeds its FFN
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.blocks[0].ffn(x)
        with fused_ffn(model):
            got = model.blocks[0].ffn(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_the_op_runs_inside_a_compiled_graph():
    torch.manual_seed(2)
    model = _Model(_Block())
    x = torch.randn(5, 16)
    want = _run(model, x)
    with torch.no_grad(), fused_ffn(model):  # inference only, as the engine runs it
        got = torch.compile(_run, backend="aot_eager", fullgraph=True)(model, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    lin = model.blocks[0].ffn[0]
    fake = torch.library.opcheck(linear_gelu_tanh, (x, lin.weight.detach(), lin.bias.detach()),
                                 test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in fake.values()), fake
