"""Multi-head Latent Attention over a paged latent cache.

Per token and layer the cache holds the RMS-normed latent ``c_kv`` (kv_lora_rank values) followed by the roped
shared key (qk_rope_head_dim values). Decode absorbs ``kv_b_proj`` into the query and the output so attention runs on
the latent directly. A prompt chunk attends over its context block by block (:mod:`k2ray.model.mla_prefill`: the
fused flash kernel on CPU, a tiled torch twin elsewhere), expanded or absorbed by a cost rule, at memory linear in
the context; :meth:`MLAttention._prefill` is the naive reference
(the whole context expanded, the full score matrix), kept for tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from k2ray.config import ModelArgs
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.layers import RMSNorm
from k2ray.model.mla_prefill import mla_prefill, use_absorbed
from k2ray.model.rope import RotaryEmbedding


def context_slots(kv_cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """Flat cache slots of one sequence's first ``ctx_len`` tokens: int64 ``[ctx_len]``."""
    block_size = kv_cache.shape[1]
    pos = torch.arange(ctx_len, device=kv_cache.device)
    return block_table.to(kv_cache.device)[pos // block_size] * block_size + pos % block_size


def gather_latents(kv_cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """The first ``ctx_len`` cached latents of one sequence: ``[ctx_len, kv_cache_dim]``."""
    return kv_cache.view(-1, kv_cache.shape[-1])[context_slots(kv_cache, block_table, ctx_len)]


class MLAProjection(NamedTuple):
    """One step's projected tokens: per-head query parts ``q_nope [n, heads, nope]`` and roped ``q_pe
    [n, heads, rope]``; the normed latent ``c_kv [n, kv_lora_rank]`` and the roped shared key ``k_pe [n, rope]``."""

    q_nope: torch.Tensor
    q_pe: torch.Tensor
    c_kv: torch.Tensor
    k_pe: torch.Tensor

    def latent(self) -> torch.Tensor:
        """What the cache holds per token: ``[n, kv_lora_rank + rope]``."""
        return torch.cat([self.c_kv, self.k_pe], dim=-1)


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.q_lora_rank = args.q_lora_rank
        qk = args.qk_head_dim
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, self.num_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(args.hidden_size, self.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, args.hidden_size, bias=False)
        self.scale = args.softmax_scale

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.attend(self.project(x, rope, cos_sin), meta, kv_cache)

    # -- projections -----------------------------------------------------------------------------------------
    def project(
        self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> MLAProjection:
        """The per-token part: query and latent projections, their norms, rope on the rope dims."""
        n = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(n, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = cos_sin
        q_pe = rope.apply(q_pe, cos, sin)
        k_pe = rope.apply(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        return MLAProjection(q_nope, q_pe, c_kv, k_pe)

    # -- attention -------------------------------------------------------------------------------------------
    def attend(
        self, p: MLAProjection, meta: AttentionMetadata, kv_cache: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Store the new latents in the cache, attend over each sequence's context, project out: ``[n, hidden]``."""
        q_nope, q_pe = p.q_nope, p.q_pe
        n, device = q_nope.shape[0], q_nope.device
        latent = p.latent()
        if kv_cache is not None:
            kv_cache.view(-1, kv_cache.shape[-1])[meta.slot_mapping] = latent.to(kv_cache.dtype)

        out = q_nope.new_empty(n, self.num_heads, self.v_dim)
        decode = meta.decode_seqs() if kv_cache is not None else []
        if decode:
            # Single-token sequences go through the batched absorbed path even when the step also has prompt chunks.
            rows, block_tables, context_lens = meta.decode_tensors(device)
            out[rows] = self._decode(q_nope[rows], q_pe[rows], kv_cache, block_tables, context_lens, meta.step_cache)
        if len(decode) < len(meta.seqs):
            batched = set(decode)
            for i, s in enumerate(meta.seqs):
                if i in batched:
                    continue
                sl = slice(s.q_start, s.q_start + s.q_len)
                if kv_cache is None:
                    if s.ctx_len != s.q_len:
                        raise ValueError("attention without a cache needs ctx_len == q_len")
                    lat, slots = latent[sl], None
                else:  # read tile by tile straight from the paged cache
                    lat = kv_cache.view(-1, kv_cache.shape[-1])
                    slots = context_slots(kv_cache, s.block_table, s.ctx_len)
                out[sl] = self._prefill_blocked(q_nope[sl], q_pe[sl], lat, slots, s.ctx_len)
        return self.o_proj(out.reshape(n, self.num_heads * self.v_dim))

    def _prefill_blocked(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latents: torch.Tensor, slots: torch.Tensor | None, ctx_len: int
    ) -> torch.Tensor:
        """One sequence's chunk over its context, block by block; absorbed or expanded by :func:`use_absorbed`."""
        absorbed = use_absorbed(
            q_nope.shape[0], ctx_len, self.num_heads, self.kv_lora_rank, self.rope_dim, self.nope, self.v_dim
        )
        return mla_prefill(q_nope, q_pe, latents, slots, ctx_len, self.kv_b_proj.weight, self.scale, absorbed)

    def _prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, offset: int) -> torch.Tensor:
        """Naive MLA: expand the latent to per-head keys/values. ``offset`` = cached tokens before the first query."""
        t = lat.shape[0]
        kv = self.kv_b_proj(lat[:, : self.kv_lora_rank]).view(t, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_pe = lat[:, self.kv_lora_rank :]
        scores = torch.einsum("qhd,khd->hqk", q_nope, k_nope) + torch.einsum("qhr,kr->hqk", q_pe, k_pe)
        scores = scores * self.scale
        qpos = torch.arange(q_nope.shape[0], device=lat.device).unsqueeze(1) + offset
        causal = torch.arange(t, device=lat.device).unsqueeze(0) <= qpos
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.einsum("hqk,khd->qhd", probs, v)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [heads, nope, latent]`` and ``W_UV [heads, v, latent]`` views of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :]

    def _decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        step_cache: dict | None = None,
    ) -> torch.Tensor:
        """Absorbed MLA for one new token per sequence, batched over sequences (``step_cache``: the step's, so the
        kernel's per-step preparation is shared by every layer)."""
        from k2ray.kernels import mla_decode

        w_uk, w_uv = self._absorbed_weights()
        q_latent = torch.einsum("bhn,hnl->bhl", q_nope, w_uk)
        out_latent = mla_decode(
            q_latent.to(kv_cache.dtype), q_pe.to(kv_cache.dtype), kv_cache, block_tables, context_lens, self.scale,
            step_cache,
        ).to(q_nope.dtype)
        return torch.einsum("bhl,hvl->bhv", out_latent, w_uv)
