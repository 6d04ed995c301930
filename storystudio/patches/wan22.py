"""Every workaround the Story Studio engine needs around the official Wan2.2 code.

The ``wan22`` wheel (import name ``wan``) is installed with ``--no-deps`` because its
metadata hard-pins flash_attn, torchvision, decord, opencv and dashscope. Of the
official code the engine only uses the S2V transformer, the umt5 text encoder, the
Wan2.1 VAE, the wav2vec2 audio encoder and the flow-matching schedulers; this module
makes exactly those importable and runnable on a machine without CUDA:

* :func:`import_wan` registers package stubs for ``wan`` (and its sub-packages whose
  ``__init__`` pulls the unused heavy pipelines) whose ``__path__`` is the installed
  folder, so ``wan/__init__.py`` (image2video/speech2video/animate → torchvision,
  decord, opencv) never runs. ``wan/modules/t5.py`` evaluates
  ``torch.cuda.current_device()`` as a default argument at import; that call is
  patched for the duration of the import when CUDA is absent.
* Attention: the official ``flash_attention`` asserts CUDA and flash_attn. When neither
  flash-attn 3 (``flash_attn_interface``) nor flash-attn 2 (``flash_attn``) is
  importable, :func:`sdpa_flash_attention` (torch SDPA honouring ``q_lens``/``k_lens``
  as padding masks, flash-attn varlen semantics) is bound to the name
  ``flash_attention`` in every official module that imported it.
* :func:`attention_backend` tells which one is active (for logs and the bench).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Literal["fa3", "fa2", "sdpa"]

# Packages whose __init__ must not run (they import the unused pipelines or
# everything in a folder); they are registered as bare namespace-like stubs.
_STUB_PACKAGES = ("wan", "wan.modules", "wan.configs", "wan.utils", "wan.distributed", "wan.modules.s2v")

# What the engine needs, in import order.
_NEEDED = (
    "wan.modules.attention",
    "wan.modules.t5",
    "wan.modules.tokenizers",
    "wan.modules.vae2_1",
    "wan.modules.model",
    "wan.modules.s2v.auxi_blocks",
    "wan.modules.s2v.motioner",
    "wan.modules.s2v.audio_utils",
    "wan.modules.s2v.audio_encoder",
    "wan.modules.s2v.model_s2v",
    "wan.utils.fm_solvers",
    "wan.utils.fm_solvers_unipc",
    "wan.configs.shared_config",
    "wan.configs.wan_s2v_14B",
)

# Official modules that did ``from .attention import flash_attention`` (or from
# ``..model``): the name must be rebound in each of them.
_FLASH_IMPORTERS = (
    "wan.modules.attention",
    "wan.modules.model",
    "wan.modules.s2v.model_s2v",
    "wan.modules.s2v.motioner",
    "wan.distributed.ulysses",
)

_lock = threading.RLock()
_done = False
_backend: Backend | None = None


def attention_backend() -> Backend:
    """Which attention the official modules use: ``fa3``, ``fa2`` or ``sdpa`` (torch).

    Decided by the official ``wan.modules.attention`` itself (its
    ``FLASH_ATTN_3_AVAILABLE`` / ``FLASH_ATTN_2_AVAILABLE`` flags, set by really
    importing the packages), so an installed-but-unimportable flash-attn counts as
    absent and gets the SDPA path.
    """
    import_wan()
    assert _backend is not None
    return _backend


def _official_backend() -> Backend:
    att = sys.modules["wan.modules.attention"]
    if getattr(att, "FLASH_ATTN_3_AVAILABLE", False):
        return "fa3"
    if getattr(att, "FLASH_ATTN_2_AVAILABLE", False):
        return "fa2"
    return "sdpa"


def wan_root() -> Path:
    """The folder of the installed ``wan`` package (without importing it)."""
    spec = importlib.util.find_spec("wan") if "wan" not in sys.modules else sys.modules["wan"].__spec__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the official Wan2.2 code is not installed (pip install --no-deps wan22)")
    return Path(list(spec.submodule_search_locations)[0])


def _register_stub(name: str, folder: Path) -> None:
    existing = sys.modules.get(name)
    if existing is not None:
        return  # already imported (stub or the real package): leave it
    spec = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    mod = types.ModuleType(name)
    mod.__spec__ = spec
    mod.__path__ = [str(folder)]
    mod.__package__ = name
    mod.__file__ = None
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)


def _import_attention() -> None:
    """Import ``wan.modules.attention``; a flash-attn that is installed but broken (an
    ImportError other than "not found", e.g. a CUDA/ABI mismatch) is treated as absent."""
    while True:
        try:
            importlib.import_module("wan.modules.attention")
            return
        except ImportError as exc:
            text = f"{exc.name} {exc}"
            broken = "flash_attn_interface" if "flash_attn_interface" in text else "flash_attn"
            if broken not in text or (broken in sys.modules and sys.modules[broken] is None):
                raise
            log.warning("%s is installed but cannot be imported (%s); using torch SDPA", broken, exc)
            sys.modules[broken] = None  # the official ``import`` now raises ModuleNotFoundError
            sys.modules.pop("wan.modules.attention", None)


def import_wan() -> types.ModuleType:
    """Make the needed official modules importable (idempotent); returns the ``wan`` stub.

    Works without CUDA. After this call, e.g. ``from wan.modules.s2v.model_s2v import
    WanModel_S2V`` works and its attention runs on the active :func:`attention_backend`.
    """
    global _done, _backend
    with _lock:
        if _done:
            return sys.modules["wan"]
        root = wan_root()
        for name in _STUB_PACKAGES:
            rel = name.split(".")[1:]
            _register_stub(name, root.joinpath(*rel))

        patched_current_device = False
        orig_current_device = torch.cuda.current_device
        if not torch.cuda.is_available():
            # t5.py: ``def __init__(..., device=torch.cuda.current_device(), ...)``
            torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
            patched_current_device = True
        try:
            with warnings.catch_warnings():
                # torch.cuda.amp.autocast decorators in the official code are deprecated.
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.cuda\.amp")
                _import_attention()
                for name in _NEEDED:
                    importlib.import_module(name)
        finally:
            if patched_current_device:
                torch.cuda.current_device = orig_current_device  # type: ignore[assignment]

        _backend = backend = _official_backend()
        if backend == "sdpa":
            for name in _FLASH_IMPORTERS:
                mod = sys.modules.get(name)
                if mod is None:
                    try:
                        mod = importlib.import_module(name)
                    except ImportError:  # pragma: no cover - optional module
                        continue
                if hasattr(mod, "flash_attention"):
                    mod.flash_attention = sdpa_flash_attention
        log.info("wan22 imported from %s (attention backend: %s)", root, backend)
        _done = True
        return sys.modules["wan"]


def sdpa_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    k_lens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    version: int | None = None,
) -> torch.Tensor:
    """Drop-in for ``wan.modules.attention.flash_attention`` on torch SDPA.

    q: [B, Lq, Nq, C1], k: [B, Lk, Nk, C1], v: [B, Lk, Nk, C2] (Nq divisible by Nk).
    Varlen semantics of flash-attn: keys at positions ``>= k_lens[b]`` are ignored,
    queries at positions ``>= q_lens[b]`` produce zeros. ``causal`` and
    ``window_size`` are aligned bottom-right like flash-attn. On CUDA non-half inputs
    are cast to ``dtype`` as the official function does; on CPU the math runs in the
    promoted dtype of q/k/v (float32 for a float32 model). Returns [B, Lq, Nq, C2] in
    q's dtype.
    """
    out_dtype = q.dtype
    b, lq, nq, _ = q.shape
    lk, nk = k.size(1), k.size(2)
    device = q.device
    half_dtypes = (torch.float16, torch.bfloat16)
    if device.type == "cuda":
        def cast(x: torch.Tensor) -> torch.Tensor:
            return x if x.dtype in half_dtypes else x.to(dtype)
        q, k, v = cast(q), cast(k), cast(v)
        compute = v.dtype
    else:
        compute = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if q_scale is not None:
        q = q * q_scale

    def lens(x: torch.Tensor | None, full: int) -> torch.Tensor | None:
        if x is None:
            return None
        x = torch.as_tensor(x).to(device=device, dtype=torch.long).reshape(-1)
        return None if bool((x >= full).all()) else x.clamp(0, full)

    ql, kl = lens(q_lens, lq), lens(k_lens, lk)
    local = window_size is not None and tuple(window_size) != (-1, -1)

    mask = None
    if kl is not None or ql is not None or causal or local:
        kpos = torch.arange(lk, device=device)
        qpos = torch.arange(lq, device=device)
        k_valid = kl if kl is not None else torch.full((b,), lk, device=device, dtype=torch.long)
        q_valid = ql if ql is not None else torch.full((b,), lq, device=device, dtype=torch.long)
        mask = kpos.view(1, 1, lk) < k_valid.view(b, 1, 1)  # [B, 1, Lk]
        mask = mask.expand(b, lq, lk)
        if causal or local:
            # flash-attn aligns the diagonal bottom-right: query i sees key j when
            # j <= i + (k_len - q_len) (causal), within [-left, +right] of it (window).
            diag = qpos.view(1, lq, 1) + (k_valid - q_valid).view(b, 1, 1)
            rel = kpos.view(1, 1, lk) - diag
            left, right = (window_size if local else (-1, -1))
            if causal:
                right = 0
            if right >= 0:
                mask = mask & (rel <= right)
            if left >= 0:
                mask = mask & (rel >= -left)
        mask = mask.unsqueeze(1)  # [B, 1, Lq, Lk]

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if nk != nq:
        rep = nq // nk
        kt = kt.repeat_interleave(rep, dim=1)
        vt = vt.repeat_interleave(rep, dim=1)

    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, scale=softmax_scale)
    else:
        # A query row with no visible key would give NaN: let it see everything and
        # zero it afterwards (flash-attn returns zeros there).
        empty = ~mask.any(dim=-1, keepdim=True)  # [B, 1, Lq, 1]
        safe = mask | empty
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=safe, dropout_p=dropout_p, scale=softmax_scale)
        out = out.masked_fill(empty, 0.0)
    out = out.transpose(1, 2)  # [B, Lq, Nq, C2]
    if ql is not None:
        qmask = torch.arange(lq, device=device).view(1, lq) < ql.view(b, 1)
        out = out * qmask.view(b, lq, 1, 1).to(out.dtype)
    return out.contiguous().type(out_dtype)


def make_wan21_vae(model: torch.nn.Module, *, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """The official ``Wan2_1_VAE`` wrapper around an already-loaded ``WanVAE_``.

    ``Wan2_1_VAE.__init__`` hard-codes the width (``dim=96``) and loads the ``.pth``
    itself; here its ``_video_vae`` factory is swapped for the duration of the call so
    the official wrapper (latent mean/std, encode/decode) is kept for any width.
    """
    import_wan()
    vae2_1 = sys.modules["wan.modules.vae2_1"]
    orig = vae2_1._video_vae
    with _lock:
        vae2_1._video_vae = lambda pretrained_path=None, z_dim=None, device="cpu", **kw: model
        try:
            return vae2_1.Wan2_1_VAE(z_dim=model.z_dim, vae_pth=None, dtype=dtype, device=device)
        finally:
            vae2_1._video_vae = orig
