"""Ulysses sequence parallelism for the Wan2.2-S2V DiT, on ``torch.distributed`` directly.

Why: one 480p CFG step is two forwards of a 16B-parameter DiT over ~32k tokens; the
attention and the linear layers both scale with the token count, so splitting the
*sequence* over N GPUs divides the work by N. Every rank holds the full weights.

How (DeepSpeed-Ulysses, as the official ``wan/distributed`` code does, arXiv 2309.14509):

* The embeddings, RoPE table, motion tokens and time/text embeddings are computed on
  every rank for the whole sequence (cheap), exactly as ``WanModel_S2V.forward`` does;
  then each rank keeps one contiguous slice of the tokens **and the matching rows of
  the RoPE table**, so positions stay those of the global sequence.
* In each block's self-attention, q/k/v of the local tokens are exchanged with one
  all-to-all so that each rank holds *all* tokens for ``heads / N`` heads, attention runs
  through the same ``flash_attention`` the 1-GPU path uses (the name
  :mod:`storystudio.patches.wan22` binds: SDPA or flash-attn), and a second all-to-all
  brings the output back to the local tokens with all heads. Everything else in a block
  (modulation, cross-attention to the text, FFN) is per token and runs on the slice.
* Audio injection (every few blocks; :mod:`storystudio.models.audio_injection`, shared with
  the 1-GPU compiled path) is per frame: each token attends to its own frame's audio
  tokens. The official code all-gathers the whole sequence for it and runs it redundantly
  on every rank; here each rank injects only its own tokens, padding the partial frames at
  the slice edges, which keeps the per-rank work at 1/N.
* RoPE: with the exact path's fused RoPE (:mod:`storystudio.models.fused_rope`, which rank
  0's engine announces with every forward) the table is built on the GPU and kept as one
  row per token; the rotation is the same. Built from the CPU table on every rank, it was
  a serial cost that did not shrink with N.
* The output head is per token too: it runs on the local video tokens and only its small
  output (64 channels instead of 5120) is gathered.

Differences from the official ``use_sp`` path, on purpose: slices may be uneven (the
token count is whatever the motion frames make it; ``all_to_all`` with per-rank sizes
needs no padding, so no attention mask and the same attention kernel as on one GPU),
the process group is a parameter (classifier-free guidance can run on two half-size
groups, see :func:`split_cfg_batch`), and the module is never patched: the 1-GPU
forward of the same model object stays the official one.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from storystudio.models import fused_rope
from storystudio.models.audio_injection import inject_audio

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SPGroup:
    """The ranks one sequence is split over: ``group`` (``None`` = the default group),
    this process's ``rank`` inside it and the group ``size``."""

    group: Any
    rank: int
    size: int

    @classmethod
    def world(cls) -> SPGroup:
        if not dist.is_initialized():
            return cls(None, 0, 1)
        return cls(None, dist.get_rank(), dist.get_world_size())

    def split_sizes(self, length: int) -> list[int]:
        """Balanced contiguous slices: the first ``length % size`` ranks get one more token."""
        base, extra = divmod(length, self.size)
        return [base + (1 if r < extra else 0) for r in range(self.size)]

    def bounds(self, sizes: list[int], rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        start = sum(sizes[:r])
        return start, start + sizes[r]


# ------------------------------------------------------------------------ collectives


def seq_to_heads(x: torch.Tensor, sp: SPGroup, sizes: list[int]) -> torch.Tensor:
    """[K, B, L_local, H, D] → [K, B, L, H/N, D]: scatter the heads, gather the sequence.

    One ``all_to_all_single`` over a flat buffer: head chunk ``p`` of every rank goes to
    rank ``p``, and what comes back from rank ``r`` holds ``sizes[r]`` tokens. Per-rank
    sizes may differ (NCCL and gloo both take split sizes), so no padding is needed.
    """
    if sp.size == 1:
        return x
    k, b, s, h, d = x.shape
    hn = h // sp.size
    # [N, K, B, s, H/N, D]: the chunk for rank p is contiguous at index p
    send = x.view(k, b, s, sp.size, hn, d).permute(3, 0, 1, 2, 4, 5).contiguous().view(-1)
    per_token = k * b * hn * d
    recv = x.new_empty(per_token * sum(sizes))
    dist.all_to_all_single(recv, send, output_split_sizes=[n * per_token for n in sizes],
                           input_split_sizes=[s * per_token] * sp.size, group=sp.group)
    parts = [c.view(k, b, n, hn, d) for c, n in zip(recv.split([n * per_token for n in sizes]), sizes, strict=True)]
    return torch.cat(parts, dim=2)


def heads_to_seq(x: torch.Tensor, sp: SPGroup, sizes: list[int]) -> torch.Tensor:
    """[B, L, H/N, D] → [B, L_local, H, D]: the inverse of :func:`seq_to_heads`."""
    if sp.size == 1:
        return x
    b, _, hn, d = x.shape
    per_token = b * hn * d
    send = torch.cat([c.contiguous().view(-1) for c in x.split(sizes, dim=1)])
    mine = sizes[sp.rank]
    recv = x.new_empty(sp.size * mine * per_token)
    dist.all_to_all_single(recv, send, output_split_sizes=[mine * per_token] * sp.size,
                           input_split_sizes=[n * per_token for n in sizes], group=sp.group)
    # [N, B, s, H/N, D] → [B, s, N, H/N, D] → [B, s, H, D] (rank p sent head chunk p)
    return recv.view(sp.size, b, mine, hn, d).permute(1, 2, 0, 3, 4).reshape(b, mine, sp.size * hn, d)


def gather_seq(x: torch.Tensor, sp: SPGroup, sizes: list[int], dim: int = 1) -> torch.Tensor:
    """All-gather uneven slices along ``dim`` (padded to the largest slice for the collective)."""
    if sp.size == 1:
        return x
    longest = max(sizes)
    pad = longest - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(sp.size)]
    dist.all_gather(parts, x.contiguous(), group=sp.group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)], dim=dim)


