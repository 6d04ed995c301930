"""Wan2.2-S2V talking-video engine on the official Wan2.2 code and checkpoint layout.

Built diffusers-style from explicit official components (see :meth:`WanS2VGenerator.
from_pretrained`): ``WanModel_S2V`` (transformer), the umt5 ``T5Encoder`` (text
encoder), ``Wan2_1_VAE`` and the wav2vec2 ``AudioEncoder``. ``generate`` mirrors the
official ``WanS2V.generate`` (wan/speech2video.py) but takes the image, audio and pose
frames as in-memory arrays, runs on any device (autocast only on CUDA) and reports
progress per clip.

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
from copy import deepcopy
from dataclasses import dataclass
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
from storystudio.models.engine import default_dtype, is_int, require_resident, resolve_device
from storystudio.models.checkpoints.common import read_json
from storystudio.models.checkpoints.wan_s2v import (
    CONFIG_FILE,
    INDEX_FILE,
    T5_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    WAV2VEC_DIR,
    load_torch_state,
    meta_t5,
    meta_transformer,
    meta_vae,
    t5_arch_from_state,
    validate_wan_s2v,
    vae_dim_from_state,
)
from storystudio.models import fp8, speed
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
    speed: dict[str, Any] | None = None  # what the knobs did (speed.report)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)


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
                 device: torch.device, dtype: torch.dtype, path: Path) -> None:
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

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> WanS2VGenerator:
        """Validate the folder, then build the official components on ``device``.

        DiT: ``WanModel_S2V`` from config.json on ``meta``, each safetensors shard read
        straight onto ``device`` and assigned (no host copy of the model). T5 and VAE:
        architecture inferred from the state-dict shapes (one loader for tiny and full),
        memory-mapped ``.pth`` copied tensor by tensor to ``device``. The VAE stays
        float32 (official); dtype default: bf16 on CUDA, float32 on CPU.
        """
        root = Path(path)
        validate_wan_s2v(root)
        device = resolve_device(device)
        dtype = dtype or default_dtype(device)
        wan22.import_wan()
        t0 = time.perf_counter()
        try:
            config = read_json(root / CONFIG_FILE)
            transformer = _load_transformer(root, config, device, dtype)
            t1 = time.perf_counter()
            text_encoder = _load_t5(root, int(config.get("text_len", 512)), device, dtype)
            t2 = time.perf_counter()
            vae = _load_vae(root, device)
            audio_encoder = _load_audio_encoder(root, device)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"Wan2.2-S2V checkpoint at {root} could not be loaded: {type(exc).__name__}: {exc}",
                code="checkpoint_corrupt",
            ) from exc
        log.info("Wan2.2-S2V loaded from %s on %s (%s) in %.1fs (DiT %.1fs, T5 %.1fs; attention %s)", root,
                 device, dtype, time.perf_counter() - t0, t1 - t0, t2 - t1, wan22.attention_backend())
        return cls(transformer=transformer, text_encoder=text_encoder, vae=vae, audio_encoder=audio_encoder,
                   config=config, device=device, dtype=dtype, path=root)

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

    def _pose_cond(self, pose: np.ndarray | None, num_clips: int, infer_frames: int, height: int,
                   width: int) -> list[torch.Tensor]:
        """``WanS2V.load_pose_cond``: one cond latent per clip ([1, 16, infer/4, h, w])."""
        if pose is None:
            # Official: COND[0] * 0 when no pose video is given (encoding -1 frames and
            # multiplying by zero); the zeros are built directly.
            shape = [1, 16, infer_frames // 4, height // 8, width // 8]
            return [torch.zeros(shape, dtype=torch.float32)]
        frames = pose[: infer_frames * num_clips]
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1.0
        x = _center_crop(_resize_shorter(x, min(height, width)), height, width, fill=0.0)
        x = x.permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, T, H, W]
        pad = num_clips * infer_frames - x.shape[2]
        if pad > 0:
            x = torch.cat([x, -torch.ones([1, 3, pad, height, width])], dim=2)
        conds = []
        for chunk in torch.chunk(x, num_clips, dim=2):
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
        log.info("video %dx%d, %d frames in %d clips, %.1fs (seed %d)", result.width, result.height,
                 result.frames.shape[0], result.num_clips, result.seconds, result.seed)
        return result

    def _generate(self, req: VideoRequest, progress, on_latents=None) -> VideoResult:
        dev, dtype = self.device, self.dtype
        infer_frames = int(req.infer_frames)
        max_area = int(req.max_area) if req.max_area is not None else RESOLUTIONS[req.resolution]
        w0, h0 = req.image.size
        height, width = get_size_less_than_area(h0, w0, target_area=max_area)
        seed = int(req.seed) if req.seed is not None else secrets.randbelow(2**31)

        # Frames: enough clips to cover the audio, then trimmed to its length. With
        # drop_first_motion the first clip loses 3 frames (official).
        seconds_audio = req.audio.shape[0] / SAMPLE_RATE
        target_frames = max(1, round(seconds_audio * FPS))
        drop = 3 if self.drop_first_motion else 0
        num_clips = max(1, math.ceil((target_frames + drop) / infer_frames))

        # Audio embedding buckets (official encode_audio), zero-padded if the clips
        # need more buckets than the audio gives (official pads with zeros too).
        feat = self._audio_features(req.audio)
        bucket, _nr = self.audio_encoder.get_audio_embed_bucket_fps(feat, fps=FPS, batch_frames=infer_frames, m=0)
        bucket = bucket.to(dev, dtype).unsqueeze(0)
        audio_emb = bucket.permute(0, 2, 3, 1) if bucket.ndim == 4 else bucket.permute(0, 2, 1)
        need = num_clips * infer_frames
        if audio_emb.shape[-1] < need:
            audio_emb = F.pad(audio_emb, (0, need - audio_emb.shape[-1]))

        lat_motion_frames = (self.motion_frames + 3) // 4
        ref_pixels = _ref_pixels(req.image, height, width)
        ref_latents = self._vae_encode(ref_pixels)
        videos_last_frames = torch.zeros([1, 3, self.motion_frames, height, width], dtype=self.vae.dtype,
                                         device=dev)
        if self.drop_first_motion:
            # Clip 0 drops its motion frames (the frame packer's tokens are discarded and
            # the decode starts from the reference latent), so the official encode of
            # 73 black frames is never used: zeros of the latent shape stand in for it.
            motion_latents = torch.zeros([1, 16, lat_motion_frames, height // 8, width // 8],
                                         dtype=self.vae.dtype, device=dev)
        else:
            motion_latents = self._vae_encode(videos_last_frames)
        cond = self._pose_cond(req.pose_frames, num_clips, infer_frames, height, width)

        n_prompt = self.sample_neg_prompt if req.negative_prompt is None else req.negative_prompt
        with self._autocast():
            context = self.text_encoder([req.prompt], dev)
            context_null = self.text_encoder([n_prompt], dev)
        context = [c.to(dtype) for c in context]
        context_null = [c.to(dtype) for c in context_null]

        out = []
        skipped: list[list[int]] = []  # fast preset: steps each clip's step cache reused
        for r in range(num_clips):
            seed_g = torch.Generator(device=dev)
            seed_g.manual_seed(seed + r)
            lat_target_frames = (infer_frames + 3 + self.motion_frames) // 4 - lat_motion_frames
            target_shape = [lat_target_frames, height // 8, width // 8]
            noise = [torch.randn(16, *target_shape, dtype=dtype, device=dev, generator=seed_g)]
            max_seq_len = int(np.prod(target_shape) // 4)
            scheduler, timesteps = self._scheduler(req.solver, int(req.steps), float(req.shift))
            latents = deepcopy(noise)
            left, right = r * infer_frames, (r + 1) * infer_frames
            cond_latents = (cond[r] if req.pose_frames is not None else cond[0] * 0).to(dtype=dtype, device=dev)
            audio_input = audio_emb[..., left:right]
            input_motion_latents = motion_latents.to(dtype).clone()
            ref_in = ref_latents.to(dtype)
            drop_motion = self.drop_first_motion and r == 0
            arg_c = {
                "context": context[0:1], "seq_len": max_seq_len, "cond_states": cond_latents,
                "motion_latents": input_motion_latents, "ref_latents": ref_in, "audio_input": audio_input,
                "motion_frames": [self.motion_frames, lat_motion_frames], "drop_motion_frames": drop_motion,
            }
            arg_null = dict(arg_c, context=context_null[0:1], audio_input=0.0 * audio_input)
            guide = float(req.guidance)
            # Fast preset: the knobs are on for this loop only; ``model(branch, ...)`` goes
            # through the clip's step cache when there is one.
            cache = speed.step_cache_for(self.transformer, req.speed, len(timesteps))
            model = cache if cache is not None else (lambda branch, *a, **kw: self.transformer(*a, **kw))
            with self._autocast(), speed.applied(self.transformer, self.transformer_fp8, req.speed, dev):
                for i, t in enumerate(timesteps):
                    timestep = torch.stack([t]).to(dev)
                    if cache is not None:
                        cache.begin_step(i, timestep, latents[0])
                    pred_c = model("cond", latents[0:1], t=timestep, **arg_c)
                    if guide > 1:
                        pred_u = model("uncond", latents[0:1], t=timestep, **arg_null)
                        pred = [u + guide * (c - u) for c, u in zip(pred_c, pred_u)]
                    else:
                        pred = pred_c
                    x0 = scheduler.step(pred[0].unsqueeze(0), t, latents[0].unsqueeze(0), return_dict=False,
                                        generator=seed_g)[0]
                    latents[0] = x0.squeeze(0)
            skipped.append(cache.skipped_steps if cache is not None else [])

            lat = torch.stack(latents)
            if on_latents is not None:
                on_latents(r, lat)
            if not drop_motion:
                decode_latents = torch.cat([motion_latents, lat.to(motion_latents.dtype)], dim=2)
            else:
                decode_latents = torch.cat([ref_latents, lat.to(ref_latents.dtype)], dim=2)
            image = self._vae_decode(decode_latents)
            image = image[:, :, -infer_frames:]
            if drop_motion:
                image = image[:, :, 3:]
            out.append(image.float().cpu())
            if r + 1 < num_clips:
                overlap = min(self.motion_frames, image.shape[2])
                videos_last_frames = torch.cat(
                    [videos_last_frames[:, :, overlap:], image[:, :, -overlap:].to(videos_last_frames.dtype)], dim=2)
                motion_latents = self._vae_encode(videos_last_frames)
            if progress is not None:
                progress(r + 1, num_clips)

        video = torch.cat(out, dim=2)[0][:, :target_frames]  # [3, T, H, W] in [-1, 1]
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        return VideoResult(frames=np.ascontiguousarray(frames), fps=FPS, seed=seed, width=width, height=height,
                           num_clips=num_clips, seconds=0.0,
                           speed=speed.report(req.speed, int(req.steps), skipped))


# --------------------------------------------------------------------- loaders


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, rel: str) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{what}: unexpected tensors in {rel}: {result.unexpected_keys[:3]}",
                              code="checkpoint_mismatch")


def _check_loaded(module: torch.nn.Module, what: str, rel: str) -> None:
    left = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{what}: {len(left)} weights missing from {rel} (e.g. {left[0]})",
                              code="checkpoint_mismatch")


def _load_transformer(root: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype):
    from safetensors import safe_open

    model = meta_transformer(config)
    index = read_json(root / INDEX_FILE)
    for shard in sorted(set(index["weight_map"].values())):
        state = {}
        with safe_open(str(root / shard), framework="pt", device=str(device)) as f:
            for k in f.keys():
                state[k] = f.get_tensor(k).to(dtype)
        _assign(model, state, "WanModel_S2V", shard)
        del state
    _check_loaded(model, "WanModel_S2V", INDEX_FILE)
    return model.eval().requires_grad_(False)


def _load_t5(root: Path, text_len: int, device: torch.device, dtype: torch.dtype):
    from wan.modules.t5 import T5EncoderModel
    from wan.modules.tokenizers import HuggingfaceTokenizer

    sd = load_torch_state(root / T5_FILE)
    arch = t5_arch_from_state({k: tuple(v.shape) for k, v in sd.items()})
    model = meta_t5(arch)
    # copy=True: never keep a CPU weight backed by the memory-mapped file.
    _assign(model, {k: v.to(device=device, dtype=dtype, copy=True) for k, v in sd.items()}, "T5 encoder", T5_FILE)
    del sd
    _check_loaded(model, "T5 encoder", T5_FILE)
    model.eval().requires_grad_(False)
    # The official T5EncoderModel hard-codes umt5-xxl sizes in __init__; the wrapper is
    # built around the loaded module instead (its __call__ is the official one).
    enc = T5EncoderModel.__new__(T5EncoderModel)
    enc.text_len = text_len
    enc.dtype = dtype
    enc.device = device
    enc.checkpoint_path = str(root / T5_FILE)
    enc.tokenizer_path = str(root / TOKENIZER_DIR)
    enc.model = model
    enc.tokenizer = HuggingfaceTokenizer(name=str(root / TOKENIZER_DIR), seq_len=text_len, clean="whitespace")
    return enc


def _load_vae(root: Path, device: torch.device):
    sd = load_torch_state(root / VAE_FILE)
    model = meta_vae(vae_dim_from_state({k: tuple(v.shape) for k, v in sd.items()}))
    _assign(model, {k: v.to(device=device, dtype=torch.float32, copy=True) for k, v in sd.items()}, "Wan2.1 VAE",
            VAE_FILE)
    del sd
    _check_loaded(model, "Wan2.1 VAE", VAE_FILE)
    return wan22.make_wan21_vae(model, device=device, dtype=torch.float32)


def _load_audio_encoder(root: Path, device: torch.device):
    from wan.modules.s2v.audio_encoder import AudioEncoder

    enc = AudioEncoder(device=str(device), model_id=str(root / WAV2VEC_DIR))
    enc.model.eval().requires_grad_(False)
    return enc
