"""How many ranks a worker runs, and how: read once from the environment at start-up.

A RunPod endpoint with 2, 4 or 8 GPUs per worker starts one container that sees them
all; the worker uses every visible GPU unless told otherwise:

* ``STORYSTUDIO_DISTRIBUTED`` — ``auto`` (default: several ranks when several GPUs are
  visible) or ``off`` (one process on one GPU, the others idle).
* ``STORYSTUDIO_GPUS`` — number of ranks (default: ``torch.cuda.device_count()`` on CUDA,
  1 on CPU; on CPU it runs that many gloo ranks, which is what the tests do).
* ``STORYSTUDIO_PARALLEL_MODE`` — ``auto`` (``cfg`` for an even number of ranks, else
  ``ulysses``), ``ulysses`` or ``cfg`` (see :mod:`storystudio.distributed.parallel_dit`).
* ``STORYSTUDIO_DIST_START_TIMEOUT_S`` (300), ``STORYSTUDIO_DIST_JOB_TIMEOUT_S`` (none:
  RunPod's execution timeout applies), ``STORYSTUDIO_DIST_COLLECTIVE_TIMEOUT_S`` (1800).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from storystudio.errors import InvalidInput

# NVLink SHARP / multicast objects are not available on the lent and RunPod machines
# (and NCCL's NVLS init can hang or fail there): always off, in this process and in
# every process it spawns (children inherit os.environ at spawn time).
MULTICAST_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

MODES = ("auto", "ulysses", "cfg")


def disable_multicast(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Set :data:`MULTICAST_OFF_ENV` in ``env`` (``os.environ`` by default) before any spawn."""
    for key, value in MULTICAST_OFF_ENV.items():
        env[key] = value


def _number(env: Mapping[str, str], name: str, default: float | None, *, minimum: float) -> float | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"environment variable {name}={raw!r} is not a number", code="invalid_config") from None
    if value < minimum:
        raise InvalidInput(f"environment variable {name}={raw!r} must be >= {minimum:g}", code="invalid_config")
    return value


@dataclass(frozen=True)
class DistributedConfig:
    """The rank pool of one worker."""

    world_size: int = 1
    mode: str = "auto"
    start_timeout_s: float = 300.0
    job_timeout_s: float | None = None
    collective_timeout_s: float = 1800.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, device: str) -> DistributedConfig:
        env = os.environ if env is None else env
        switch = (env.get("STORYSTUDIO_DISTRIBUTED") or "auto").strip().lower()
        if switch not in ("auto", "off"):
            raise InvalidInput(f"STORYSTUDIO_DISTRIBUTED must be auto or off, not {switch!r}", code="invalid_config")
        mode = (env.get("STORYSTUDIO_PARALLEL_MODE") or "auto").strip().lower()
        if mode not in MODES:
            raise InvalidInput(f"STORYSTUDIO_PARALLEL_MODE must be one of {', '.join(MODES)}, not {mode!r}",
                               code="invalid_config")
        on_cuda = device.startswith("cuda")
        visible = _cuda_count() if on_cuda else 1
        raw = (env.get("STORYSTUDIO_GPUS") or "").strip()
        if raw:
            try:
                ranks = int(raw)
            except ValueError:
                raise InvalidInput(f"STORYSTUDIO_GPUS={raw!r} is not an integer", code="invalid_config") from None
            if ranks < 1 or (on_cuda and ranks > visible):
                raise InvalidInput(f"STORYSTUDIO_GPUS={ranks} but {visible} GPU(s) are visible", code="invalid_config")
        else:
            ranks = visible
        if switch == "off":
            ranks = 1
        if mode == "cfg" and ranks > 1 and ranks % 2:
            raise InvalidInput(f"STORYSTUDIO_PARALLEL_MODE=cfg needs an even number of ranks, not {ranks}",
                               code="invalid_config")
        return cls(
            world_size=ranks,
            mode=mode,
            start_timeout_s=_number(env, "STORYSTUDIO_DIST_START_TIMEOUT_S", 300.0, minimum=1.0),
            job_timeout_s=_number(env, "STORYSTUDIO_DIST_JOB_TIMEOUT_S", None, minimum=1.0),
            collective_timeout_s=_number(env, "STORYSTUDIO_DIST_COLLECTIVE_TIMEOUT_S", 1800.0, minimum=10.0),
        )


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
