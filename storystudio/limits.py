"""Media constants and every request limit and default, defined once.

The job schemas (``storystudio/tasks.py``) and the engines' ``validate()``
(``storystudio/models/image_generator.py``, ``video_generator.py``) both read these, so
a request the schema accepts is one the engine accepts too. Plain values only: this
module imports nothing, so the schemas stay free of torch.
"""

from __future__ import annotations

# ------------------------------------------------------------------ media (Wan2.2-S2V)
VIDEO_FPS = 16  # s2v_14B.sample_fps: output videos and resampled pose videos
SPEECH_SAMPLE_RATE = 16_000  # what the wav2vec2 speech encoder of Wan2.2-S2V expects
MOTION_FRAMES = 73  # s2v_14B.transformer.motion_frames
FIRST_CLIP_DROP_FRAMES = 3  # frames the first clip loses with s2v_14B.drop_first_motion
RESOLUTIONS: dict[str, int] = {"480p": 480 * 832, "720p": 720 * 1280}  # max pixel areas, as Wan's generate.py
SOLVERS = ("unipc", "dpm++")

# ------------------------------------------------------------------ every task
SEED_MAX = 2**63 - 1
PROMPT_MAX_CHARS = 4000
NON_BLANK = r"\S"  # a prompt the image engine takes holds one non-whitespace character (JSON Schema: unanchored)
ID_MAX_CHARS = 128  # project_id, scene_id
SOURCE_MAX_CHARS = 80_000_000  # a URL, data URI or base64 string
SCENES_MAX = 200
AUDIO_START_MAX_S = 86_400.0
AUDIO_DURATION_MAX_S = 3_600.0
AUDIO_MIN_SAMPLES = 400  # at 16 kHz: wav2vec2's receptive field (25 ms)
AUDIO_DURATION_MIN_S = AUDIO_MIN_SAMPLES / SPEECH_SAMPLE_RATE  # a shorter trim can never reach the engine's minimum

# ------------------------------------------------------------------ image (Z-Image-Turbo)
IMAGE_SIZE_MIN = 256
IMAGE_SIZE_MAX = 2048
IMAGE_SIZE_MULTIPLE = 16  # vae_scale_factor 8 * patch size 2
IMAGE_SIZE_DEFAULT = 1024
IMAGE_STEPS_MAX = 50
IMAGE_GUIDANCE_MAX = 20.0
# Official Turbo recipe: 8 DiT forwards (this diffusers' default sigmas give one
# forward per step), guidance_scale 0.0 -- the distilled model needs no CFG.
IMAGE_STEPS_DEFAULT = 8
IMAGE_GUIDANCE_DEFAULT = 0.0

# ------------------------------------------------------------------ video (Wan2.2-S2V)
VIDEO_AREA_MIN = 64 * 64
VIDEO_AREA_MAX = 720 * 1280
VIDEO_STEPS_MAX = 100
VIDEO_GUIDANCE_MAX = 20.0
VIDEO_SHIFT_MAX = 20.0  # shift must be > 0
INFER_FRAMES_MIN = 4
INFER_FRAMES_MAX = 160
INFER_FRAMES_MULTIPLE = 4  # the VAE's temporal stride: every clip, a shortened last one too, is a multiple
# A last clip this short is merged into the clip before it on the exact path: one latent frame
# more there costs ~5 % of that clip's steps, a clip of its own a VAE re-encode, 40 steps and a decode.
TAIL_ABSORB_FRAMES = 4
# Official defaults (s2v_14B: 40 steps, guidance 4.5, shift 3 for 480p, 80 frames per clip).
VIDEO_RESOLUTION_DEFAULT = "480p"
VIDEO_STEPS_DEFAULT = 40
VIDEO_GUIDANCE_DEFAULT = 4.5
VIDEO_SHIFT_DEFAULT = 3.0
INFER_FRAMES_DEFAULT = 80

# ------------------------------------------------------------------ video speed preset (storystudio/fast_preset.py)
VIDEO_PRESETS = ("exact", "fast")
VIDEO_PRESET_DEFAULT = "exact"
STEP_CACHE_MAX_THRESHOLD = 1.0  # accumulated relative L1 change; near 1 nearly every allowed step is reused
# The first and last steps are always computed: the first ones set the layout of the video
# (and give each CFG branch a residual to reuse), the last ones its fine detail.
STEP_CACHE_FIRST_STEPS = 2
STEP_CACHE_LAST_STEPS = 2
STEP_CACHE_MAX_CONSECUTIVE_SKIPS = 3  # a residual is never reused for more than this many steps in a row
STEP_CACHE_MIN_STEPS = STEP_CACHE_FIRST_STEPS + STEP_CACHE_LAST_STEPS + 1  # fewest steps that can skip one
# The fast preset's step-cache threshold. The indicator is the change of the noisy latent
# between steps (storystudio/models/step_cache.py), which the sampler's schedule mostly sets:
# on the tiny random checkpoint, 40 steps at shift 3 move it by 1.2 % per step early and
# 6.8 % late, and 0.06 reuses 21 of the 40 steps. Whether that keeps the quality must be
# judged on real weights (bench/video_fast_drift.py measures the drift on random ones).
FAST_STEP_CACHE_THRESHOLD = 0.06
