"""Z-Image-Turbo text-to-image engine on the official diffusers pipeline.

Weights live in three ``nn.Module`` components (transformer, text_encoder, vae) that
the ModelManager may park in pinned host memory and bring back by reassigning
``param.data`` / buffers. This engine therefore keeps no other reference to weight
tensors, never calls ``pipe.to()`` and reads the device from ``self.device`` at call
time. ``ZImagePipeline._execution_device`` is derived from the components' parameters,
so it follows the weights wherever the manager put them; ``generate`` checks that they
are all on ``self.device`` before running.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from storystudio import limits as L
from storystudio.errors import CheckpointError, GenerationError, InvalidInput
from storystudio.models.engine import default_dtype, is_int, require_resident, resolve_device
from storystudio.models.checkpoints.common import empty_weights, serialized_build
from storystudio.models.checkpoints.zimage import TEXT_ENCODER_KEY_PREFIX, validate_zimage
from storystudio.models.weight_files import LoadPlan, bind, sharded_safetensors_sources
from storystudio.models.weight_loader import materialize

log = logging.getLogger(__name__)



@dataclass
class ImageRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = L.IMAGE_SIZE_DEFAULT
    height: int = L.IMAGE_SIZE_DEFAULT
    steps: int = L.IMAGE_STEPS_DEFAULT
    guidance: float = L.IMAGE_GUIDANCE_DEFAULT
    seed: int | None = None


@dataclass
class ImageResult:
    image: Image.Image
    seed: int
    width: int
    height: int
    seconds: float


def validate_image_request(request: ImageRequest, *, multiple: int = L.IMAGE_SIZE_MULTIPLE) -> None:
    """Refuse a request the pipeline cannot run, before any model moves (render.py calls it first).

    Bounds from :mod:`storystudio.limits`, as in the job schema; ``multiple`` is the loaded pipeline's
    pixel multiple (vae_scale_factor * patch size), :data:`~storystudio.limits.IMAGE_SIZE_MULTIPLE` for
    the official checkpoint.
    """
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InvalidInput("prompt must be a non-empty string")
    if not isinstance(request.negative_prompt, str):
        raise InvalidInput("negative_prompt must be a string")
    m = multiple
    for field in ("width", "height"):
        v = getattr(request, field)
        if not is_int(v):
            raise InvalidInput(f"{field} must be an integer, got {v!r}")
        if not L.IMAGE_SIZE_MIN <= v <= L.IMAGE_SIZE_MAX:
            raise InvalidInput(f"{field} must be between {L.IMAGE_SIZE_MIN} and {L.IMAGE_SIZE_MAX}, got {v}")
        if v % m:
            raise InvalidInput(f"{field} must be a multiple of {m}, got {v}")
    if not is_int(request.steps) or not 1 <= request.steps <= L.IMAGE_STEPS_MAX:
        raise InvalidInput(f"steps must be an integer between 1 and {L.IMAGE_STEPS_MAX}, got {request.steps!r}")
    g = request.guidance
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g <= L.IMAGE_GUIDANCE_MAX:
        raise InvalidInput(f"guidance must be a number between 0 and {L.IMAGE_GUIDANCE_MAX}, got {g!r}")
    if request.seed is not None and (not is_int(request.seed) or not 0 <= request.seed <= L.SEED_MAX):
        raise InvalidInput(f"seed must be an integer between 0 and {L.SEED_MAX}, got {request.seed!r}")


class ZImageGenerator:
    """Text-to-image with Z-Image-Turbo. Build with :meth:`from_pretrained`."""

    name = "zimage"

    def __init__(self, pipe, *, device: torch.device, dtype: torch.dtype, path: Path) -> None:
        self._pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.path = path
        pipe.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    @serialized_build
    def plan(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        validate: bool = True,
    ) -> LoadPlan:
        """The engine with its three weight components built on ``meta``, and where their bytes are.

        The official classes are instantiated from their config files (no weights
        allocated), the tokenizer and scheduler are loaded as usual, and the
        safetensors of each component are described, not read: the ModelManager reads
        them into its parking buffer and the GPU (:mod:`storystudio.models.weight_loader`).
        ``validate=False`` skips the folder check when the caller has just run it
        (:mod:`storystudio.models.locate`).
        """
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

        root = Path(path)
        if validate:
            validate_zimage(root)
        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        try:
            with empty_weights():
                transformer = ZImageTransformer2DModel.from_config(
                    ZImageTransformer2DModel.load_config(root / "transformer")
                )
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
                text_encoder = Qwen3Model._from_config(Qwen3Config.from_pretrained(root / "text_encoder"), dtype=dtype)
            sources = {
                "transformer": bind(
                    transformer,
                    sharded_safetensors_sources(root / "transformer", "diffusion_pytorch_model"),
                    what="Z-Image transformer",
                    where="transformer/",
                    dtype=dtype,
                ),
                "text_encoder": bind(
                    text_encoder,
                    sharded_safetensors_sources(root / "text_encoder", "model", strip_prefix=TEXT_ENCODER_KEY_PREFIX),
                    what="Z-Image text encoder",
                    where="text_encoder/",
                    dtype=dtype,
                    ignore=("lm_head.weight",),  # Qwen3ForCausalLM's head, tied and unused by Qwen3Model
                ),
                "vae": bind(vae, sharded_safetensors_sources(root / "vae", "diffusion_pytorch_model"),
                            what="Z-Image VAE", where="vae/", dtype=dtype),
            }
            pipe = ZImagePipeline(
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
                transformer=transformer,
            )
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"Z-Image-Turbo checkpoint at {root} could not be loaded: {type(exc).__name__}: {exc}",
                code="checkpoint_corrupt",
            ) from exc
        for module in (transformer, text_encoder, vae):
            module.eval().requires_grad_(False)
        return LoadPlan(cls(pipe, device=device, dtype=dtype, path=root), sources)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> ZImageGenerator:
        """Validate the folder and load the weights onto ``device`` without a ModelManager (tests, tools)."""
        device = resolve_device(device)
        t0 = time.perf_counter()
        engine = materialize(cls.plan(path, device=device, dtype=dtype), device)
        log.info("Z-Image-Turbo loaded from %s on %s in %.1fs", path, device, time.perf_counter() - t0)
        return engine  # type: ignore[return-value]

    def warmup(self, width: int = 1024, height: int = 1024) -> float:
        """One 1-step generation at ``width × height``; returns its seconds.

        Run by the worker's pre-warm, so that what only the first call pays (cuBLAS and
        cuDNN handles and workspaces, lazily loaded kernels, the caching allocator's
        first blocks, the tokenizer's chat template) is paid before the first job.
        """
        return self.generate(ImageRequest(prompt="warm-up", width=width, height=height, steps=1, seed=0)).seconds

    # ------------------------------------------------------------------ contract
    def components(self) -> dict[str, torch.nn.Module]:
        return {
            "transformer": self._pipe.transformer,
            "text_encoder": self._pipe.text_encoder,
            "vae": self._pipe.vae,
        }

    @property
    def vae_scale(self) -> int:
        """Pixel multiple the pipeline needs: vae_scale_factor * 2 (patch size) = 16."""
        return int(self._pipe.vae_scale_factor) * 2

    # ------------------------------------------------------------------ generation
    def validate(self, request: ImageRequest) -> None:
        validate_image_request(request, multiple=self.vae_scale)

    def generate(
        self,
        request: ImageRequest,
        progress: Callable[[int, int], None] | None = None,
    ) -> ImageResult:
        self.validate(request)
        require_resident(self.components(), self.device)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        steps = request.steps
        generator = torch.Generator(device=self.device).manual_seed(seed)

        def on_step_end(pipe, i, t, callback_kwargs):
            if progress is not None:
                progress(i + 1, steps)
            return {}

        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self._pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt or None,
                    height=request.height,
                    width=request.width,
                    num_inference_steps=steps,
                    guidance_scale=float(request.guidance),
                    generator=generator,
                    callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=[],
                    output_type="pil",
                )
        except torch.cuda.OutOfMemoryError:
            raise  # the ModelManager retries once with everything else parked, then reports out_of_memory
        except (RuntimeError, ValueError) as exc:
            raise GenerationError(f"image generation failed: {type(exc).__name__}: {exc}") from exc
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        image = out.images[0]
        if image.size != (request.width, request.height):  # pragma: no cover - pipeline contract
            raise GenerationError(f"pipeline returned {image.size}, expected {(request.width, request.height)}")
        return ImageResult(image=image, seed=seed, width=request.width, height=request.height, seconds=seconds)
