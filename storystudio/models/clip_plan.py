"""Which clips a talking video is generated in: the frame rule of the Wan2.2-S2V engine.

Plain integer arithmetic, no torch: the engine plans its clips with it, and the batch's time
budget (``storystudio/deadline.py``) and the memory plan (``render`` / ``batch``) count the
same clips, so the three never disagree about how much work a line is.
"""

from __future__ import annotations

import math

from storystudio import limits as L


def plan_clip_frames(target_frames: int, infer_frames: int, *,
                     first_clip_drop: int = L.FIRST_CLIP_DROP_FRAMES, trim_last: bool = True,
                     granularity: int = L.INFER_FRAMES_MULTIPLE, absorb_tail: int = L.TAIL_ABSORB_FRAMES,
                     max_frames: int = L.INFER_FRAMES_MAX) -> list[int]:
    """Frames to generate per clip for a video of ``target_frames`` frames.

    Official rule: ``ceil((target + drop) / infer_frames)`` clips of ``infer_frames`` frames,
    the first losing ``first_clip_drop`` frames. With ``trim_last`` (the exact path):

    * the last clip is only as long as the frames still missing (plus the drop when it is
      also the first clip), rounded up to ``granularity`` (the VAE's temporal stride) and
      never longer than ``infer_frames``: a 1 s line needs 16 + 3 frames and gets a 20-frame
      clip, not 80;
    * a last clip of at most ``absorb_tail`` frames is merged into the clip before it (as
      long as that stays within ``max_frames``): a 5 s line needs 80 + 3 frames and gets one
      84-frame clip, not 80 + 4. A clip of its own would cost a VAE encode of the motion
      frames, every denoising step and a decode for one latent frame; one latent frame more
      in the previous clip costs about 5 % of its steps. The merged clip is what the official
      code computes with ``infer_frames`` = its length; the memory plan counts it
      (:func:`longest_clip_frames`).
    """
    if target_frames < 1 or infer_frames < granularity or infer_frames % granularity:
        raise ValueError(f"bad clip plan: {target_frames} frames, clips of {infer_frames}")
    num_clips = max(1, math.ceil((target_frames + first_clip_drop) / infer_frames))
    clips = [infer_frames] * num_clips
    if trim_last:
        missing = target_frames + first_clip_drop - infer_frames * (num_clips - 1)
        clips[-1] = min(infer_frames, math.ceil(missing / granularity) * granularity)
        if len(clips) > 1 and clips[-1] <= absorb_tail and clips[-2] + clips[-1] <= max_frames:
            tail = clips.pop()
            clips[-1] += tail
    return clips


def longest_clip_frames(infer_frames: int) -> int:
    """The longest clip a job of ``infer_frames`` frames per clip may generate: the exact path
    merges a tail of up to ``TAIL_ABSORB_FRAMES`` into the clip before it
    (:func:`plan_clip_frames`), never past ``INFER_FRAMES_MAX``. What the ModelManager plans a
    video job's memory with."""
    return max(infer_frames, min(infer_frames + L.TAIL_ABSORB_FRAMES, L.INFER_FRAMES_MAX))
