"""Upstream drift: the engine's forked generation loop against the official ``WanS2V.generate``.

``WanS2VGenerator._generate`` is a fork of ``wan/speech2video.py``'s ``WanS2V.generate``
(file paths replaced by arrays, CUDA-only calls removed, the unused encode of the black
motion frames skipped). This test runs the OFFICIAL method of the installed ``wan22``
next to the fork, on the tiny checkpoint, with the same patches (``import_wan``: SDPA
attention, no CUDA), and compares the frames. If a ``wan22`` upgrade changes the official
loop, this fails and the fork must follow.

How the official method runs here:

* ``speech2video.py`` imports torchvision and decord at module level; neither is
  installed (the worker needs neither). The test puts minimal stand-ins into
  ``sys.modules`` just for that import: torchvision's ``Resize`` / ``CenterCrop`` /
  ``ToTensor`` on PIL images, written from torchvision's documented behaviour (bilinear
  resize of the shorter side, rounded centre crop, HWC uint8 -> CHW float / 255), and a
  decord whose ``VideoReader`` is never reached (no pose video).
* ``WanS2V.__init__`` loads the checkpoint itself and needs CUDA, so the object is made
  with ``WanS2V.__new__`` and given the engine's loaded components (DiT, T5, VAE,
  wav2vec2), with every other attribute set as ``__init__`` sets it from the official
  ``s2v_14B`` config. ``offload_model=False`` (its offload calls are CUDA-only).
* Its inputs are files, as it wants: the reference image as a PNG, the speech as a
  16 kHz float WAV (``librosa.load`` reads it back unchanged).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from storystudio.models.video_generator import VideoRequest, WanS2VGenerator
from storystudio.models.video_path import VideoPathOptions
from storystudio.patches import wan22


# ------------------------------------------------------------- torchvision / decord stand-ins
class _Resize:
    """torchvision ``Resize(size)`` for PIL images: the shorter side becomes ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        assert isinstance(img, Image.Image), "only the PIL path is used without a pose video"
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short == self.size:
            return img
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return img.resize((new_w, new_h), Image.BILINEAR)


class _CenterCrop:
    def __init__(self, size: tuple[int, int]) -> None:
        self.h, self.w = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        assert w >= self.w and h >= self.h, "Resize(min(H, W)) never leaves the image smaller than the crop"
        top, left = int(round((h - self.h) / 2.0)), int(round((w - self.w) / 2.0))
        return img.crop((left, top, left + self.w, top + self.h))