# ------------------------------------------------------------------------ attention


def _attention_fn():
    """The attention the 1-GPU path of WanModel_S2V calls, looked up at call time.

    ``storystudio.patches.wan22`` rebinds ``flash_attention`` in the official modules
    (SDPA when flash-attn is absent); reading the name here means the SP path always
    uses the same kernel choice as the single-GPU path.
    """
    return sys.modules["wan.modules.s2v.model_s2v"].flash_attention


def _ulysses_self_attention(self, x, seq_lens, grid_sizes, freqs, *, sp: SPGroup, sizes: list[int]):
    """``WanS2VSelfAttention.forward`` for a sequence slice (bound to one attention module)."""
    from wan.modules.s2v.model_s2v import rope_apply_usp

    rope = fused_rope.rope_apply if fused_rope.is_active() else rope_apply_usp
    b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
    q = self.norm_q(self.q(x)).view(b, s, n, d)
    k = self.norm_k(self.k(x)).view(b, s, n, d)
    v = self.v(x).view(b, s, n, d)
    # ``freqs`` holds this slice's rows of the global RoPE table, so the official
    # per-token rotation gives global positions.
    q = rope(q, grid_sizes, freqs)
    k = rope(k, grid_sizes, freqs)
    if v.dtype in _HALF:
        # rope returns float32; the attention casts to the model dtype anyway (same
        # values), so casting first halves the bytes the all-to-all moves.
        q, k = q.to(v.dtype), k.to(v.dtype)
    else:
        v = v.to(q.dtype)
    qkv = seq_to_heads(torch.stack([q, k, v]), sp, sizes)  # [3, B, L, n/N, d]
    out = _attention_fn()(qkv[0], qkv[1], qkv[2], k_lens=seq_lens, window_size=self.window_size)
    out = heads_to_seq(out, sp, sizes)  # [B, s, n, d]
    return self.o(out.flatten(2))


@contextlib.contextmanager
def ulysses_attention(model: nn.Module, sp: SPGroup, sizes: list[int]) -> Iterator[None]:
    """Bind the SP self-attention to every block for the duration of one forward.

    The official block forward (modulation, cross-attention, FFN) is reused unchanged;
    only ``block.self_attn.forward`` is swapped, and always put back.
    """
    attns = [block.self_attn for block in model.blocks]
    for attn in attns:
        attn.forward = types.MethodType(
            lambda self, *a, **kw: _ulysses_self_attention(self, *a, sp=sp, sizes=sizes, **kw), attn)
    try:
        yield
    finally:
        for attn in attns:
            attn.__dict__.pop("forward", None)


