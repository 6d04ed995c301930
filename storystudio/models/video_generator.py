"""Wan2.2-S2V talking-video engine on the official Wan2.2 code and checkpoint layout.

Built diffusers-style from explicit official components (see :meth:`WanS2VGenerator.
from_pretrained`): ``WanModel_S2V`` (transformer), the umt5 ``T5Encoder`` (text
encoder), ``Wan2_1_VAE`` and the wav2vec2 ``AudioEncoder``. ``generate`` mirrors the
official ``WanS2V.generate`` (wan/speech2video.py) but takes the image, audio and pose
frames as in-memory arrays, runs on any device (autocast only on CUDA) and reports
progress per clip. It is split into named phases (plan, audio embedding, reference and
motion latents, text context, the per-clip denoising loop, decode); the loop
(:meth:`WanS2VGenerator._denoise`) takes the per-step model call as a function, the seam
where step-level speed-ups plug in.

How a generation runs is set by :class:`~storystudio.models.video_path.VideoPathOptions`
(``engine.options``, read at every generate): the exact path (default: the attention
kernel picked by the start-up self-check, CFG's two branches in one batch-2 forward
when memory allows, regional ``torch.compile`` of the DiT blocks on CUDA for every clip
length, a last clip only as long as the audio needs and a tail of one latent frame merged
into the clip before it) or the baseline (the engine before issue 10). Both give the same
video up to float rounding; each result's ``engine`` dict says what ran.

Contract with the ModelManager: the weight-holding modules are exactly those of
:meth:`components`; the manager moves them by reassigning ``param.data`` / buffers, so
this engine keeps no other reference to weight tensors and reads the device from
``self.device`` at call time. Small non-parameter tensors of the official classes (VAE
mean/std, rope frequencies) stay where they were created.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from storystudio import limits as L
from storystudio.limits import RESOLUTIONS
from storystudio.limits import SPEECH_SAMPLE_RATE as SAMPLE_RATE
from storystudio.limits import VIDEO_FPS as FPS
from storystudio.errors import CheckpointError, GenerationError, InvalidInput
from storystudio.models.attention import AttentionSelection, select_backend
from storystudio.models.clip_plan import plan_clip_frames
from storystudio.models.compile import (COMPILE_CACHE_DIRNAME, DiTCompiler, configure_cache, configure_inductor,
                                        dynamic_for)
from storystudio.models.engine import default_dtype, is_int, require_resident, resolve_device
from storystudio.models.footprint import GiB, video_working_bytes
from storystudio.models.fused_rope import fused_rope
from storystudio.models.video_path import VideoPathOptions
from storystudio.models.checkpoints.common import read_json, serialized_build
from storystudio.models.checkpoints.wan_s2v import (
    CONFIG_FILE,
    INDEX_FILE,
    T5_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    WAV2VEC_DIR,
    meta_t5,
    meta_transformer,
    meta_vae,
    t5_arch_from_state,
    validate_wan_s2v,
    vae_dim_from_state,
)
from storystudio.models import fp8, speed
from storystudio.models.weight_files import LoadPlan, bind, sharded_safetensors_sources, torch_file_sources
from storystudio.models.weight_loader import materialize
from storystudio.patches import wan22

log = logging.getLogger(__name__)



@dataclass
class VideoRequest:
    image: Image.Image  # reference image (any size; official size selection applies)
    audio: np.ndarray  # float32 mono, 16 kHz
    prompt: str = ""
    negative_prompt: str | None = None  # None -> official config.sample_neg_prompt
    pose_frames: np.ndarray | None = None  # uint8 [T,H,W,3] at 16 fps
    resolution: str = L.VIDEO_RESOLUTION_DEFAULT
    max_area: int | None = None  # explicit override of the resolution's area
    infer_frames: int = L.INFER_FRAMES_DEFAULT  # frames per clip, multiple of 4
    steps: int = L.VIDEO_STEPS_DEFAULT
    guidance: float = L.VIDEO_GUIDANCE_DEFAULT
    shift: float = L.VIDEO_SHIFT_DEFAULT
    seed: int | None = None
    solver: str = "unipc"
    speed: speed.SpeedPlan = speed.EXACT  # fast-preset knobs resolved for this device (storystudio.models.speed)


@dataclass
class VideoResult:
    frames: np.ndarray  # uint8 [T,H,W,3]
    fps: int
    seed: int
    width: int
    height: int
    num_clips: int
    seconds: float
    speed: dict[str, Any] | None = None  # what the fast knobs did (speed.report)
    engine: dict[str, Any] = field(default_factory=dict)  # how the exact parts ran: EngineReport.as_dict()


StepCall = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (latents, timestep, step) -> prediction
BranchForward = Callable[..., list[torch.Tensor]]  # (branch, [latents...], t=..., **dit_kwargs) -> predictions


def _deciding_steps(cache: Any, call_model: StepCall) -> StepCall:
    """``call_model`` preceded by the step cache's per-step decision (once per step, for every branch)."""

    def call(latents: torch.Tensor, timestep: torch.Tensor, step: int) -> torch.Tensor:
        cache.begin_step(step, timestep, latents)
        return call_model(latents, timestep, step)

    return call


@dataclass
class GenerationPlan:
    """Sizes, seed and clip lengths of one generation (phase 1)."""

    height: int
    width: int
    seed: int
    infer_frames: int
    target_frames: int  # frames of the output: round(audio seconds * 16)
    clip_frames: list[int]  # frames generated per clip

    @property
    def num_clips(self) -> int:
        return len(self.clip_frames)

    @property
    def clip_starts(self) -> list[int]:
        """The frame each clip starts at in the audio and pose windows (official: ``r * infer_frames``;
        a merged tail makes a clip longer, so the windows follow the clips' own lengths)."""
        return [sum(self.clip_frames[:r]) for r in range(self.num_clips)]


@dataclass
class ClipInputs:
    """One clip's noise, generator and DiT keyword arguments (cond and uncond branches)."""

    index: int
    frames: int
    noise: torch.Tensor  # [16, frames / 4, h, w]
    generator: torch.Generator
    cond: dict[str, Any]
    uncond: dict[str, Any]
    drop_motion: bool


