"""wan22 patches: stub import without CUDA/heavy deps, SDPA attention with varlen padding masks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storystudio.patches import wan22


def reference_attention(q, k, v, q_lens=None, k_lens=None, softmax_scale=None) -> torch.Tensor:
    """Explicit masked softmax in float64: the oracle for ``wan22.sdpa_flash_attention``."""
    b, lq, nq, c = q.shape
    lk, nk = k.size(1), k.size(2)
    q64, k64, v64 = q.double(), k.double(), v.double()
    if nk != nq:
        k64 = k64.repeat_interleave(nq // nk, dim=2)
        v64 = v64.repeat_interleave(nq // nk, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(c)
    out = torch.zeros(b, lq, nq, v.size(-1), dtype=torch.float64)
    for i in range(b):
        ql = lq if q_lens is None else int(q_lens[i])
        kl = lk if k_lens is None else int(k_lens[i])
        if ql == 0 or kl == 0:
            continue
        s = torch.einsum("qnc,knc->nqk", q64[i, :ql], k64[i, :kl]) * scale
        p = torch.softmax(s, dim=-1)
        out[i, :ql] = torch.einsum("nqk,knc->qnc", p, v64[i, :kl])
    return out


def test_import_wan_without_cuda_or_heavy_deps():
    # A fresh interpreter where CUDA is hidden: the stubs keep wan/__init__.py (and
    # torchvision/decord/cv2 through it) from running, t5.py's default argument works.
    code = (
        "import sys, torch\n"
        "sys.modules['decord'] = None  # absent: speech2video.py (via wan/__init__.py) would need it\n"
        "torch.cuda.is_available = lambda: False\n"
        "def boom(): raise AssertionError('CUDA touched')\n"
        "torch.cuda.current_device = boom\n"
        "from storystudio.patches import wan22\n"
        "w = wan22.import_wan(); assert wan22.import_wan() is w\n"
        "from wan.modules.s2v.model_s2v import WanModel_S2V\n"
        "from wan.modules.t5 import T5EncoderModel\n"
        "from wan.modules.vae2_1 import Wan2_1_VAE\n"
        "from wan.modules.s2v.audio_encoder import AudioEncoder\n"
        "from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler\n"
        "from wan.configs.wan_s2v_14B import s2v_14B\n"
        "assert torch.cuda.current_device is boom\n"
        # torchvision/cv2 may be imported by diffusers/transformers where installed; the
        # official pipelines that hard-require them must not be.
        "bad = [m for m in ('wan.speech2video', 'wan.image2video', 'wan.animate', 'wan.text2video',"
        " 'wan.textimage2video', 'wan.modules.animate') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(wan22.attention_backend())\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] in ("fa3", "fa2", "sdpa")


def test_flash_attention_rebound_in_every_importing_module():
    wan22.import_wan()
    if wan22.attention_backend() != "sdpa":
        pytest.skip("flash-attn present: the official path is kept")
    for name in ("wan.modules.attention", "wan.modules.model", "wan.modules.s2v.model_s2v",
                 "wan.modules.s2v.motioner", "wan.distributed.ulysses"):
        assert sys.modules[name].flash_attention is wan22.sdpa_flash_attention, name


@pytest.mark.parametrize(
    "b,lq,lk,nq,nk,c,q_lens,k_lens",
    [
        (1, 7, 7, 2, 2, 8, None, None),
        (2, 5, 9, 4, 4, 16, None, [9, 4]),
        (3, 6, 6, 2, 2, 8, [6, 3, 1], [6, 2, 5]),
        (2, 4, 11, 4, 2, 8, [2, 4], [11, 7]),  # grouped-query heads
        (2, 3, 5, 2, 2, 4, [3, 2], [0, 5]),  # a sample with no keys -> zeros
    ],
)
def test_sdpa_shim_matches_masked_softmax_reference(b, lq, lk, nq, nk, c, q_lens, k_lens):
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q = torch.randn(b, lq, nq, c, generator=g)
    k = torch.randn(b, lk, nk, c, generator=g)
    v = torch.randn(b, lk, nk, c + 2, generator=g)
    ql = None if q_lens is None else torch.tensor(q_lens, dtype=torch.int32)
    kl = None if k_lens is None else torch.tensor(k_lens, dtype=torch.int32)
    got = wan22.sdpa_flash_attention(q, k, v, q_lens=ql, k_lens=kl)
    want = reference_attention(q, k, v, q_lens=ql, k_lens=kl)
    assert got.shape == (b, lq, nq, c + 2) and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # Padding really is ignored: garbage beyond k_lens changes nothing.
    if kl is not None:
        k2, v2 = k.clone(), v.clone()
        for i, n in enumerate(k_lens):
            k2[i, n:] = 1e3
            v2[i, n:] = -1e3
        torch.testing.assert_close(wan22.sdpa_flash_attention(q, k2, v2, q_lens=ql, k_lens=kl), got)


def test_sdpa_shim_scale_and_causal():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    got = wan22.sdpa_flash_attention(q, k, v, softmax_scale=0.3)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, softmax_scale=0.3),
                               atol=1e-5, rtol=1e-5)
    causal = wan22.sdpa_flash_attention(q, k, v, causal=True)
    # First query only sees the first key.
    torch.testing.assert_close(causal[0, 0], v[0, 0])


def test_broken_flash_attn_falls_back_to_sdpa(tmp_path):
    # flash-attn installed but not importable (CUDA/ABI mismatch): SDPA, not a crash.
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(root), os.environ.get("PYTHONPATH", "")]))
    code = ("from storystudio.patches import wan22\n"
            "import sys\n"
            "print(wan22.attention_backend(), sys.modules['wan.modules.model'].flash_attention.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["sdpa", "sdpa_flash_attention"]
