"""Start-up pre-flight: is this GPU usable, and how much of the two model sets can it hold?

RunPod may start a worker on any GPU type the endpoint allows. A worker on a card
whose architecture the installed torch was not built for, or behind a driver too old
for its CUDA, would otherwise accept jobs and fail every one of them. So before the
first job, on CUDA:

1. CUDA initialises (driver and runtime agree), the context is created (timed);
2. the device's architecture is among those torch was built for (or PTX can be JIT'ed);
3. a real kernel runs: a small matmul (cuBLAS) and a convolution (cuDNN), checked
   against the CPU — this also creates the cuBLAS and cuDNN handles a first job
   would otherwise pay for;
4. the attention backend's self-check runs (:func:`attention_self_check`; its choice is
   handed to the video engine);
5. the card's total memory decides the ModelManager's policy
   (:func:`plan_policy`): keep both sets resident when they fit with the common
   jobs' activations, always swap whole sets when only one fits, and refuse to start
   when even the Wan set does not fit with a 480p clip — with the numbers.

Any failure raises :class:`PreflightError`: the handler process exits at start with the
message, and RunPod marks the worker unhealthy instead of routing jobs to it. On CPU
only the policy step runs (tests fake the device's size with :class:`GpuFacts`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from storystudio.errors import PreflightError
from storystudio.models.footprint import video_working_bytes

logger = logging.getLogger(__name__)

GiB = 1024**3
# The job every video worker must be able to run: a 480p clip of the default 80 frames.
MIN_VIDEO_AREA = 480 * 832
MIN_VIDEO_FRAMES = 80
Policy = Literal["keep-both", "always-swap"]
__all__ = ["GpuFacts", "PreflightError", "PreflightReport", "plan_policy", "run_preflight"]


@dataclass(frozen=True)
class GpuFacts:
    """What the pre-flight needs to know about the device (read from CUDA, or faked in tests)."""

    name: str
    total_bytes: int
    capability: tuple[int, int] = (0, 0)
    arch_list: tuple[str, ...] = ()


@dataclass
class PreflightReport:
    device: str
    gpu: GpuFacts | None
    policy: Policy
    budget_bytes: int | None
    attention: Any = None  # storystudio.models.attention.AttentionSelection, on CUDA
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "gpu": None if self.gpu is None else self.gpu.name,
            "vram_gib": None if self.gpu is None else round(self.gpu.total_bytes / GiB, 1),
            "policy": self.policy,
            "attention": None if self.attention is None else self.attention.backend,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


# ----------------------------------------------------------------------------- checks


def init_cuda(device: torch.device) -> float:
    """Initialise CUDA and create the context on ``device``; returns seconds. Fails with the driver's reason."""
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        reason = ""
        try:
            torch.cuda.init()
        except (RuntimeError, AssertionError) as exc:
            reason = f": {exc}"
        raise PreflightError(
            f"CUDA is not usable{reason or ' (no device visible, or the NVIDIA driver is missing or too old)'}; "
            f"torch {torch.__version__} was built for CUDA {torch.version.cuda}"
        )
    if device.index is None:  # "cuda" means the current device; set_device wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # creates the primary context
        torch.cuda.synchronize(device)
    except RuntimeError as exc:
        raise PreflightError(f"cannot create a CUDA context on {device}: {exc}") from exc
    return time.perf_counter() - t0


def gpu_facts(device: torch.device) -> GpuFacts:
    props = torch.cuda.get_device_properties(device)
    return GpuFacts(
        name=props.name,
        total_bytes=int(props.total_memory),
        capability=(props.major, props.minor),
        arch_list=tuple(torch.cuda.get_arch_list()),
    )


