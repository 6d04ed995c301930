"""Step cache (storystudio/models/step_cache.py): the skip decisions on synthetic sequences, and
the residual reuse on a model with WanModel_S2V's block loop (the real DiT: tests/test_speed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from storystudio.models.step_cache import BlockResidualCache, StepCache, StepSchedule, relative_l1


def _decide(schedule: StepSchedule, changes: list[float]) -> list[int]:
    out = []
    for step in range(schedule.num_steps):
        if not schedule.decide(step, None if step == 0 else changes[step - 1]):
            out.append(step)
    assert out == schedule.skipped
    return out


@pytest.mark.parametrize(
    "threshold,kwargs,skipped",
    [
        (0.25, {}, [2, 3, 5, 6, 8, 9]),  # two steps accumulate 0.2 < 0.25, the third computes
        (1.0, {}, [2, 3, 4, 6, 7, 8]),  # never more than 3 skips in a row
        (1.0, {"max_consecutive": 1}, [2, 4, 6, 8]),
        (0.25, {"rescale": [2.0, 0.0]}, [2, 4, 6, 8]),  # rescaled change 0.2: one skip, then compute
        (0.25, {"first": 4, "last": 4}, [4, 5, 7]),
        (0.05, {}, []),  # every change is above the threshold
        (0.0, {}, []),  # off
    ],
)
def test_schedule_on_a_constant_change(threshold, kwargs, skipped):
    kwargs = dict(kwargs)
    s = StepSchedule(threshold=threshold, num_steps=12, first=kwargs.pop("first", 2), last=kwargs.pop("last", 2),
                     max_consecutive=kwargs.pop("max_consecutive", 3), **kwargs)
    assert _decide(s, [0.1] * 11) == skipped


def test_schedule_skips_where_the_input_moves_slowly():
    # Small changes early, large late (a shifted flow schedule): skips happen early only.
    changes = [0.02, 0.02, 0.03, 0.03, 0.04, 0.05, 0.2, 0.3, 0.4, 0.5, 0.6]
    s = StepSchedule(threshold=0.1, num_steps=12, first=2, last=2, max_consecutive=3)
    assert _decide(s, changes) == [2, 3, 4, 6]


def test_relative_l1():
    a = torch.tensor([1.0, -2.0, 3.0])
    assert relative_l1(a, a) == 0.0
    assert relative_l1(a * 1.1, a) == pytest.approx(0.1, rel=1e-6)
    assert relative_l1(torch.zeros(3), torch.zeros(3)) == 0.0


class _Block(nn.Module):
    """Returns the new hidden states (residual inside), as WanS2VAttentionBlock does."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class FakeDiT(nn.Module):
    """The shape of WanModel_S2V.forward: embed, blocks + after_transformer_block, slice, head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(8, 4)
        self.block_calls = 0  # real block modules run
        self.injections = 0
        for b in self.blocks:
            b.register_forward_hook(lambda *_: setattr(self, "block_calls", self.block_calls + 1))

    def after_transformer_block(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        if idx in (0, 2):  # like the audio injector: in place on some blocks' outputs
            self.injections += 1
            x[:, :5] = x[:, :5] + 0.5
        return x

    def forward(self, x: torch.Tensor, *, t: float) -> torch.Tensor:
        x = self.embed(torch.cat([x, torch.ones_like(x[:, :2])], dim=1)) * t  # 2 extra "ref" tokens
        for idx, block in enumerate(self.blocks):
            x = block(x)
            x = self.after_transformer_block(idx, x)
        return self.head(x[:, :5])


def test_compute_mode_equals_a_plain_call_and_stores_the_residual():
    m = FakeDiT()
    x = torch.randn(1, 5, 4)
    plain = m(x, t=1.0)
    cache = BlockResidualCache(m)
    out = cache.compute("cond", x, t=1.0)
    assert torch.equal(out, plain)
    assert cache.residuals["cond"].shape == (1, 7, 8)  # the whole sequence, extra tokens included
    assert "blocks" not in m.__dict__ and "after_transformer_block" not in m.__dict__


def test_reuse_skips_every_block_and_adds_the_residual():
    m = FakeDiT()
    x = torch.randn(1, 5, 4)
    cache = BlockResidualCache(m)
    computed = cache.compute("cond", x, t=1.0)
    calls, injections = m.block_calls, m.injections
    again = cache.reuse("cond", x, t=1.0)  # same input: x + (out - x) == out up to rounding
    assert m.block_calls == calls and m.injections == injections
    assert torch.allclose(again, computed, atol=1e-6)
    moved = cache.reuse("cond", x, t=1.1)  # a nearby step: embeddings and head still see the new input
    assert not torch.allclose(moved, computed)
    with pytest.raises(KeyError):
        cache.reuse("uncond", x, t=1.0)


def test_shadowing_is_undone_when_the_model_raises():
    m = FakeDiT()
    cache = BlockResidualCache(m)
    with pytest.raises(RuntimeError):
        cache.compute("cond", torch.randn(1, 5, 3), t=1.0)  # wrong width
    assert "blocks" not in m.__dict__ and isinstance(m.blocks, nn.ModuleList)
    cache.compute("cond", torch.randn(1, 5, 4), t=1.0)
    with pytest.raises(RuntimeError, match="do not match the cached residual"):
        cache.reuse("cond", torch.randn(1, 6, 4), t=1.0)  # another sequence length
    assert "blocks" not in m.__dict__ and "after_transformer_block" not in m.__dict__


def test_an_injection_already_replaced_on_the_instance_is_wrapped_and_put_back():
    """The compiled audio injection (DiTCompiler) shadows after_transformer_block first."""
    m = FakeDiT()
    x = torch.randn(1, 5, 4)
    installed_calls: list[int] = []

    def installed(idx: int, h: torch.Tensor) -> torch.Tensor:
        installed_calls.append(idx)
        return FakeDiT.after_transformer_block(m, idx, h)

    m.after_transformer_block = installed
    plain = m(x, t=1.0)
    installed_calls.clear()
    cache = BlockResidualCache(m)
    assert torch.equal(cache.compute("cond", x, t=1.0), plain)
    assert installed_calls == [0, 1, 2]  # the computed call ran through the installed injection
    cache.reuse("cond", x, t=1.0)
    assert installed_calls == [0, 1, 2]  # a reused call skips it with the blocks
    assert m.__dict__["after_transformer_block"] is installed and "blocks" not in m.__dict__


def test_step_cache_keeps_branches_apart_and_counts_real_skips():
    m = FakeDiT()
    x = torch.randn(1, 5, 4)
    cache = StepCache(m, threshold=1.0, num_steps=8)
    outs = {}
    for step in range(8):
        compute = cache.begin_step(step, torch.tensor([1.0]), x * (1 + 0.01 * step))
        calls = m.block_calls
        outs[step] = (cache("cond", x, t=1.0 + 0.01 * step), cache("uncond", -x, t=1.0 + 0.01 * step))
        assert (m.block_calls > calls) == compute
    assert cache.skipped_steps == [2, 3, 4]  # then 3 in a row -> compute; last 2 forced
    assert set(cache.blocks.residuals) == {"cond", "uncond"}
    assert not torch.allclose(outs[3][0], outs[3][1])
    assert cache.changes[0] is None and cache.changes[1] == pytest.approx(0.01 / 1.0, rel=1e-4)


def test_a_branch_without_a_residual_is_computed_and_the_step_is_not_counted():
    m = FakeDiT()
    x = torch.randn(1, 5, 4)
    cache = StepCache(m, threshold=1.0, num_steps=8)
    for step in range(3):
        cache.begin_step(step, torch.tensor([1.0]), x)
        cache("cond", x, t=1.0)
        if step == 2:  # decided "skip", but uncond never ran before
            calls = m.block_calls
            cache("uncond", x, t=1.0)
            assert m.block_calls > calls
    assert cache.skipped_steps == []