# ------------------------------------------------------------------------ the forward


@dataclass
class _Prepared:
    """Everything ``WanModel_S2V.forward`` computes before its first block, whole sequence."""

    x: torch.Tensor  # [B, L, C] tokens: video, reference, motion
    freqs: torch.Tensor  # [B, L, heads, C/heads/2] complex RoPE rows of the global sequence
    seq_lens: torch.Tensor  # [B] tokens per sample (= L)
    video_len: int  # tokens of the noisy video latent (the first tokens; the head keeps these)
    seg_idx: int  # first token modulated with the second (t = 0) row of e0
    grid_sizes: list
    video_grid: torch.Tensor  # [B, 3] (F, H, W) patches of the video latent
    e: torch.Tensor  # time embedding for the head
    e0: torch.Tensor  # block modulation, [B, 6, 2, C] (video tokens | the rest)
    context: torch.Tensor  # projected text embedding
    audio_emb: torch.Tensor  # [B, frames, tokens, C] merged audio tokens per latent frame
    audio_emb_global: torch.Tensor | None  # AdaIN embedding per frame (enable_adain)


def _prepare(model, x, t, context, seq_len, ref_latents, motion_latents, cond_states, audio_input=None,
             motion_frames=(17, 5), add_last_motion=2, drop_motion_frames=False) -> _Prepared:
    """The official forward up to the blocks (wan/modules/s2v/model_s2v.py), restructured.

    Kept step for step with the official code (same calls, same order) so the tokens,
    RoPE rows and embeddings are bit-identical to the 1-GPU path.
    """
    from wan.modules.model import sinusoidal_embedding_1d
    from wan.modules.s2v.s2v_utils import rope_precompute

    add_last_motion = model.add_last_motion * add_last_motion
    audio_input = torch.cat([audio_input[..., 0:1].repeat(1, 1, 1, motion_frames[0]), audio_input], dim=-1)
    audio_res = model.casual_audio_encoder(audio_input)
    audio_emb_global = None
    if model.enbale_adain:  # (sic) the official attribute name
        audio_emb_global, audio_emb = audio_res
        audio_emb_global = audio_emb_global[:, motion_frames[1]:].clone()
    else:
        audio_emb = audio_res
    audio_emb = audio_emb[:, motion_frames[1]:, :]

    # video latent (+ pose condition) → tokens
    xs = [model.patch_embedding(u.unsqueeze(0)) for u in x]
    xs = [u + model.cond_encoder(c.unsqueeze(0)) for u, c in zip(xs, cond_states)]
    video_grid = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in xs])
    xs = [u.flatten(2).transpose(1, 2) for u in xs]
    seq_lens = torch.tensor([u.size(1) for u in xs], dtype=torch.long)
    grid_sizes = [[torch.zeros_like(video_grid), video_grid, video_grid]]

    # reference image tokens, placed at frame index 30 of the RoPE grid (official)
    model.lat_motion_frames = motion_latents[0].shape[1]
    ref = [model.patch_embedding(r.unsqueeze(0)) for r in ref_latents]
    batch_size = len(ref)
    height, width = ref[0].shape[3], ref[0].shape[4]
    grid_sizes = grid_sizes + [[
        torch.tensor([30, 0, 0]).unsqueeze(0).repeat(batch_size, 1),
        torch.tensor([31, height, width]).unsqueeze(0).repeat(batch_size, 1),
        torch.tensor([1, height, width]).unsqueeze(0).repeat(batch_size, 1),
    ]]
    ref = [r.flatten(2).transpose(1, 2) for r in ref]
    video_len = int(seq_lens[0])
    seq_lens = seq_lens + torch.tensor([r.size(1) for r in ref], dtype=torch.long)
    xs = [torch.cat([u, r], dim=1) for u, r in zip(xs, ref)]
    mask_input = [torch.zeros([1, u.shape[1]], dtype=torch.long, device=xs[0].device) for u in xs]
    for m in mask_input:
        m[:, video_len:] = 1

    # RoPE rows for video + reference, then motion tokens with their own rows
    xcat = torch.cat(xs)
    b, s, n, d = xcat.size(0), xcat.size(1), model.num_heads, model.dim // model.num_heads
    freqs = rope_precompute(xcat.detach().view(b, s, n, d), grid_sizes, model.freqs, start=None)
    xs = [u.unsqueeze(0) for u in xcat]
    freqs = [u.unsqueeze(0) for u in freqs]
    xs, seq_lens, freqs, mask_input = model.inject_motion(
        xs, seq_lens, freqs, mask_input, motion_latents, drop_motion_frames=drop_motion_frames,
        add_last_motion=add_last_motion)
    xcat = torch.cat(xs, dim=0)
    freqs = torch.cat(freqs, dim=0)
    mask_input = torch.cat(mask_input, dim=0)
    xcat = xcat + model.trainable_cond_mask(mask_input).to(xcat.dtype)

    # time embeddings (zero_timestep: the reference/motion tokens get t = 0)
    if model.zero_timestep:
        t = torch.cat([t, torch.zeros([1], dtype=t.dtype, device=t.device)])
    with torch.autocast(xcat.device.type, dtype=torch.float32, enabled=xcat.device.type == "cuda"):
        e = model.time_embedding(sinusoidal_embedding_1d(model.freq_dim, t).float())
        e0 = model.time_projection(e).unflatten(1, (6, model.dim))
    if model.zero_timestep:
        e = e[:-1]
        zero_e0 = e0[-1:]
        e0 = e0[:-1]
        e0 = torch.cat([e0.unsqueeze(2), zero_e0.unsqueeze(2).repeat(e0.size(0), 1, 1, 1)], dim=2)
    else:
        e0 = e0.unsqueeze(2).repeat(1, 1, 2, 1)

    context = model.text_embedding(torch.stack([
        torch.cat([u, u.new_zeros(model.text_len - u.size(0), u.size(1))]) for u in context]))
    return _Prepared(x=xcat, freqs=freqs, seq_lens=seq_lens, video_len=video_len,
                     seg_idx=video_len if model.zero_timestep else 0,
                     grid_sizes=grid_sizes, video_grid=deepcopy(video_grid), e=e, e0=e0, context=context,
                     audio_emb=audio_emb, audio_emb_global=audio_emb_global)


