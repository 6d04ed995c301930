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
* Attention: the official ``flash_attention`` asserts CUDA and flash_attn. Our
  :func:`flash_attention` (same signature) is bound to that name in every official
  module that imported it, always: it runs the backend chosen by the engine's start-up
  self-check (:mod:`storystudio.models.attention`: cuDNN / flash-attn 2/3/4 / SDPA
  kernels) inside :func:`use_attention`, and outside it the ``default`` path that ran
  before: the official function when flash-attn is importable, else torch SDPA
  honouring ``q_lens``/``k_lens`` as padding masks.
* :func:`attention_backend` tells which one the ``default`` path uses (logs, bench).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from storystudio.models import attention

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
_official_flash: Callable[..., Any] | None = None  # the official function, kept when flash-attn is importable
_active = "default"  # see use_attention()
_open: list[tuple[object, str]] = []  # (token, backend) of each open use_attention block, oldest first


def attention_backend() -> Backend:
    """Which attention the ``default`` path uses: ``fa3``, ``fa2`` or ``sdpa`` (torch).

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
    WanModel_S2V`` works and its attention runs through :func:`flash_attention`.
    """
    global _done, _backend, _official_flash
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
        if backend != "sdpa":
            _official_flash = sys.modules["wan.modules.attention"].flash_attention
        for name in _FLASH_IMPORTERS:
            mod = sys.modules.get(name)
            if mod is None:
                try:
                    mod = importlib.import_module(name)
                except ImportError:  # pragma: no cover - optional module
                    continue
            if hasattr(mod, "flash_attention"):
                mod.flash_attention = flash_attention
        log.info("wan22 imported from %s (attention backend: %s)", root, backend)
        _done = True
        return sys.modules["wan"]


# ----------------------------------------------------------------------------- attention shim
def flash_attention(
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
    """Drop-in for ``wan.modules.attention.flash_attention``, on the active backend.

    Bound by :func:`import_wan` in every official module that imported the official
    function. q: [B, Lq, Nq, C1], k: [B, Lk, Nk, C1], v: [B, Lk, Nk, C2]; flash-attn varlen
    semantics for ``q_lens``/``k_lens`` (see :func:`storystudio.models.attention.masked_sdpa`).
    On CUDA non-half inputs are cast to ``dtype`` as the official function does; on CPU
    the math runs in the promoted dtype of q/k/v (float32 for a float32 model). Returns
    [B, Lq, Nq, C2] in q's dtype.

    Backend ``default`` is what ran before the self-check existed: the official function
    when flash-attn is importable, else torch SDPA choosing its own kernel. Inside a
    ``torch.compile``d region the call goes through the opaque custom op
    ``storystudio::wan_attention`` so that the kernel choice and the padding check run
    at call time, not at trace time; reading ``_active`` here makes dynamo guard on it,
    so a compiled block recompiles rather than keep a stale backend.
    """
    backend = _active
    if backend == "default":
        if _official_flash is not None:
            return _official_flash(q, k, v, q_lens=q_lens, k_lens=k_lens, dropout_p=dropout_p,
                                   softmax_scale=softmax_scale, q_scale=q_scale, causal=causal,
                                   window_size=window_size, deterministic=deterministic, dtype=dtype,
                                   version=version)
        backend = "sdpa"
    out_dtype = q.dtype
    if q.device.type == "cuda":
        def cast(x: torch.Tensor) -> torch.Tensor:
            return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(dtype)
        q, k, v = cast(q), cast(k), cast(v)
        compute = v.dtype
    else:
        compute = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if q_scale is not None:
        q = q * q_scale
    window = [-1, -1] if window_size is None else [int(w) for w in window_size]
    if torch.compiler.is_compiling():
        out = torch.ops.storystudio.wan_attention(q, k, v, q_lens, k_lens, backend, float(dropout_p),
                                                  softmax_scale, bool(causal), window)
    else:
        out = attention.attention(backend, q, k, v, q_lens, k_lens, dropout_p=dropout_p,
                                  softmax_scale=softmax_scale, causal=causal, window_size=tuple(window))
    return out.type(out_dtype)


@torch.library.custom_op("storystudio::wan_attention", mutates_args=())
def _wan_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor | None,
                      k_lens: torch.Tensor | None, backend: str, dropout_p: float, softmax_scale: float | None,
                      causal: bool, window_size: list[int]) -> torch.Tensor:
    """:func:`storystudio.models.attention.attention` as an op that compiled graphs call opaquely."""
    return attention.attention(backend, q, k, v, q_lens, k_lens, dropout_p=dropout_p, softmax_scale=softmax_scale,
                               causal=causal, window_size=(window_size[0], window_size[1]))


@_wan_attention_op.register_fake
def _(q, k, v, q_lens, k_lens, backend, dropout_p, softmax_scale, causal, window_size):
    return q.new_empty((q.size(0), q.size(1), q.size(2), v.size(-1)))


def active_attention() -> str:
    """The backend the shim uses right now (``default`` outside :func:`use_attention`)."""
    return _active


@contextlib.contextmanager
def use_attention(backend: str) -> Iterator[None]:
    """Run the official modules' attention on ``backend`` for the duration of the block.

    Process state on purpose: the official modules look ``flash_attention`` up as a
    module global, so the choice cannot be passed through their ``forward``. The engine
    enters this around each generation (one at a time per GPU, under the ModelManager's
    lock) and on exit the backend of the innermost block still open comes back.

    Blocks may overlap in time when several engines share one process (the tests' fake
    fleet runs workers as threads): each open block is an entry in ``_open``, and exits in
    any order leave ``_active`` as the newest entry still open, or ``default`` when none is
    (saving and restoring a "previous" value would leave a finished block's backend behind).
    """
    global _active
    if backend not in attention.BACKENDS and backend != "default":
        raise ValueError(f"unknown attention backend {backend!r}")
    import_wan()
    token = object()
    with _lock:
        _open.append((token, backend))
        _active = backend
    try:
        yield
    finally:
        with _lock:
            _open[:] = [entry for entry in _open if entry[0] is not token]
            _active = _open[-1][1] if _open else "default"


def make_wan21_vae(model: torch.nn.Module, *, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """The official ``Wan2_1_VAE`` wrapper around a ``WanVAE_`` built elsewhere (possibly on ``meta``).

    ``Wan2_1_VAE.__init__`` hard-codes the width (``dim=96``), loads the ``.pth``
    itself and moves the module with ``.to(device)``. Here its ``_video_vae`` factory
    is swapped, for the duration of the call, for an empty placeholder, and the given
    module is put in its place afterwards: the official wrapper (latent mean/std on
    ``device``, encode/decode) is kept for any width, and the module's weights stay
    where the loader puts them (the ModelManager reads them in later).
    """
    import_wan()
    vae2_1 = sys.modules["wan.modules.vae2_1"]
    orig = vae2_1._video_vae
    with _lock:
        vae2_1._video_vae = lambda pretrained_path=None, z_dim=None, device="cpu", **kw: torch.nn.Module()
        try:
            vae = vae2_1.Wan2_1_VAE(z_dim=model.z_dim, vae_pth=None, dtype=dtype, device=device)
        finally:
            vae2_1._video_vae = orig
    vae.model = model.eval().requires_grad_(False)
    return vae
