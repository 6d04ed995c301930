"""What both engines share: the dtype policy, request-value checks and the residency check.

Kept in one place so the image and video engines cannot drift apart on rules the
ModelManager and the job schema rely on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from storystudio.errors import GenerationError


def resolve_device(device: str | torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:<current>`` so that ``tensor.device == device`` comparisons hold.

    Parameters report an indexed device; the residency checks of the engines and the
    ModelManager compare against it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the official release dtype); float32 on CPU, where bf16 kernels are slow or missing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def is_int(v: object) -> bool:
    """An integer request value (numpy integers too), but not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def require_resident(components: dict[str, nn.Module], device: torch.device) -> None:
    """Fail clearly if a component's weights are not on ``device``.

    The ModelManager guarantees residency while a job runs; this turns a broken
    guarantee (an engine used outside the manager while parked) into a clear job
    error instead of a device-mismatch traceback deep inside a kernel.
    """
    for name, module in components.items():
        for p in module.parameters():
            if p.device != device:
                raise GenerationError(
                    f"{name} weights are on {p.device}, not on {device}: the model is not resident",
                    code="generation_failed",
                )
            break