@dataclass
class EngineReport:
    """How a generation ran; reported as ``engine`` in every video job's result."""

    path: str  # exact | baseline
    attention: str  # the attention backend that ran
    clip_frames: list[int]
    rope: str = "official"  # fused | official (VideoPathOptions.rope)
    cfg_batched_clips: int = 0  # clips whose CFG branches ran as one batch-2 forward
    guided_clips: int = 0  # clips with guidance > 1
    compiled_clips: int = 0  # clips that ran on the compiled DiT blocks
    notes: list[str] = field(default_factory=list)

    def note_clip(self, *, cfg_batched: bool, guided: bool) -> None:
        self.cfg_batched_clips += int(cfg_batched)
        self.guided_clips += int(guided)

    def cfg_fallback(self, clip: int) -> None:
        self.cfg_batched_clips -= 1
        self.notes.append(f"clip {clip}: CFG batch ran out of memory, two forwards used")

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "attention": self.attention,
            "rope": self.rope,
            "cfg_batched": self.guided_clips > 0 and self.cfg_batched_clips == self.guided_clips,
            "compiled": self.compiled_clips > 0,
            "clip_frames": self.clip_frames,
            "cfg_batched_clips": self.cfg_batched_clips,
            "compiled_clips": self.compiled_clips,
            "notes": self.notes,
        }


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)


def validate_video_request(request: VideoRequest) -> None:
    """Refuse a request this engine cannot run, before any model moves (render.py calls it first).

    Every bound is a constant of :mod:`storystudio.limits`, the same ones the job schema uses; what the
    schema cannot see (the decoded audio's length, the pose video) is checked only here.
    """
    if not isinstance(request.image, Image.Image):
        raise InvalidInput("image must be a PIL image")
    if min(request.image.size) < 1:
        raise InvalidInput("image is empty")
    a = request.audio
    if not isinstance(a, np.ndarray) or a.ndim != 1:
        raise InvalidInput("audio must be a 1-D float array (mono, 16 kHz)")
    if a.size < L.AUDIO_MIN_SAMPLES:
        raise InvalidInput(f"audio is too short: {a.size} samples, need at least {L.AUDIO_MIN_SAMPLES} (25 ms)")
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise InvalidInput("audio must hold finite float samples")
    if not isinstance(request.prompt, str):
        raise InvalidInput("prompt must be a string")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise InvalidInput("negative_prompt must be a string or null")
    if request.max_area is None and request.resolution not in L.RESOLUTIONS:
        raise InvalidInput(f"resolution must be one of {', '.join(L.RESOLUTIONS)}, got {request.resolution!r}")
    if request.max_area is not None and (not is_int(request.max_area)
                                         or not L.VIDEO_AREA_MIN <= request.max_area <= L.VIDEO_AREA_MAX):
        raise InvalidInput(f"max_area must be an integer between {L.VIDEO_AREA_MIN} and {L.VIDEO_AREA_MAX}, "
                           f"got {request.max_area!r}")
    f = request.infer_frames
    if not is_int(f) or not L.INFER_FRAMES_MIN <= f <= L.INFER_FRAMES_MAX or f % L.INFER_FRAMES_MULTIPLE:
        raise InvalidInput(f"infer_frames must be a multiple of {L.INFER_FRAMES_MULTIPLE} between "
                           f"{L.INFER_FRAMES_MIN} and {L.INFER_FRAMES_MAX}, got {f!r}")
    if not is_int(request.steps) or not 1 <= request.steps <= L.VIDEO_STEPS_MAX:
        raise InvalidInput(f"steps must be an integer between 1 and {L.VIDEO_STEPS_MAX}, got {request.steps!r}")
    if not _is_num(request.guidance) or not 0 <= request.guidance <= L.VIDEO_GUIDANCE_MAX:
        raise InvalidInput(f"guidance must be a number between 0 and {L.VIDEO_GUIDANCE_MAX}, got {request.guidance!r}")
    if not _is_num(request.shift) or not 0 < request.shift <= L.VIDEO_SHIFT_MAX:
        raise InvalidInput(f"shift must be a number in (0, {L.VIDEO_SHIFT_MAX:g}], got {request.shift!r}")
    if request.seed is not None and (not is_int(request.seed) or not 0 <= request.seed <= L.SEED_MAX):
        raise InvalidInput(f"seed must be an integer between 0 and {L.SEED_MAX}, got {request.seed!r}")
    if request.solver not in L.SOLVERS:
        raise InvalidInput(f"solver must be one of {', '.join(L.SOLVERS)}, got {request.solver!r}")
    p = request.pose_frames
    if p is not None:
        if not isinstance(p, np.ndarray) or p.ndim != 4 or p.shape[-1] != 3 or p.shape[0] < 1:
            raise InvalidInput("pose_frames must be a uint8 array [T, H, W, 3] with T >= 1")
        if p.dtype != np.uint8:
            raise InvalidInput(f"pose_frames must be uint8, got {p.dtype}")


# ----------------------------------------------------------- official helpers