def sp_forward(model: nn.Module, sp: SPGroup, **kwargs: Any) -> list[torch.Tensor]:
    """``WanModel_S2V.forward(**kwargs)`` with the token sequence split over ``sp``.

    Every rank of ``sp`` calls this with the same arguments and gets the same full
    output (a list with one ``[C, F, H, W]`` float tensor per sample), equal to the
    1-GPU forward up to floating-point summation order.
    """
    if model.num_heads % sp.size:
        raise ValueError(f"{model.num_heads} attention heads cannot be split over {sp.size} ranks")
    p = _prepare(model, **kwargs)
    length = p.x.shape[1]
    sizes = sp.split_sizes(length)
    start, stop = sp.bounds(sizes)
    x = p.x[:, start:stop]
    # Block modulation switches from the video row to the reference/motion row at the
    # first non-video token; in slice coordinates that is seg_idx - start (the block
    # clamps it to the slice).
    e0 = [p.e0, torch.tensor(p.seg_idx - start)]
    # The exact path's RoPE (all ranks follow rank 0): the table built on the GPU from the
    # moved position table, one row per token instead of one per token and head.
    freqs = fused_rope.compact_table(p.freqs) if fused_rope.is_active() else p.freqs
    block_kwargs = dict(e=e0, seq_lens=p.seq_lens, grid_sizes=p.grid_sizes, freqs=freqs[:, start:stop],
                        context=p.context, context_lens=None)
    with ulysses_attention(model, sp, sizes):
        for idx, block in enumerate(model.blocks):
            x = block(x, **block_kwargs)
            x = inject_audio(model, idx, x, start, p.video_len, p.audio_emb, p.audio_emb_global)
    # The head is per token: run it on this slice's video tokens, gather its small output.
    video_sizes = [max(0, min(hi, p.video_len) - lo) for lo, hi in (sp.bounds(sizes, r) for r in range(sp.size))]
    head = model.head(x[:, :video_sizes[sp.rank]], p.e)
    head = gather_seq(head, sp, video_sizes, dim=1)
    return [u.float() for u in model.unpatchify(head, p.video_grid)]
