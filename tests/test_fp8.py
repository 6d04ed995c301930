"""FP8 linears (storystudio/models/fp8.py) on CPU: quantization bounds, the emulated GEMM, the
layer selection and the per-job class swap. The CUDA path runs the same quantized operands
through torch._scaled_mm; where this torch has a CPU _scaled_mm the emulation is checked
against it too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from storystudio.models import fp8
from storystudio.models.checkpoints.wan_s2v import meta_transformer
from storystudio.synthetic.wan_s2v import transformer_config


def _weights(n: int = 48, k: int = 64, seed: int = 0) -> torch.Tensor:
    # Rows of very different magnitudes: row-wise scales must cope with each.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n).unsqueeze(1)


def test_rowwise_round_trip_is_within_half_an_e4m3_step():
    w = _weights()
    q, scale = fp8.quantize(w, "row")
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.shape == (w.shape[0], 1) and scale.dtype == torch.float32
    # The largest magnitude of every row maps to the largest finite e4m3 value.
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((w.shape[0],), 448.0))
    back = fp8.dequantize(q, scale)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormals (below
    # 2^-6 in scaled units) have an absolute step of 2^-9, half of it 2^-10.
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((w - back).abs() <= bound).all()
    rel = ((w - back).norm(dim=1) / w.norm(dim=1)).max().item()
    assert 0 < rel < 0.05


def test_tensorwise_scale_is_one_number_and_loses_small_rows():
    w = _weights()
    q, scale = fp8.quantize(w, "tensor")
    assert scale.shape == (1, 1)
    back = fp8.dequantize(q, scale)
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((w - back).abs() <= bound).all()
    # Why row-wise is the default: the smallest rows fall below e4m3's range with one scale.
    row_err = fp8.dequantize(*fp8.quantize(w, "row"))
    assert (w[0] - back[0]).norm() / w[0].norm() > 10 * (w[0] - row_err[0]).norm() / w[0].norm()


def test_zero_rows_and_huge_values_stay_finite():
    w = torch.zeros(16, 32)
    w[1] = 1e30
    q, scale = fp8.quantize(w, "row")
    back = fp8.dequantize(q, scale)
    assert torch.isfinite(back).all() and torch.equal(back[0], torch.zeros(32))
    assert torch.allclose(back[1], w[1], rtol=0.07)


def test_emulated_matmul_is_close_to_the_float_linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 64, generator=g)
    lin = nn.Linear(64, 32)
    qa, sa = fp8.quantize(x, "row")
    qw, sw = fp8.quantize(lin.weight.detach(), "row")
    got = fp8.emulated_scaled_mm(qa, qw, sa, sw, lin.bias, torch.float32)
    want = F.linear(x, lin.weight, lin.bias)
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 0.05  # quantized (not bit-equal), but close
    # Exactly the dequantized operands multiplied in float32.
    exact_q = F.linear(fp8.dequantize(qa, sa), fp8.dequantize(qw, sw), lin.bias)
    assert torch.allclose(got, exact_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_emulation_matches_torch_scaled_mm_where_torch_has_it(granularity):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    qa, sa = fp8.quantize(x, granularity)
    qw, sw = fp8.quantize(w, granularity)
    try:  # the same call layout as the CUDA path: column-major weight, [1, N] weight scales
        real = torch._scaled_mm(qa, qw.t(), scale_a=sa, scale_b=sw.reshape(1, -1), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU _scaled_mm for {granularity}-wise scales: {exc}")
    emu = fp8.emulated_scaled_mm(qa, qw, sa, sw, None, torch.float32)
    assert torch.allclose(real, emu, rtol=1e-4, atol=1e-4)


def test_selection_is_the_block_attention_and_ffn_linears():
    model = meta_transformer(transformer_config("tiny"))
    names = set(fp8.select_linears(model))
    want = {f"blocks.{b}.{part}" for b in range(2)
            for part in [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]}
    assert names == want
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    left_out = linears - names
    # Embeddings, modulation, head, audio injector and frame packer stay in bf16.
    for prefix in ("text_embedding.", "time_embedding.", "time_projection.", "head.", "audio_injector.",
                   "casual_audio_encoder."):
        assert any(n.startswith(prefix) for n in left_out), prefix
    assert not any(n.startswith(p) for n in names for p in ("head", "audio_injector", "time_", "text_"))


def test_full_size_selection_is_400_linears_and_about_14_gb_of_fp8():
    model = meta_transformer(transformer_config("full"))
    sel = fp8.select_linears(model)
    assert len(sel) == 40 * 10
    params = sum(m.weight.numel() for m in sel.values())
    assert params == 40 * (8 * 5120 * 5120 + 2 * 5120 * 13824)
    assert fp8.store_nbytes(model) == params + 4 * sum(m.out_features for m in sel.values())


def test_linears_whose_sizes_scaled_mm_cannot_take_stay_in_bf16(caplog):
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].ffn = nn.Sequential(nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 64))
    assert set(fp8.select_linears(model)) == set()
    assert "not a multiple of 16" in caplog.text


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 32))

    def forward(self, x):
        return self.ffn(x)


def _tiny_model() -> nn.Module:
    torch.manual_seed(3)
    m = nn.Module()
    m.blocks = nn.ModuleList([_Block(), _Block()])
    m.head = nn.Linear(32, 16)
    return m


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for b in m.blocks:
        x = b(x)
    return m.head(x)


def test_fp8_linears_swap_in_for_the_block_and_back():
    m = _tiny_model()
    x = torch.randn(2, 5, 32)
    exact = _run(m, x)
    store = fp8.build_store(m, "row")
    assert store.names == ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]
    assert all(b.dtype in (torch.float8_e4m3fn, torch.float32) for b in store.buffers())
    assert list(store.parameters()) == []
    support = fp8.fp8_support("cpu")
    assert support.backend == "emulated"
    with fp8.fp8_linears(m, store, support) as n:
        assert n == 4 and type(m.blocks[0].ffn[0]) is fp8.FP8Linear and type(m.head) is nn.Linear
        fast = _run(m, x)
        # The model's own parameters and buffers did not grow (the store is not a submodule).
        assert len(list(m.buffers())) == 0
    rel = ((fast - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.08
    assert all(type(b.ffn[0]) is nn.Linear and "_fp8" not in b.ffn[0].__dict__ for b in m.blocks)
    assert torch.equal(_run(m, x), exact)  # exact again, bit for bit


def test_fp8_linear_uses_its_fp8_weight_not_the_bf16_one():
    m = _tiny_model()
    x = torch.randn(3, 32)
    store = fp8.build_store(m, "row")
    with fp8.fp8_linears(m, store, fp8.fp8_support("cpu")):
        before = _run(m, x)
        with torch.no_grad():
            for b in m.blocks:
                b.ffn[0].weight.zero_()  # the bf16 copy (might be parked during a fast job)
        assert torch.equal(_run(m, x), before)


def test_swap_is_undone_after_an_error():
    m = _tiny_model()
    store = fp8.build_store(m, "tensor")
    with pytest.raises(ValueError), fp8.fp8_linears(m, store, fp8.fp8_support("cpu")):
        raise ValueError("boom")
    assert all(type(b.ffn[0]) is nn.Linear for b in m.blocks)


def test_a_store_of_another_shape_is_refused():
    m = _tiny_model()
    store = fp8.build_store(m, "row")
    m.blocks[1].ffn[2] = nn.Linear(64, 48)
    with pytest.raises(RuntimeError, match="blocks.1.ffn.2"), fp8.fp8_linears(m, store, fp8.fp8_support("cpu")):
        pass
    assert all(type(b.ffn[0]) is nn.Linear for b in m.blocks)


def test_unsupported_devices_say_why():
    s = fp8.fp8_support("meta")
    assert not s.available and "meta" in s.describe() and s.describe().startswith("unavailable: ")
    with pytest.raises(RuntimeError, match="unavailable"), fp8.fp8_linears(_tiny_model(), None, s):  # type: ignore[arg-type]
        pass


def test_linear_weights_group_holds_the_same_parameter_objects():
    m = _tiny_model()
    group = fp8.LinearWeights(m)
    assert [id(p) for p in group.parameters()] == [id(lin.weight) for lin in fp8.select_linears(m).values()]


def test_bf16_activations_quantize_exactly_like_their_float32_values():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16) * 30
    q16, s16 = fp8.quantize(x, "row")
    q32, s32 = fp8.quantize(x.float(), "row")
    assert torch.equal(q16.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(s16, s32)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("fused_bias", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_the_gpu_call_path_runs_where_torch_has_a_cpu_scaled_mm(granularity, fused_bias, out_dtype):
    # The exact function the CUDA backend calls (argument layout, bias, output dtype), on CPU.
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    qa, sa = fp8.quantize(x, granularity)
    qw, sw = fp8.quantize(w, granularity)
    try:
        got = fp8._cuda_scaled_mm(qa, qw, sa, sw, b, out_dtype, fused_bias)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"no CPU _scaled_mm for this case in this torch: {exc}")
    assert got.dtype == out_dtype and got.shape == (32, 48)
    want = fp8.emulated_scaled_mm(qa, qw, sa, sw, b, torch.float32)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
