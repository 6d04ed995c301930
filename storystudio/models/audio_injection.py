"""The Wan2.2-S2V audio injection (``WanModel_S2V.after_transformer_block``), split so it compiles.

What it is: after 12 of the 40 DiT blocks, every video token attends to the audio tokens
of its own latent frame (an adaptive LayerNorm, then a cross-attention) and the result
is added to the hidden states. The official method does this eagerly on the full float32
hidden states: a clone of the video tokens, a copy to regroup them by frame, the norm,
the cross-attention's casts, and a full-size add — about 0.1 s of a 480p CFG step on the
H100 outside the compiled blocks (``bench/results/2026-11-26-h100-step-profile-head.json``).

Why not compile the official method: it picks its modules by ``block_idx``, so dynamo
would specialise (and compile) once per injected block. Here the choice is made in
Python (:func:`inject_audio`) and the per-frame math is one function of the chosen
modules (:func:`frame_residual`), which dynamo compiles once for all 12 injections (the
modules' weights are graph inputs, as for the blocks). The math is the official one:
the same modules in the same order; the in-place add of the residual is the same write.

The sequence-parallel forward uses the same two functions on a rank's slice of tokens
(:mod:`storystudio.distributed.sequence_parallel`): a slice that does not start and end
on frame edges is padded to whole frames with zero tokens, whose output is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

# (norm, injector, frames [b, t*n, c], audio [b, t, m, c], global [b, t, k, c] | None) -> residual [b, t*n, c]
ResidualFn = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def frame_residual(norm: nn.Module, injector: nn.Module, frames: torch.Tensor, audio: torch.Tensor,
                   audio_global: torch.Tensor | None) -> torch.Tensor:
    """The injection's residual for tokens laid out in whole latent frames.

    ``norm`` is the block's ``AdaLayerNorm`` when ``audio_global`` is given (the official
    ``attn_norm`` AdaIN mode), else its plain pre-norm; ``injector`` its
    ``AudioCrossAttention``. Each frame's tokens attend to that frame's audio tokens only.
    """
    t = audio.shape[1]
    hidden = rearrange(frames, "b (t n) c -> (b t) n c", t=t)
    if audio_global is not None:
        attn_in = norm(hidden, temb=rearrange(audio_global, "b t n c -> (b t) n c")[:, 0])
    else:
        attn_in = norm(hidden)
    context = rearrange(audio, "b t n c -> (b t) n c")
    lens = torch.full((attn_in.shape[0],), context.shape[1], dtype=torch.long, device=attn_in.device)
    out = injector(x=attn_in, context=context, context_lens=lens)
    return rearrange(out, "(b t) n c -> b (t n) c", t=t)


def inject_audio(model: Any, block_idx: int, x: torch.Tensor, start: int, video_len: int,
                 audio_emb: torch.Tensor, audio_emb_global: torch.Tensor | None, *,
                 residual: ResidualFn = frame_residual) -> torch.Tensor:
    """``WanModel_S2V.after_transformer_block`` on tokens [start, start + x.shape[1]) of the sequence.

    ``x`` is [b, tokens, c] (the whole sequence on one GPU: ``start=0``); the first
    ``video_len`` tokens of the sequence are the video, in ``audio_emb.shape[1]`` frames.
    Updates ``x`` in place (as the official method does) and returns it.
    ``residual`` is :func:`frame_residual` or a compiled version of it.
    """
    injector = model.audio_injector
    if block_idx not in injector.injected_block_id:
        return x
    stop = min(start + x.shape[1], video_len)
    if stop <= start:
        return x  # this slice holds no video tokens
    num_frames = audio_emb.shape[1]
    per_frame = video_len // num_frames
    f0, f1 = start // per_frame, -(-stop // per_frame)
    lead = start - f0 * per_frame
    local = x[:, :stop - start]
    if lead == 0 and local.shape[1] == (f1 - f0) * per_frame:
        framed = local  # whole frames already (always on one GPU): no padded copy
    else:
        framed = local.new_zeros(local.shape[0], (f1 - f0) * per_frame, local.shape[2])
        framed[:, lead:lead + local.shape[1]] = local

    idx = injector.injected_block_id[block_idx]
    adain = model.enbale_adain and model.adain_mode == "attn_norm"
    norm = injector.injector_adain_layers[idx] if adain else injector.injector_pre_norm_feat[idx]
    glob = audio_emb_global[:, f0:f1] if adain else None
    out = residual(norm, injector.injector[idx], framed, audio_emb[:, f0:f1], glob)
    local.add_(out[:, lead:lead + local.shape[1]])
    return x


def model_injection(model: Any, residual: ResidualFn) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A drop-in ``after_transformer_block(block_idx, hidden_states)`` for the 1-GPU forward,
    computing the residual with ``residual``; reads what ``WanModel_S2V.forward`` stored on
    the model for this call (the merged audio embedding and the video token count)."""
    if getattr(model, "use_context_parallel", False):
        raise ValueError("the official context-parallel forward gathers the sequence itself; not supported here")

    def after_transformer_block(block_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        return inject_audio(model, block_idx, hidden_states, 0, int(model.original_seq_len), model.merged_audio_emb,
                            getattr(model, "audio_emb_global", None), residual=residual)

    return after_transformer_block