class _ToTensor:
    def __call__(self, pic: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(pic, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)


def _import_official_speech2video(monkeypatch) -> types.ModuleType:
    wan22.import_wan()  # the production patches, before anything else imports wan
    import transformers  # noqa: F401 - imported before the stand-ins: it probes for torchvision

    if "wan.speech2video" not in sys.modules:
        tv = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        transforms.Resize, transforms.CenterCrop, transforms.ToTensor = _Resize, _CenterCrop, _ToTensor
        transforms.functional, tv.transforms = functional, transforms
        decord = types.ModuleType("decord")

        def no_video(*a, **k):
            raise AssertionError("decord.VideoReader is only used with a pose video")

        decord.VideoReader = no_video
        for name, mod in (("torchvision", tv), ("torchvision.transforms", transforms),
                          ("torchvision.transforms.functional", functional), ("decord", decord)):
            monkeypatch.setitem(sys.modules, name, mod)
        import wan.speech2video  # noqa: F401
    return sys.modules["wan.speech2video"]


def _official(gen: WanS2VGenerator, s2v_module: types.ModuleType):
    """A ``WanS2V`` around the engine's components, attributes as ``WanS2V.__init__`` sets them."""
    from wan.configs.wan_s2v_14B import s2v_14B as cfg

    off = s2v_module.WanS2V.__new__(s2v_module.WanS2V)
    off.device = gen.device
    off.config = cfg
    off.rank = 0
    off.t5_cpu = False
    off.init_on_cpu = False
    off.num_train_timesteps = cfg.num_train_timesteps
    off.param_dtype = gen.dtype  # cfg.param_dtype is bf16, for CUDA; the engine runs float32 on CPU
    off.text_encoder = gen.text_encoder
    off.vae = gen.vae
    off.noise_model = gen.transformer
    off.audio_encoder = gen.audio_encoder
    off.sp_size = 1
    off.sample_neg_prompt = cfg.sample_neg_prompt
    off.motion_frames = cfg.transformer.motion_frames
    off.drop_first_motion = cfg.drop_first_motion
    off.fps = cfg.sample_fps
    off.audio_sample_m = 0
    return off


@pytest.fixture(scope="module")
def wan_gen(tiny_models) -> WanS2VGenerator:
    return WanS2VGenerator.from_pretrained(tiny_models[1], device="cpu")


# Which engine paths must match the official loop, and over which frames. The baseline
# (two forwards, default attention, full clips) and the exact path with full clips (CFG
# batched, self-checked attention) compute the same math: every frame must match. The
# exact path's trimmed last clip draws noise of another shape, so only the clips before it
# can match; the trimmed clip itself is covered by tests/test_video_exact.py.
PATHS = {
    "baseline": (VideoPathOptions.baseline(), "all"),
    "exact-full-clips": (VideoPathOptions(cfg_batch="on", trim_last_clip=False), "all"),
    "exact": (VideoPathOptions(cfg_batch="on"), "before-last-clip"),
}


_OFFICIAL: dict[tuple[float, int], np.ndarray] = {}  # (guidance, clips) -> frames: one official run per key


@pytest.mark.parametrize(("guidance", "path"), [(4.5, "exact-full-clips"), (4.5, "exact"), (1.0, "baseline")],
                         ids=["cfg-exact-full-clips", "cfg-exact", "no-cfg-baseline"])
def test_fork_matches_official_generate(wan_gen, tmp_path, monkeypatch, guidance, path):
    options, compare = PATHS[path]
    monkeypatch.setattr(wan_gen, "options", options)  # read at every generate: no reload
    s2v = _import_official_speech2video(monkeypatch)
    official = _official(wan_gen, s2v)

    rng = np.random.RandomState(3)
    image = Image.fromarray((rng.rand(96, 80, 3) * 255).astype(np.uint8))  # portrait: Resize + CenterCrop work
    audio = (rng.randn(int(16000 * 2.25)) * 0.1).astype(np.float32)  # 36 frames: clips 16+16+8 (exact), official 3
    image_path, audio_path = tmp_path / "ref.png", tmp_path / "speech.wav"
    image.save(image_path)
    sf.write(audio_path, audio, 16000, subtype="FLOAT")
    area, infer_frames, steps, shift, seed, prompt = 64 * 64, 16, 3, 3.0, 11, "a person talking"

    ours = wan_gen.generate(VideoRequest(image=image, audio=audio, prompt=prompt, max_area=area, steps=steps,
                                         guidance=guidance, shift=shift, seed=seed, infer_frames=infer_frames))
    assert ours.num_clips >= 2, "at least one clip must start from the previous clip's motion frames"
    if guidance > 1:
        assert ours.engine["cfg_batched_clips"] == ours.num_clips or options.cfg_batch == "off"
    if compare == "before-last-clip":
        assert ours.engine["clip_frames"][-1] < infer_frames, "the exact path must trim this last clip"

    key = (guidance, ours.num_clips)
    if key not in _OFFICIAL:
        _OFFICIAL[key] = _run_official(official, prompt, image_path, audio_path, ours.num_clips, area,
                                       infer_frames, shift, steps, guidance, seed)
    theirs = _OFFICIAL[key]
    _check(theirs, ours, wan_gen, compare, infer_frames)


def _run_official(official, prompt, image_path, audio_path, clips, area, infer_frames, shift, steps, guidance,
                  seed) -> np.ndarray:
    with torch.no_grad():
        video = official.generate(
            input_prompt=prompt, ref_image_path=str(image_path), audio_path=str(audio_path), enable_tts=False,
            tts_prompt_audio=None, tts_prompt_text=None, tts_text=None, num_repeat=clips,
            pose_video=None, max_area=area, infer_frames=infer_frames, shift=shift, sample_solver="unipc",
            sampling_steps=steps, guide_scale=guidance, n_prompt="", seed=seed, offload_model=False,
        )  # [3, T, H, W] in [-1, 1]
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def _check(theirs: np.ndarray, ours, wan_gen: WanS2VGenerator, compare: str, infer_frames: int) -> None:
    # The official loop stops at the clips the audio embedding covers; the fork pads the
    # embedding with zeros for a last partial clip. Both must cover two clips or more.
    n = min(len(theirs), len(ours.frames))
    assert n >= infer_frames - 3 + infer_frames, (len(theirs), len(ours.frames))
    if compare == "before-last-clip":  # frames of every clip but the last (the first loses its drop frames)
        n = sum(ours.engine["clip_frames"][:-1]) - (3 if wan_gen.drop_first_motion else 0)
    assert theirs.shape[1:] == ours.frames.shape[1:] == (ours.height, ours.width, 3)
    diff = np.abs(theirs[:n].astype(np.int16) - ours.frames[:n].astype(np.int16))
    assert diff.max() <= 1, f"fork drifted from the official generate: max |diff| {diff.max()}, mean {diff.mean():.3f}"
    # and the frames are not trivially equal (e.g. both constant)
    assert ours.frames[:n].std() > 5
