"""What is left to win on the exact path, op by op at the DiT's real 480p shapes (issue 10).

Why: after the RoPE fix the profile of an exact 480p CFG step on the H100
(``bench/profile_video_step.py``) is ~95 % cuDNN attention and bf16 GEMMs, both near the
card's peak. This measures the remaining candidate levers side by side in one process,
each against what the exact path runs today:

* ``sdpa_plans``: every execution plan cuDNN offers for the bf16 SDPA graph (through the
  ``nvidia-cudnn-frontend`` wheel, heuristics A, B and fallback), timed against torch's
  SDPA on its cuDNN backend, on the CFG-batched self-attention [2, 33280, 40, 128] in the
  DiT's [B, L, H, D] memory layout;
* ``qk_norm_rope``: RMSNorm + RoPE + bf16 cast of q and k, compiled by inductor as the
  blocks are, with the rotation in float64 (the official precision) and in float32;
* ``ffn``: the FFN (Linear -> GELU(tanh) -> Linear), compiled, against the first linear
  with cuBLASLt's bias+GELU epilogue (``torch._addmm_activation``).

Outcome on the H100 (bench/RESULTS.md): float32 RoPE went into the exact path; the GELU
epilogue was built into the engine, then removed again: in the whole step it saved the
0.05 s GELU kernel but made the GEMM 0.02 s slower, a net 0.5 % that did not show in the
step time; cuDNN offers two SDPA plans and torch already runs the faster one.

GPU:  python bench/exact_levers.py --out $OUT   (writes <date>-<gpu>-exact-levers.json)
Random inputs; time and relative error only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("bench.exact_levers")

B, L, H, D = 2, 33280, 40, 128  # CFG-batched 480p self-attention
DIM, FFN = 5120, 13824


def time_ms(fn: Callable[[], Any], repeats: int = 10) -> float:
    """Median milliseconds over ``repeats`` (after two warm-ups)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return round(sorted(times)[len(times) // 2], 3)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(float((got.float() - want.float()).norm() / want.float().norm()), 5)


def sdpa_plans(dev: torch.device) -> dict[str, Any]:
    import cudnn  # type: ignore[import-not-found]

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(dev, torch.bfloat16) for _ in range(3))
    scale = 1.0 / math.sqrt(D)

    def torch_cudnn() -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  scale=scale).transpose(1, 2)

    want = torch_cudnn()
    out: dict[str, Any] = {"shape": [B, L, H, D], "torch_cudnn_ms": time_ms(torch_cudnn),
                           "cudnn_backend": cudnn.backend_version(), "frontend": getattr(cudnn, "__version__", "?")}
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    bf16, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    stride = (L * H * D, D, H * D, 1)  # [B, L, H, D] memory seen as (B, H, L, D)
    tq, tk, tv = (graph.tensor(name=n, dim=(B, H, L, D), stride=stride, data_type=bf16) for n in "qkv")
    o, _ = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=False, attn_scale=scale, use_causal_mask=False)
    o.set_output(True).set_dim((B, H, L, D)).set_stride(stride).set_data_type(bf16)
    graph.validate()
    graph.build_operation_graph()
    modes = []
    for mode in ("A", "B", "FALLBACK"):
        try:
            graph.create_execution_plans([getattr(cudnn.heur_mode, mode)])
            modes.append(mode)
        except Exception as exc:  # noqa: BLE001
            out[f"heur_{mode}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    graph.check_support()
    n = graph.get_execution_plan_count()
    out["heur_modes"], out["plan_count"] = modes, n
    o_t = torch.empty(B, L, H, D, dtype=torch.bfloat16, device=dev)
    plans = []
    for i in range(n):
        rec: dict[str, Any] = {"index": i}
        try:
            rec["name"] = graph.get_plan_name_at_index(i)
        except Exception:  # noqa: BLE001
            pass
        try:
            graph.build_plan_at_index(i)
            ws = torch.empty(max(int(graph.get_workspace_size_plan_at_index(i)), 1), dtype=torch.uint8, device=dev)
            pack = {tq: q, tk: k, tv: v, o: o_t}

            def run(i=i, ws=ws, pack=pack) -> None:
                graph.execute_plan_at_index(pack, ws, i, handle=handle)

            rec["ms"] = time_ms(run)
            rec["rel_error_vs_torch"] = rel(o_t, want)
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        plans.append(rec)
        log.info("plan %s", rec)
    out["plans"] = plans
    return out


def _rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w


def _rope(x: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    pairs = x.to(dtype).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, d = table[..., 0].to(dtype), table[..., 1].to(dtype)
    return torch.stack((a * c - b * d, a * d + b * c), dim=-1).flatten(3).float()


def qk_norm_rope(dev: torch.device) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k = (torch.randn(B, L, DIM, generator=g).to(dev, torch.bfloat16) for _ in range(2))
    wq, wk = (torch.randn(DIM, generator=g).to(dev, torch.bfloat16) for _ in range(2))
    angles = torch.rand(1, L, 1, D // 2, generator=g, dtype=torch.float64) * 100
    table = torch.stack((angles.cos(), angles.sin()), -1).to(dev)  # [1, L, 1, D/2, 2] float64

    def make(dtype: torch.dtype):
        def f(q, k):
            qn = _rmsnorm(q, wq).view(B, L, H, D)
            kn = _rmsnorm(k, wk).view(B, L, H, D)
            return _rope(qn, table, dtype).to(torch.bfloat16), _rope(kn, table, dtype).to(torch.bfloat16)
        return torch.compile(f, dynamic=False)

    f64, f32 = make(torch.float64), make(torch.float32)
    a, b = f64(q, k), f32(q, k)
    return {"float64_ms": time_ms(lambda: f64(q, k)), "float32_ms": time_ms(lambda: f32(q, k)),
            "rel_error_32_vs_64": max(rel(b[0], a[0]), rel(b[1], a[1]))}


def ffn(dev: torch.device) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(B * L // 2, DIM, generator=g).to(dev, torch.bfloat16)  # one CFG branch's tokens
    w1 = (torch.randn(FFN, DIM, generator=g) / DIM ** 0.5).to(dev, torch.bfloat16)
    b1 = torch.randn(FFN, generator=g).to(dev, torch.bfloat16) * 0.1
    w2 = (torch.randn(DIM, FFN, generator=g) / FFN ** 0.5).to(dev, torch.bfloat16)
    b2 = torch.randn(DIM, generator=g).to(dev, torch.bfloat16) * 0.1

    compiled = torch.compile(lambda x: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2),
                             dynamic=False)

    def epilogue(x):
        return F.linear(torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2, b2)

    want, got = compiled(x), epilogue(x)
    return {"tokens": B * L // 2, "compiled_ms": time_ms(lambda: compiled(x)),
            "addmm_gelu_epilogue_ms": time_ms(lambda: epilogue(x)), "rel_error": rel(got, want)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev = torch.device("cuda")
    from bench_video_speed import gpu_slug

    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                           "date": _dt.date.today().isoformat()}
    for name, fn in (("qk_norm_rope", qk_norm_rope), ("ffn", ffn), ("sdpa_plans", sdpa_plans)):
        try:
            res[name] = fn(dev)
        except Exception as exc:  # noqa: BLE001 - one lever failing must not cost the others
            log.exception("%s failed", name)
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        torch.cuda.empty_cache()
        print(name, json.dumps(res[name], indent=1, default=str))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{res['date']}-{gpu_slug(dev)}-exact-levers.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