def check_arch(facts: GpuFacts) -> None:
    """The device's compute capability must have SASS in torch's build, or older PTX to JIT from."""
    if not facts.arch_list:
        return
    cap = facts.capability[0] * 10 + facts.capability[1]
    sass = {int(a[3:]) for a in facts.arch_list if a.startswith("sm_") and a[3:].isdigit()}
    ptx = {int(a[8:]) for a in facts.arch_list if a.startswith("compute_") and a[8:].isdigit()}
    same_major = {a for a in sass if a // 10 == cap // 10 and a <= cap}
    if cap in sass or same_major or any(p <= cap for p in ptx):
        return
    raise PreflightError(
        f"{facts.name} is compute capability {facts.capability[0]}.{facts.capability[1]} (sm_{cap}), but torch "
        f"{torch.__version__} was built for {', '.join(facts.arch_list)}: its kernels cannot run on this GPU. "
        "Use an image built for this architecture, or exclude this GPU type from the endpoint."
    )


def check_kernels(device: torch.device) -> float:
    """A matmul (cuBLAS) and a convolution (cuDNN) on the device, compared with the CPU; returns seconds."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    x, w = torch.randn(1, 8, 32, 32, generator=g), torch.randn(8, 8, 3, 3, generator=g)
    try:
        mm = (a.to(device) @ b.to(device)).cpu()
        conv = torch.nn.functional.conv2d(x.to(device), w.to(device), padding=1).cpu()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
    except RuntimeError as exc:  # "no kernel image is available for execution on the device", ...
        raise PreflightError(f"a test kernel failed on {device}: {exc}") from exc
    # TF32 may be on for matmuls: a loose tolerance still catches garbage.
    if not torch.allclose(mm, a @ b, rtol=2e-2, atol=2e-1) or not torch.allclose(
        conv, torch.nn.functional.conv2d(x, w, padding=1), rtol=2e-2, atol=2e-1
    ):
        raise PreflightError(f"a test kernel on {device} returned wrong results (matmul/conv differ from the CPU)")
    return time.perf_counter() - t0


def attention_self_check(device: torch.device, *, heads: int, head_dim: int, requested: str = "auto"):
    """The attention backend's self-check (:func:`storystudio.models.attention.select_backend`).

    Every candidate kernel is run on the device against a float64 reference and the
    fastest correct one is chosen; the result goes to the video engine, which then does
    not repeat the check at load. When no candidate passes, the GPU cannot run the
    video model correctly and the worker must not start. A forced ``sdpa``/``default``
    (no check by design) gets the plain ``math`` kernel checked instead.
    """
    from storystudio.models.attention import check_candidate, select_backend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sel = select_backend(device=device, dtype=dtype, heads=heads, head_dim=head_dim, requested=requested)
    checks = sel.checks or [check_candidate("math", device=device, dtype=dtype, head_dim=head_dim)]
    if not any(c.ok for c in checks):
        notes = "; ".join(f"{c.name}: {c.note}" for c in checks)
        raise PreflightError(f"no attention kernel passes its self-check on {device}: {notes}")
    return sel


# ----------------------------------------------------------------------------- policy


def plan_policy(
    gpu: GpuFacts,
    *,
    budget_bytes: int,
    wan_bytes: int | None,
    image_bytes: int | None,
) -> Policy:
    """How the ModelManager uses a card of ``budget_bytes`` (total minus headroom, or the override).

    * Wan's weights plus a 480p clip's activations do not fit: refuse, with the numbers
      (the worker could never render a video);
    * both sets plus that clip do not fit: ``always-swap`` (the other set is parked whole
      whenever a set is needed);
    * otherwise ``keep-both`` (only the bytes a job needs are parked, usually none).

    A model whose folder was not found counts as 0 bytes (its jobs report the missing
    checkpoint); the decision is then made on what is known.
    """
    clip = video_working_bytes(MIN_VIDEO_AREA, MIN_VIDEO_FRAMES)
    wan, image = wan_bytes or 0, image_bytes or 0
    if wan and wan + clip > budget_bytes:
        raise PreflightError(
            f"{gpu.name} is too small for Wan2.2-S2V: {gpu.total_bytes / GiB:.1f} GiB of VRAM leaves a budget of "
            f"{budget_bytes / GiB:.1f} GiB, but its weights take {wan / GiB:.1f} GiB and a 480p clip of "
            f"{MIN_VIDEO_FRAMES} frames needs {clip / GiB:.1f} GiB of activations "
            f"({(wan + clip) / GiB:.1f} GiB in all). Use a GPU with at least "
            f"{(wan + clip + (gpu.total_bytes - budget_bytes)) / GiB:.0f} GiB."
        )
    if wan + image + clip > budget_bytes:
        logger.warning(
            "%s: %.1f GiB budget cannot hold both model sets (%.1f + %.1f GiB) with a 480p clip (%.1f GiB): "
            "every switch between images and videos swaps the sets whole",
            gpu.name,
            budget_bytes / GiB,
            wan / GiB,
            image / GiB,
            clip / GiB,
        )
        return "always-swap"
    return "keep-both"


def run_preflight(
    device: torch.device,
    *,
    budget_override_bytes: int | None,
    reserve_bytes: int,
    wan_bytes: int | None,
    image_bytes: int | None,
    facts: GpuFacts | None = None,
    attention_shape: tuple[int, int] = (40, 128),
    attention_request: str = "auto",
) -> PreflightReport:
    """Every check for ``device``; raises :class:`PreflightError` when the worker must not start.

    ``facts`` replaces what is read from the device (tests fake a card's size on CPU);
    the CUDA checks run only on a CUDA device. ``attention_shape`` is the DiT's
    (heads, head dim), ``attention_request`` the ``STORYSTUDIO_ATTENTION`` choice.
    """
    seconds: dict[str, float] = {}
    attention = None
    if device.type == "cuda":
        seconds["cuda_context"] = init_cuda(device)
        real = gpu_facts(device)
        check_arch(real)
        seconds["kernels"] = check_kernels(device)
        t0 = time.perf_counter()
        heads, head_dim = attention_shape
        attention = attention_self_check(device, heads=heads, head_dim=head_dim, requested=attention_request)
        seconds["attention"] = time.perf_counter() - t0
        facts = facts or real
    if facts is None:
        return PreflightReport(str(device), None, "keep-both", budget_override_bytes)
    budget = budget_override_bytes if budget_override_bytes is not None else facts.total_bytes - reserve_bytes
    policy = plan_policy(facts, budget_bytes=budget, wan_bytes=wan_bytes, image_bytes=image_bytes)
    report = PreflightReport(str(device), facts, policy, budget, attention, seconds)
    logger.info(
        "pre-flight OK: %s, %.1f GiB VRAM (budget %.1f GiB), policy %s, attention %s, %s",
        facts.name,
        facts.total_bytes / GiB,
        budget / GiB,
        policy,
        None if attention is None else attention.backend,
        ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()) or "no CUDA checks",
    )
    return report
