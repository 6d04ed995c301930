"""wan22 patches: stub import without CUDA/heavy deps, the attention shim bound everywhere (kernels: test_attention)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storystudio.models.attention import reference_attention
from storystudio.patches import wan22


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
    # Always, also where flash-attn is installed: the shim runs the self-check's backend
    # and, outside use_attention(), the official function (kept as the default path).
    wan22.import_wan()
    for name in ("wan.modules.attention", "wan.modules.model", "wan.modules.s2v.model_s2v",
                 "wan.modules.s2v.motioner", "wan.distributed.ulysses"):
        assert sys.modules[name].flash_attention is wan22.flash_attention, name
    assert (wan22._official_flash is None) == (wan22.attention_backend() == "sdpa")


def test_default_path_without_flash_attn_is_sdpa_with_masks():
    wan22.import_wan()
    if wan22.attention_backend() != "sdpa":
        pytest.skip("flash-attn present: the default path is the official function")

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g) for _ in range(3))
    kl = torch.tensor([5, 2])
    assert wan22.active_attention() == "default"
    got = wan22.flash_attention(q, k, v, k_lens=kl)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, k_lens=kl), atol=1e-5, rtol=1e-5)


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
    assert out.stdout.split() == ["sdpa", "flash_attention"]


def test_use_attention_blocks_closed_out_of_order_leave_no_backend_behind():
    """Two engines in one process (the fake fleet's worker threads) open overlapping
    blocks; whatever order they close in, the last exit leaves ``default``."""
    first, second = wan22.use_attention("math"), wan22.use_attention("sdpa")
    first.__enter__()
    second.__enter__()
    assert wan22.active_attention() == "sdpa"
    first.__exit__(None, None, None)  # the older block ends first
    assert wan22.active_attention() == "sdpa", "the block still open keeps its backend"
    second.__exit__(None, None, None)
    assert wan22.active_attention() == "default"
    with wan22.use_attention("math"):
        with wan22.use_attention("sdpa"):
            assert wan22.active_attention() == "sdpa"
        assert wan22.active_attention() == "math", "nested blocks restore the outer one"
    assert wan22.active_attention() == "default"