def get_size_less_than_area(height: int, width: int, target_area: int = 1024 * 704, divisor: int = 64):
    """``WanS2V.get_size_less_than_area`` (wan/speech2video.py), verbatim logic.

    speech2video.py cannot be imported without torchvision/decord, so the method is
    reproduced here; it does not use ``self``.
    """
    if height * width <= target_area:
        max_upper_area = target_area
        min_scale = 0.1
        max_scale = 1.0
    else:
        max_upper_area = target_area
        d = divisor - 1
        b = d * (height + width)
        a = height * width
        c = d**2 - max_upper_area
        min_scale = (-b + math.sqrt(b**2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_upper_area / (height * width))

    find_it = False
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        new_height, new_width = int(height * scale), int(width * scale)
        pad_height = (64 - new_height % 64) % 64
        pad_width = (64 - new_width % 64) % 64
        padded_height, padded_width = new_height + pad_height, new_width + pad_width
        if padded_height * padded_width <= max_upper_area:
            find_it = True
            break

    if find_it:
        return padded_height, padded_width
    aspect_ratio = width / height
    target_width = int((target_area * aspect_ratio) ** 0.5 // divisor * divisor)
    target_height = int((target_area / aspect_ratio) ** 0.5 // divisor * divisor)
    if target_width >= width or target_height >= height:
        target_width = int(width // divisor * divisor)
        target_height = int(height // divisor * divisor)
    return target_height, target_width


def _resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size)`` on a [N,C,H,W] float tensor (bilinear, antialias)."""
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    nh, nw = (new_short, new_long) if h <= w else (new_long, new_short)
    if (nh, nw) == (h, w):
        return x
    return F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)


def _center_crop(x: torch.Tensor, th: int, tw: int, fill: float) -> torch.Tensor:
    """torchvision ``CenterCrop((th, tw))`` on [..., H, W] (pads with ``fill`` if smaller)."""
    h, w = x.shape[-2:]
    if th > h or tw > w:
        pl, pt = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
        pr, pb = (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0
        x = F.pad(x, (pl, pr, pt, pb), value=fill)
        h, w = x.shape[-2:]
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return x[..., top:top + th, left:left + tw]


def _ref_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Reference image → [1, 3, 1, H, W] in [-1, 1] (Resize(min) + CenterCrop + ToTensor)."""
    img = image.convert("RGB")
    w, h = img.size
    size = min(height, width)
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nh, nw = size, int(size * w / h)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    x = _center_crop(x, height, width, fill=0.0)
    return x.unsqueeze(1).unsqueeze(0) * 2 - 1.0


# --------------------------------------------------------------------- engine


class WanS2VGenerator:
    """Talking video from a reference image + speech with Wan2.2-S2V-14B."""

    name = "wan_s2v"

    def __init__(self, *, transformer, text_encoder, vae, audio_encoder, config: dict[str, Any],
                 device: torch.device, dtype: torch.dtype, path: Path, options: VideoPathOptions | None = None,
                 compile_cache_dir: Path | None = None, memory_limit: Callable[[], int | None] | None = None,
                 memory_headroom_bytes: int = 0, make_room: Callable[[int], int] | None = None) -> None:
        wan22.import_wan()
        from wan.configs.wan_s2v_14B import s2v_14B

        self.transformer = transformer  # WanModel_S2V
        self.text_encoder = text_encoder  # wan.modules.t5.T5EncoderModel (wrapper; .model is the module)
        self.vae = vae  # wan.modules.vae2_1.Wan2_1_VAE (wrapper; .model is the module)
        self.audio_encoder = audio_encoder  # wan.modules.s2v.audio_encoder.AudioEncoder (.model)
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.path = path
        self.sample_neg_prompt: str = s2v_14B.sample_neg_prompt
        self.drop_first_motion: bool = bool(s2v_14B.drop_first_motion)
        self.num_train_timesteps: int = int(s2v_14B.num_train_timesteps)
        self.motion_frames = L.MOTION_FRAMES
        # Fast preset (storystudio.models.speed): the bf16 weights of the FP8-able linears as a
        # group of their own (same Parameter objects), and their FP8 copy once built.
        self.transformer_linears = fp8.LinearWeights(transformer)
        self.transformer_fp8: fp8.FP8Store | None = None
        # How generations run (exact path by default); read at every generate, so it can
        # be switched on a loaded model (the benchmark compares paths in one process).
        self.options = options or VideoPathOptions()
        # Where compiled kernels are cached (default: next to the model folder, on the volume).
        self.compile_cache_dir = compile_cache_dir if compile_cache_dir is not None else path.parent / COMPILE_CACHE_DIRNAME
        # GPU memory this process may fill (the ModelManager's budget, asked at each decision)
        # and what to leave free: the CFG-batch decision stays inside both.
        self.memory_limit = memory_limit
        self.memory_headroom_bytes = memory_headroom_bytes
        # ``make_room(bytes)``: the ModelManager parks components of this engine that the running
        # job does not read (the other weight copy of the exact/fast pair) and returns the bytes freed.
        self.make_room = make_room
        self.attention: AttentionSelection | None = None  # the start-up self-check's result
        # One compiler per kind of clip (True: full length, static shapes; False: other lengths,
        # automatic dynamic shapes; compile.dynamic_for) and the error that turned a kind off:
        # a kind whose compile failed once runs eager from then on, the other kind stays compiled.
        self._compilers: dict[bool, DiTCompiler] = {}
        self._compile_errors: dict[bool, str] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    @serialized_build
    def plan(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             validate: bool = True, options: VideoPathOptions | None = None,
             attention: AttentionSelection | None = None, **engine_kwargs: Any) -> LoadPlan:
        """The engine with its official components built on ``meta``, and where their weights are.

        DiT: ``WanModel_S2V`` from config.json, its safetensors shards described. T5 and
        VAE: architecture inferred from the state-dict shapes (one loader for tiny and
        full), their ``.pth`` members described as file spans. The VAE stays float32
        (official); dtype default: bf16 on CUDA, float32 on CPU. The small wav2vec2
        encoder is loaded by transformers as before (its checkpoint names need
        transformers' renaming) and adopted by the ModelManager as it is.
        ``validate=False`` skips the folder check when the caller has just run it. The
        attention self-check (:meth:`select_attention`) runs here, unless ``attention``
        brings the start-up pre-flight's result. ``engine_kwargs`` go to the constructor
        (compile cache folder, memory limits).
        """
        root = Path(path)
        if validate:
            validate_wan_s2v(root)
        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        wan22.import_wan()
        try:
            config = read_json(root / CONFIG_FILE)
            transformer, dit = plan_dit(root, dtype, config)
            t5_files = torch_file_sources(root / T5_FILE)
            t5 = meta_t5(t5_arch_from_state({k: tuple(v.shape) for k, v in t5_files.items()}))
            t5_src = bind(t5, t5_files, what="T5 encoder", where=T5_FILE, dtype=dtype)
            text_encoder = _t5_wrapper(root, t5.eval().requires_grad_(False), int(config.get("text_len", 512)),
                                       device, dtype)
            vae_files = torch_file_sources(root / VAE_FILE)
            vae_model = meta_vae(vae_dim_from_state({k: tuple(v.shape) for k, v in vae_files.items()}))
            vae_src = bind(vae_model, vae_files, what="Wan2.1 VAE", where=VAE_FILE, dtype=torch.float32)
            vae = wan22.make_wan21_vae(vae_model, device=device, dtype=torch.float32)
            audio_encoder = _load_audio_encoder(root, device)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"Wan2.2-S2V checkpoint at {root} could not be loaded: {type(exc).__name__}: {exc}",
                code="checkpoint_corrupt",
            ) from exc
        engine = cls(transformer=transformer, text_encoder=text_encoder, vae=vae, audio_encoder=audio_encoder,
                     config=config, device=device, dtype=dtype, path=root, options=options, **engine_kwargs)
        if attention is not None and attention.device == str(device):
            engine.attention = attention
        else:
            engine.select_attention()
        return LoadPlan(engine, {"transformer": dit, "text_encoder": t5_src, "vae": vae_src})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, options: VideoPathOptions | None = None,
                        **engine_kwargs: Any) -> WanS2VGenerator:
        """Validate the folder and load the weights onto ``device`` without a ModelManager (tests, tools)."""
        device = resolve_device(device)
        t0 = time.perf_counter()
        engine = materialize(cls.plan(path, device=device, dtype=dtype, options=options, **engine_kwargs), device)
        log.info("Wan2.2-S2V loaded from %s on %s in %.1fs", path, device, time.perf_counter() - t0)
        return engine  # type: ignore[return-value]

    def select_attention(self, requested: str | None = None) -> AttentionSelection:
        """Run the attention self-check on this device for the DiT's head size; keep and return it.

        ``requested`` defaults to ``options.attention``. Called once at load; the worker or
        a benchmark may call it again (e.g. to force another backend).
        """
        requested = requested or self.options.attention
        heads = int(self.config.get("num_heads", self.transformer.num_heads))
        head_dim = int(self.config.get("dim", self.transformer.dim)) // heads
        self.attention = select_backend(device=self.device, dtype=self.dtype, heads=heads, head_dim=head_dim,
                                        requested=requested)
        return self.attention

    def warmup(self, *, width: int = 832, height: int = 480, infer_frames: int = 80) -> float:
        """1-step clips at ``width × height``, guided as a default job; returns their seconds.

        Run by the worker's pre-warm so the first real video does not pay for first
        calls (cuBLAS/cuDNN handles and workspaces, lazily loaded attention and
        convolution kernels, the allocator's first blocks, wav2vec2 and T5 first
        passes) nor for compiling. The reference image is ``width × height`` and the area
        its product, so the official size rule picks the shape a 480p job with a reference
        of that size gets (an 832×480 reference gives 448×832 frames). The default guidance
        runs both CFG branches the way a real job does (batched where memory allows), so the
        compiled DiT blocks and the kernels see a job's shapes.

        When the DiT blocks are compiled, a second clip follows: the one a line of
        ``infer_frames`` frames of audio gets (``infer_frames`` + a merged one-latent tail), so
        the other-length graph is compiled too, which then serves every single-clip line of
        another length (compile.py). Eager (a CPU, ``STORYSTUDIO_COMPILE=off``, the baseline) the
        first clip has paid every first call already.
        """
        image = Image.new("RGB", (width, height), (128, 128, 128))
        drop = L.FIRST_CLIP_DROP_FRAMES if self.drop_first_motion else 0

        def clips(target_frames: int) -> list[int]:
            return plan_clip_frames(target_frames, infer_frames, first_clip_drop=drop,
                                    trim_last=self.options.trim_last_clip)

        targets = [infer_frames - drop]  # frames of audio: exactly one full clip
        merged = clips(infer_frames)
        if len(merged) == 1 and merged[0] != infer_frames and self._clip_compiled(merged[0], infer_frames):
            targets.append(infer_frames)
        total = 0.0
        for target in targets:
            seconds = target / FPS
            t = np.linspace(0, seconds, int(round(seconds * SAMPLE_RATE)), endpoint=False, dtype=np.float32)
            audio = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            req = VideoRequest(image=image, audio=audio, prompt="warm-up", max_area=width * height,
                               infer_frames=infer_frames, steps=1, guidance=L.VIDEO_GUIDANCE_DEFAULT, seed=0)
            result = self.generate(req)
            if result.engine["clip_frames"] != clips(target):
                log.warning("warm-up clips %s, planned %s", result.engine["clip_frames"], clips(target))
            total += result.seconds
        return total

    # ------------------------------------------------------------------ contract
    def components(self) -> dict[str, torch.nn.Module]:
        # The linears' group comes before the transformer: a tensor belongs to the first
        # component listing it, so the transformer component holds everything else.
        comps = {
            speed.BF16_LINEARS: self.transformer_linears,
            "transformer": self.transformer,
            "text_encoder": self.text_encoder.model,
            "vae": self.vae.model,
            "audio_encoder": self.audio_encoder.model,
        }
        if self.transformer_fp8 is not None:
            comps[speed.FP8_WEIGHTS] = self.transformer_fp8
        return comps

    # ------------------------------------------------------------------ fast preset
    def fp8_nbytes(self, granularity: fp8.Granularity = "row") -> int:
        return fp8.store_nbytes(self.transformer, granularity)

    def build_fp8(self, granularity: fp8.Granularity = "row") -> None:
        """Quantize the DiT's block linears once (their bf16 weights must be resident)."""
        if self.transformer_fp8 is None:
            require_resident({speed.BF16_LINEARS: self.transformer_linears}, self.device)
            self.transformer_fp8 = fp8.build_store(self.transformer, granularity)

    # ------------------------------------------------------------------ validation
    def validate(self, request: VideoRequest) -> None:
        validate_video_request(request)

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _vae_encode(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] → stacked latents [B, 16, T', h, w] (float32)."""
        x = videos.to(device=self.device, dtype=self.vae.dtype)
        with torch.autocast(self.device.type, enabled=False):
            return torch.stack(self.vae.encode(x))

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(device=self.device, dtype=self.vae.dtype)
        with torch.autocast(self.device.type, enabled=False):
            return torch.stack(self.vae.decode(z))

    def _audio_features(self, audio: np.ndarray) -> torch.Tensor:
        """``AudioEncoder.extract_audio_feat(return_all_layers=True)`` on an array."""
        from wan.modules.s2v.audio_encoder import linear_interpolation

        enc = self.audio_encoder
        input_values = enc.processor(audio.astype(np.float32), sampling_rate=SAMPLE_RATE,
                                     return_tensors="pt").input_values
        mdtype = next(enc.model.parameters()).dtype
        with torch.autocast(self.device.type, enabled=False):
            res = enc.model(input_values.to(self.device, mdtype), output_hidden_states=True)
        feat = torch.cat(res.hidden_states)
        feat = linear_interpolation(feat.float(), input_fps=50, output_fps=enc.video_rate)
        return feat.float()

    def _pose_cond(self, pose: np.ndarray | None, clip_frames: list[int], height: int,
                   width: int) -> list[torch.Tensor]:
        """``WanS2V.load_pose_cond``: one cond latent per clip ([1, 16, frames/4, h, w]).

        Official: the pose video cut into ``infer_frames`` chunks (padded with -1 frames),
        each encoded after a copy of its first frame. Here each chunk is its clip's own
        length, which is the official chunk for full clips; for a shortened last clip the
        Wan VAE is causal in time, so its latents are the first ones of the official chunk.
        """
        if pose is None:
            # Official: COND[0] * 0 when no pose video is given (encoding -1 frames and
            # multiplying by zero); the zeros are built directly.
            shape = [1, 16, max(clip_frames) // 4, height // 8, width // 8]
            return [torch.zeros(shape, dtype=torch.float32)]
        total = sum(clip_frames)
        frames = pose[:total]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1.0
        x = _center_crop(_resize_shorter(x, min(height, width)), height, width, fill=0.0)
        x = x.permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, T, H, W]
        pad = total - x.shape[2]
        if pad > 0:
            x = torch.cat([x, -torch.ones([1, 3, pad, height, width])], dim=2)
        conds = []
        for chunk in torch.split(x, clip_frames, dim=2):
            chunk = torch.cat([chunk[:, :, 0:1], chunk], dim=2)
            conds.append(self._vae_encode(chunk)[:, :, 1:].cpu())
        return conds

    def _scheduler(self, solver: str, steps: int, shift: float):
        from wan.utils.fm_solvers import FlowDPMSolverMultistepScheduler, get_sampling_sigmas, retrieve_timesteps
        from wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

        if solver == "unipc":
            s = FlowUniPCMultistepScheduler(num_train_timesteps=self.num_train_timesteps, shift=1,
                                            use_dynamic_shifting=False)
            s.set_timesteps(steps, device=self.device, shift=shift)
            return s, s.timesteps
        s = FlowDPMSolverMultistepScheduler(num_train_timesteps=self.num_train_timesteps, shift=1,
                                            use_dynamic_shifting=False)
        timesteps, _ = retrieve_timesteps(s, device=self.device, sigmas=get_sampling_sigmas(steps, shift))
        return s, timesteps

    # ------------------------------------------------------------------ generation
    def generate(self, request: VideoRequest, progress: Callable[[int, int], None] | None = None, *,
                 on_latents: Callable[[int, torch.Tensor], None] | None = None) -> VideoResult:
        """``on_latents(clip, latents)`` sees each clip's final latents before decoding (drift reports)."""
        self.validate(request)
        idle = speed.idle_components(request.speed)
        require_resident({k: m for k, m in self.components().items() if k not in idle}, self.device)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # The official code enters torch.cuda.amp.autocast on every block; off
                # CUDA that only warns (and is a no-op).
                warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp.*")
                warnings.filterwarnings("ignore", message=r".*CUDA is not available.*")
                with torch.no_grad():
                    result = self._generate(request, progress, on_latents)
        except torch.cuda.OutOfMemoryError:
            raise  # the ModelManager retries once with everything else parked
        except (InvalidInput, GenerationError):
            raise
        except RuntimeError as exc:
            raise GenerationError(f"video generation failed: {type(exc).__name__}: {exc}") from exc
        result.seconds = time.perf_counter() - t0
        log.info("video %dx%d, %d frames in %d clips, %.1fs (seed %d; %s)", result.width, result.height,
                 result.frames.shape[0], result.num_clips, result.seconds, result.seed, result.engine)
        return result

    def _generate(self, req: VideoRequest, progress: Callable[[int, int], None] | None,
                  on_latents: Callable[[int, torch.Tensor], None] | None = None) -> VideoResult:
        """The official ``WanS2V.generate`` as named phases; see each method."""
        plan = self._plan(req)
        report = EngineReport(path=self.options.name, attention=self._attention_backend(),
                              clip_frames=list(plan.clip_frames), rope=self.options.rope)
        audio_emb = self._embed_audio(req.audio, plan)
        ref_latents, motion_latents, last_frames = self._reference_and_motion(req.image, plan)
        pose = self._pose_cond(req.pose_frames, plan.clip_frames, plan.height, plan.width)
        context, context_null = self._text_context(req)
        out = []
        skipped: list[list[int]] = []  # fast preset: the steps each clip's step cache reused
        rope = fused_rope(self.transformer, self.device) if self.options.rope == "fused" else contextlib.nullcontext()
        with wan22.use_attention(report.attention), rope:
            for r, frames in enumerate(plan.clip_frames):
                clip = self._clip_inputs(r, frames, plan, audio_emb, ref_latents, motion_latents, pose, context,
                                         context_null, req)
                latents, clip_skipped = self._denoise_clip(clip, req, plan, report)
                skipped.append(clip_skipped)
                if on_latents is not None:
                    on_latents(r, latents.unsqueeze(0))
                image = self._decode_clip(latents, clip, motion_latents, ref_latents)
                out.append(image.float().cpu())
                if r + 1 < plan.num_clips:
                    last_frames, motion_latents = self._next_motion(last_frames, image)
                if progress is not None:
                    progress(r + 1, plan.num_clips)
        video = torch.cat(out, dim=2)[0][:, :plan.target_frames]  # [3, T, H, W] in [-1, 1]
        frames_u8 = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        return VideoResult(frames=np.ascontiguousarray(frames_u8), fps=FPS, seed=plan.seed, width=plan.width,
                           height=plan.height, num_clips=plan.num_clips, seconds=0.0,
                           speed=speed.report(req.speed, int(req.steps), skipped), engine=report.as_dict())

    # --- phase 1: sizes and clips
    def _plan(self, req: VideoRequest) -> GenerationPlan:
        """Output size (official area rule), seed, and how many frames each clip generates.

        Enough clips to cover the audio; with drop_first_motion the first clip loses 3
        frames (official). The exact path shortens the last clip to what the audio needs
        (:func:`plan_clip_frames`); the video is then trimmed to exactly the audio's length.
        """
        infer_frames = int(req.infer_frames)
        max_area = int(req.max_area) if req.max_area is not None else RESOLUTIONS[req.resolution]
        w0, h0 = req.image.size
        height, width = get_size_less_than_area(h0, w0, target_area=max_area)
        seed = int(req.seed) if req.seed is not None else secrets.randbelow(2**31)
        target_frames = max(1, round(req.audio.shape[0] / SAMPLE_RATE * FPS))
        drop = L.FIRST_CLIP_DROP_FRAMES if self.drop_first_motion else 0
        clips = plan_clip_frames(target_frames, infer_frames, first_clip_drop=drop,
                                 trim_last=self.options.trim_last_clip)
        return GenerationPlan(height=height, width=width, seed=seed, infer_frames=infer_frames,
                              target_frames=target_frames, clip_frames=clips)

    # --- phase 2: audio embedding
    def _embed_audio(self, audio: np.ndarray, plan: GenerationPlan) -> torch.Tensor:
        """wav2vec2 features bucketed per video frame (official ``encode_audio``): [1, layers, C, frames].

        Zero-padded when the clips need more frames than the audio gives (the official
        code pads with zeros too).
        """
        feat = self._audio_features(audio)
        bucket, _nr = self.audio_encoder.get_audio_embed_bucket_fps(feat, fps=FPS, batch_frames=plan.infer_frames,
                                                                    m=0)
        bucket = bucket.to(self.device, self.dtype).unsqueeze(0)
        audio_emb = bucket.permute(0, 2, 3, 1) if bucket.ndim == 4 else bucket.permute(0, 2, 1)
        need = sum(plan.clip_frames)
        if audio_emb.shape[-1] < need:
            audio_emb = F.pad(audio_emb, (0, need - audio_emb.shape[-1]))
        return audio_emb

    # --- phase 3: reference and motion latents
    def _reference_and_motion(self, image: Image.Image, plan: GenerationPlan
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference latent, the first clip's motion latents, and the motion frame buffer.

        Returns ``(ref_latents, motion_latents, last_frames)``; ``last_frames`` holds the
        last 73 decoded frames that the next clip's motion latents are encoded from.
        """
        height, width = plan.height, plan.width
        lat_motion_frames = (self.motion_frames + 3) // 4
        ref_latents = self._vae_encode(_ref_pixels(image, height, width))
        last_frames = torch.zeros([1, 3, self.motion_frames, height, width], dtype=self.vae.dtype, device=self.device)
        if self.drop_first_motion:
            # Clip 0 drops its motion frames (the frame packer's tokens are discarded and
            # the decode starts from the reference latent), so the official encode of
            # 73 black frames is never used: zeros of the latent shape stand in for it.
            motion_latents = torch.zeros([1, 16, lat_motion_frames, height // 8, width // 8],
                                         dtype=self.vae.dtype, device=self.device)
        else:
            motion_latents = self._vae_encode(last_frames)
        return ref_latents, motion_latents, last_frames

    # --- phase 4: text context
    def _text_context(self, req: VideoRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """umT5 embeddings of the prompt and of the negative prompt ([L, 4096] each, model dtype)."""
        n_prompt = self.sample_neg_prompt if req.negative_prompt is None else req.negative_prompt
        with self._autocast():
            context = self.text_encoder([req.prompt], self.device)
            context_null = self.text_encoder([n_prompt], self.device)
        return context[0].to(self.dtype), context_null[0].to(self.dtype)

    # --- phase 5: one clip's denoising
    def _clip_inputs(self, r: int, frames: int, plan: GenerationPlan, audio_emb: torch.Tensor,
                     ref_latents: torch.Tensor, motion_latents: torch.Tensor, pose: list[torch.Tensor],
                     context: torch.Tensor, context_null: torch.Tensor, req: VideoRequest) -> ClipInputs:
        """Noise and the DiT's keyword arguments for clip ``r`` of ``frames`` frames.

        A clip shorter than ``infer_frames`` (the exact path's last clip) takes the first
        ``frames`` frames of its audio and pose windows; the Wan VAE is causal in time, so
        the first latents of a longer pose encode are those of the shorter one.
        """
        dev, dtype = self.device, self.dtype
        lat_motion_frames = (self.motion_frames + 3) // 4
        generator = torch.Generator(device=dev)
        generator.manual_seed(plan.seed + r)
        lat_frames = (frames + 3 + self.motion_frames) // 4 - lat_motion_frames
        target_shape = [lat_frames, plan.height // 8, plan.width // 8]
        noise = torch.randn(16, *target_shape, dtype=dtype, device=dev, generator=generator)
        left = plan.clip_starts[r]
        cond_latents = (pose[r] if req.pose_frames is not None else pose[0] * 0)[:, :, :lat_frames]
        audio_input = audio_emb[..., left:left + frames]
        drop_motion = self.drop_first_motion and r == 0
        arg_c = {
            "context": [context], "seq_len": int(np.prod(target_shape) // 4),
            "cond_states": cond_latents.to(dtype=dtype, device=dev),
            "motion_latents": motion_latents.to(dtype).clone(), "ref_latents": ref_latents.to(dtype),
            "audio_input": audio_input, "motion_frames": [self.motion_frames, lat_motion_frames],
            "drop_motion_frames": drop_motion,
        }
        arg_null = dict(arg_c, context=[context_null], audio_input=0.0 * audio_input)
        return ClipInputs(index=r, frames=frames, noise=noise, generator=generator, cond=arg_c, uncond=arg_null,
                          drop_motion=drop_motion)

    def _denoise_clip(self, clip: ClipInputs, req: VideoRequest, plan: GenerationPlan,
                      report: EngineReport) -> tuple[torch.Tensor, list[int]]:
        """One clip's sampling: scheduler, the model call (CFG batched or not, through the fast
        preset's step cache when it has one), the fast knobs and the compiled blocks around
        :meth:`_denoise`. Returns the final latents and the steps the step cache reused."""
        scheduler, timesteps = self._scheduler(req.solver, int(req.steps), float(req.shift))
        guidance = float(req.guidance)
        full_length = clip.frames == plan.infer_frames
        compiled = self._clip_compiled(clip.frames, plan.infer_frames)
        batched = guidance > 1 and self._cfg_batch(plan.height * plan.width, clip.frames, compiled=compiled)
        # Fast preset: a fresh step cache per clip; ``forward(branch, x, **kw)`` computes or reuses.
        cache = speed.step_cache_for(self.transformer, req.speed, len(timesteps))
        forward: BranchForward = cache if cache is not None else (lambda branch, *a, **kw: self.transformer(*a, **kw))
        call_model = self._model_call(clip, guidance, batched, report, forward)
        if cache is not None:
            call_model = _deciding_steps(cache, call_model)
        rng_state = clip.generator.get_state()
        with speed.applied(self.transformer, self.transformer_fp8, req.speed, self.device):
            if not compiled:
                latents = self._denoise(clip.noise, timesteps, scheduler, call_model, clip.generator)
            else:
                try:
                    with self._compiler_for(full_length):
                        latents = self._denoise(clip.noise, timesteps, scheduler, call_model, clip.generator)
                    report.compiled_clips += 1
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a compiler failure must cost speed, not the job
                    # Eager from here on for clips of this kind; a genuine model error recurs eagerly and surfaces.
                    error = self._compile_errors[full_length] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    kind = "full-length" if full_length else "other-length"
                    log.warning("compiled DiT blocks failed on a %s clip (%s); %s clips run eager from now on",
                                kind, error, kind)
                    report.notes.append(f"clip {clip.index}: compile failed, ran eager ({error})")
                    clip.generator.set_state(rng_state)
                    scheduler, timesteps = self._scheduler(req.solver, int(req.steps), float(req.shift))
                    if cache is not None:
                        cache = speed.step_cache_for(self.transformer, req.speed, len(timesteps))
                        forward = cache
                    # Eager blocks need more memory than compiled ones: decide the CFG batch again.
                    batched = guidance > 1 and self._cfg_batch(plan.height * plan.width, clip.frames, compiled=False)
                    call_model = self._model_call(clip, guidance, batched, report, forward, count=False)
                    if cache is not None:
                        call_model = _deciding_steps(cache, call_model)
                    latents = self._denoise(clip.noise, timesteps, scheduler, call_model, clip.generator)
        return latents, (cache.skipped_steps if cache is not None else [])

    def _denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, scheduler: Any, call_model: StepCall,
                 generator: torch.Generator) -> torch.Tensor:
        """The sampling loop: at each timestep ``call_model(latents, t, i)`` gives the guided
        noise prediction ([16, T, h, w]) and the scheduler takes one step.

        ``call_model`` is the seam for per-step speed-ups: the fast preset's step cache sits
        inside it (it may reuse an earlier residual instead of running the DiT blocks)
        without touching the loop, the schedulers or the clip plumbing. ``t`` is the
        official ``[1]`` timestep tensor on the device, ``i`` the step index.
        """
        with self._autocast():
            for i, t in enumerate(timesteps):
                timestep = torch.stack([t]).to(self.device)
                pred = call_model(latents, timestep, i)
                latents = scheduler.step(pred.unsqueeze(0), t, latents.unsqueeze(0), return_dict=False,
                                         generator=generator)[0].squeeze(0)
        return latents

    def _model_call(self, clip: ClipInputs, guidance: float, batched: bool, report: EngineReport,
                    forward: BranchForward, *, count: bool = True) -> StepCall:
        """The guided prediction ``u + guidance * (c - u)`` as one batch-2 forward or two forwards.

        Batch 2 stacks cond (prompt, audio) and uncond (negative prompt, zeroed audio)
        along the batch; ``WanModel_S2V`` takes lists/batched tensors for every extra
        input and all tokens of both samples have the same length, so attention stays
        unpadded. A batched forward that runs out of memory falls back to two forwards for
        the rest of the clip (and the report says so) instead of failing the job.
        ``forward(branch, x, **kw)`` runs the DiT; the branch names (``cond``, ``uncond``,
        ``pair`` for the batch of two) key the step cache's residuals.
        """
        arg_c, arg_null = clip.cond, clip.uncond

        def single(latents: torch.Tensor, timestep: torch.Tensor, step: int) -> torch.Tensor:
            pred_c = forward("cond", [latents], t=timestep, **arg_c)[0]
            if guidance <= 1:
                return pred_c
            pred_u = forward("uncond", [latents], t=timestep, **arg_null)[0]
            return pred_u + guidance * (pred_c - pred_u)

        if not batched:
            if count:
                report.note_clip(cfg_batched=False, guided=guidance > 1)
            return single
        arg_b = dict(arg_c, context=arg_c["context"] + arg_null["context"],
                     cond_states=torch.cat([arg_c["cond_states"], arg_null["cond_states"]]),
                     motion_latents=torch.cat([arg_c["motion_latents"], arg_null["motion_latents"]]),
                     ref_latents=torch.cat([arg_c["ref_latents"], arg_null["ref_latents"]]),
                     audio_input=torch.cat([arg_c["audio_input"], arg_null["audio_input"]]))
        state = {"batched": True}
        if count:
            report.note_clip(cfg_batched=True, guided=True)

        def both(latents: torch.Tensor, timestep: torch.Tensor, step: int) -> torch.Tensor:
            if state["batched"]:
                try:
                    pred_c, pred_u = forward("pair", [latents, latents], t=timestep, **arg_b)
                    return pred_u + guidance * (pred_c - pred_u)
                except torch.OutOfMemoryError:
                    state["batched"] = False
                    report.cfg_fallback(clip.index)
                    log.warning("CFG batch of 2 ran out of memory at clip %d step %d; two forwards from here",
                                clip.index, step)
                    torch.cuda.empty_cache()
            return single(latents, timestep, step)

        return both

    def _cfg_batch(self, area: int, frames: int, *, compiled: bool) -> bool:
        """Whether this clip's two CFG branches run as one batch-2 forward.

        ``on``/``off`` force it; ``auto`` batches when the activation estimate of a batch
        of two (:func:`video_working_bytes`, for compiled or eager blocks as the clip will
        run) fits in what the device has free (allocator cache included) minus the
        headroom, and within the ModelManager's budget. On CPU memory is not planned, so
        ``auto`` batches. When it does not fit, the components this job does not read (the
        idle copy of the exact/fast pair) are parked first if that makes room (``make_room``).
        An estimate that is too small costs no job: a batch that runs out of memory falls
        back to two forwards.
        """
        mode = self.options.cfg_batch
        if mode != "auto":
            return mode == "on"
        if self.device.type != "cuda":
            return True
        need = video_working_bytes(area, frames, batch=2, compiled=compiled)
        available = self._available_bytes()
        if need > available and self.make_room is not None and self.make_room(need - available) > 0:
            available = self._available_bytes()
        fits = need <= available
        if not fits:
            log.info("CFG batch of 2 needs ~%.1f GiB, %.1f GiB available: two forwards", need / GiB, available / GiB)
        return fits

    def _available_bytes(self) -> int:
        """Device bytes a job may still allocate: free plus the allocator's cache, less the headroom,
        within the ModelManager's budget."""
        free, _total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        available = free + torch.cuda.memory_reserved(self.device) - allocated - self.memory_headroom_bytes
        limit = self.memory_limit() if self.memory_limit is not None else None
        if limit is not None:
            available = min(available, limit - allocated)
        return available

    # --- compile
    def _clip_compiled(self, frames: int, infer_frames: int) -> bool:
        """Regional compile for this clip? ``auto`` = on CUDA, for every clip length (full-length
        clips on static graphs, the others on one automatic-dynamic graph; see compile.py),
        unless that kind's compile failed before."""
        mode = self.options.compile
        on = mode == "on" or (mode == "auto" and self.device.type == "cuda")
        # A DiT whose forward was replaced on the instance (the multi-GPU ParallelDiT) runs its
        # blocks in lock-step with other ranks that do not compile: left eager.
        parallel = "forward" in vars(self.transformer)
        return on and (frames == infer_frames) not in self._compile_errors and not parallel

    def _compiler_for(self, full_length: bool) -> contextlib.AbstractContextManager[None]:
        """The compiled blocks for a full-length clip or a clip of another length, installed."""
        backend = self.options.compile_backend
        compiler = self._compilers.get(full_length)
        if compiler is None or compiler.backend != backend:
            if backend == "inductor":
                configure_cache(self.compile_cache_dir, self.device)
                log.info("inductor settings: %s", configure_inductor())
            compiler = self._compilers[full_length] = DiTCompiler(self.transformer, backend=backend,
                                                                  dynamic=dynamic_for(full_length))
        return compiler.installed()

    def _attention_backend(self) -> str:
        """The backend this generation uses: the self-check's pick for ``options.attention``."""
        requested = self.options.attention
        if requested in ("default", "sdpa"):
            return requested
        if self.attention is None or self.attention.requested != requested:
            self.select_attention(requested)
        assert self.attention is not None
        return self.attention.backend

    # --- phase 6: decode
    def _decode_clip(self, latents: torch.Tensor, clip: ClipInputs, motion_latents: torch.Tensor,
                     ref_latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode one clip after its motion (or, for clip 0, reference) latents; keep its frames.

        Returns [1, 3, frames, H, W] in [-1, 1] (3 fewer frames for clip 0 with drop_first_motion).
        """
        lat = latents.unsqueeze(0)
        if not clip.drop_motion:
            decode_latents = torch.cat([motion_latents, lat.to(motion_latents.dtype)], dim=2)
        else:
            decode_latents = torch.cat([ref_latents, lat.to(ref_latents.dtype)], dim=2)
        image = self._vae_decode(decode_latents)[:, :, -clip.frames:]
        if clip.drop_motion:
            image = image[:, :, L.FIRST_CLIP_DROP_FRAMES:]
        return image

    def _next_motion(self, last_frames: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide the 73-frame motion buffer over the new clip and encode the next motion latents."""
        overlap = min(self.motion_frames, image.shape[2])
        last_frames = torch.cat([last_frames[:, :, overlap:], image[:, :, -overlap:].to(last_frames.dtype)], dim=2)
        return last_frames, self._vae_encode(last_frames)


# --------------------------------------------------------------------- loaders


def plan_dit(root: Path, dtype: torch.dtype, config: dict[str, Any] | None = None):
    """``WanModel_S2V`` on ``meta`` and its shards' spans: ``(module, sources)``.

    The engine's DiT, and a multi-GPU follower's (storystudio/distributed), which
    holds the DiT alone.
    """
    config = read_json(root / CONFIG_FILE) if config is None else config
    transformer = meta_transformer(config).eval().requires_grad_(False)
    sources = bind(transformer, sharded_safetensors_sources(root, INDEX_FILE.split(".safetensors")[0]),
                   what="WanModel_S2V", where=INDEX_FILE, dtype=dtype)
    return transformer, sources


def _t5_wrapper(root: Path, model: torch.nn.Module, text_len: int, device: torch.device, dtype: torch.dtype):
    """The official ``T5EncoderModel`` around an already-built encoder module.

    Its ``__init__`` hard-codes umt5-xxl sizes and loads the ``.pth`` itself, so the
    wrapper is assembled around the module instead (its ``__call__`` is the official one).
    """
    from wan.modules.t5 import T5EncoderModel
    from wan.modules.tokenizers import HuggingfaceTokenizer

    enc = T5EncoderModel.__new__(T5EncoderModel)
    enc.text_len = text_len
    enc.dtype = dtype
    enc.device = device
    enc.checkpoint_path = str(root / T5_FILE)
    enc.tokenizer_path = str(root / TOKENIZER_DIR)
    enc.model = model
    enc.tokenizer = HuggingfaceTokenizer(name=str(root / TOKENIZER_DIR), seq_len=text_len, clean="whitespace")
    return enc


def _load_audio_encoder(root: Path, device: torch.device):
    from wan.modules.s2v.audio_encoder import AudioEncoder

    enc = AudioEncoder(device=str(device), model_id=str(root / WAV2VEC_DIR))
    enc.model.eval().requires_grad_(False)
    return enc
