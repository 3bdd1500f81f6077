"""Absorbed-MLA decode attention over the paged latent cache.

With ``kv_b_proj`` absorbed into the query and the output, every head attends directly to the shared per-token latent
``[c_kv (L) | k_rope (R)]``:

    score[b, h, j] = (q_latent[b, h] . c_kv[j] + q_rope[b, h] . k_rope[j]) * sm_scale,  j < context_lens[b]
    out[b, h]      = softmax_j(score[b, h]) . c_kv          (softmax in fp32; out: [B, Hq, L] in q's dtype)

Token ``j`` of sequence ``b`` lives in cache block ``block_tables[b, j // block_size]`` at slot ``j % block_size``.
Block-table entries past a sequence's last block are never read; blocks may come in any order. A sequence with
``context_lens == 0`` gets a zero output.

The Triton path is split-K ("flash decoding"): each program takes a group of heads of one sequence and one of
``num_splits`` equal slices of that sequence's context (the slice length is computed on the device from
``context_lens``, so no host sync), keeps an online softmax in fp32 and writes a partial output plus its log-sum-exp;
a second kernel merges the splits. All heads share the latent, so a program serves several heads per cache read.
"""

from __future__ import annotations

import math

import torch

from ._config import HAS_TRITON, MLAConfig, cdiv, mla_config, next_pow2, tl, triton


def yarn_softmax_scale(qk_head_dim: int, factor: float = 1.0, mscale_all_dim: float = 0.0) -> float:
    """DeepSeek-V3 / Kimi K2 attention scale: ``qk_head_dim ** -0.5 * m ** 2``, ``m = 0.1 * mscale_all_dim * ln(factor) + 1``
    when ``factor > 1`` (YaRN), else ``m = 1``. K2-Thinking: ``yarn_softmax_scale(192, 64, 1)``."""
    m = 0.1 * mscale_all_dim * math.log(factor) + 1.0 if factor > 1 else 1.0
    return qk_head_dim**-0.5 * m * m


def _check(q_latent, q_rope, kv_cache, block_tables, context_lens) -> tuple[int, int, int, int]:
    if q_latent.dim() != 3 or q_rope.dim() != 3 or q_latent.shape[:2] != q_rope.shape[:2]:
        raise ValueError(f"mla_decode: q_latent {tuple(q_latent.shape)} / q_rope {tuple(q_rope.shape)} must be [B, Hq, *]")
    B, Hq, L = q_latent.shape
    R = q_rope.shape[2]
    if kv_cache.dim() != 3 or kv_cache.shape[2] != L + R:
        raise ValueError(f"mla_decode: kv_cache {tuple(kv_cache.shape)} must be [num_blocks, block_size, {L + R}]")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or tuple(context_lens.shape) != (B,):
        raise ValueError("mla_decode: block_tables must be [B, max_blocks] and context_lens [B]")
    return B, Hq, L, R


# --------------------------------------------------------------------------------------------------------------------
# torch twin


# Padding a group may carry whatever its share, in multiply-adds (padded tokens x heads x latent width): below this an
# extra group's fixed cost (a gather, two matmuls, a softmax) outweighs the work it saves.
PADDING_SLACK_MACS = 1 << 19


def mla_decode_plan(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, max_padding: float = 0.25,
    token_macs: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """How the torch twin batches a step's sequences: groups of similar context length, each padded to its longest
    with at most ``max_padding`` of its gathered tokens being padding, or padding worth at most
    ``PADDING_SLACK_MACS`` at ``token_macs`` multiply-adds per token when given (one long sequence does not make every short
    one read as far, and near-equal lengths stay one batch). Per group: ``rows [b]`` (its sequences), ``slots [b, N]`` (flat cache-row index of every token
    position; padding points at row 0, never used) and an additive ``mask [b, 1, N]`` (0 / -inf; None without
    padding). Sequences with an empty context are in no group. The same for every layer of a step: compute once."""
    lens = context_lens.tolist()
    order = sorted((b for b in range(len(lens)) if lens[b] > 0), key=lambda b: -lens[b])
    groups: list[list[int]] = []
    for b in order:
        g = groups[-1] if groups else None
        if g is not None:
            longest, real = lens[g[0]], sum(lens[x] for x in g) + lens[b]
            waste, padded = longest * (len(g) + 1) - real, longest * (len(g) + 1)
            if waste <= max_padding * padded or (token_macs and waste * token_macs <= PADDING_SLACK_MACS):
                g.append(b)
                continue
        groups.append([b])
    dev, width = block_tables.device, block_tables.shape[1]
    tables, lens64 = block_tables.to(torch.int64), context_lens.to(torch.int64)
    plan = []
    for g in groups:
        n = lens[g[0]]
        g = sorted(g)  # in batch order: a group of every sequence is the batch itself
        rows = torch.tensor(g, dtype=torch.int64, device=dev)
        g_lens = lens64[rows]
        pos = torch.arange(n, device=dev)
        live = pos[None, :] < g_lens[:, None]  # [b, N]
        blocks = tables[rows].gather(1, (pos // block_size).clamp(max=width - 1).expand(len(g), -1))
        slots = torch.where(live, blocks * block_size + pos % block_size, torch.zeros_like(blocks))
        mask = None
        if not bool(live.all()):
            mask = torch.zeros(len(g), 1, n, device=dev).masked_fill(~live[:, None, :], float("-inf"))
        plan.append((rows, slots, mask))
    return plan


def mla_decode_torch(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sm_scale: float,
    plan_cache: dict | None = None,
) -> torch.Tensor:
    """Per group of similar-length sequences (:func:`mla_decode_plan`): gather their latents, scores as one batched
    matmul over ``[c_kv | k_rope]``, softmax in fp32, output as a second one. ``plan_cache``: a dict that lives for
    one step (the attention metadata's), so the plan is made once for all layers."""
    B, Hq, L, R = _check(q_latent, q_rope, kv_cache, block_tables, context_lens)
    out = torch.zeros((B, Hq, L), dtype=q_latent.dtype, device=q_latent.device)
    key = ("mla_decode_plan", kv_cache.shape[1])
    plan = plan_cache.get(key) if plan_cache is not None else None
    if plan is None:
        plan = mla_decode_plan(block_tables, context_lens, kv_cache.shape[1], token_macs=Hq * (L + R))
        if plan_cache is not None:
            plan_cache[key] = plan
    flat = kv_cache.view(-1, L + R)
    q = torch.cat([q_latent, q_rope], dim=-1).float()  # [B, Hq, L + R]
    for rows, slots, mask in plan:
        tokens = flat[slots].float()  # [b, N, L + R]; .float() is free for an fp32 cache
        qg = q if len(rows) == B else q[rows]  # rows are in batch order (mla_decode_plan)
        scores = torch.bmm(qg, tokens.transpose(1, 2))  # [b, Hq, N]
        scores = scores.mul_(sm_scale) if mask is None else scores.mul_(sm_scale).add_(mask)
        probs = torch.softmax(scores, dim=-1)
        out[rows] = torch.bmm(probs, tokens[..., :L]).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:

    @triton.jit
    def _mla_decode_split_kernel(
        ql_ptr, qr_ptr, cache_ptr, bt_ptr, lens_ptr, part_ptr, lse_ptr,
        qk_scale,  # sm_scale * log2(e): the softmax runs in base 2
        Hq, L, R, page_size,
        stride_qlb, stride_qlh, stride_qll,
        stride_qrb, stride_qrh, stride_qrr,
        stride_cb, stride_cs, stride_cd,
        stride_btb, stride_btn,
        stride_pb, stride_ph, stride_ps, stride_pl,
        stride_lb, stride_lh, stride_ls,
        NUM_SPLITS: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        hb = tl.program_id(1)
        split = tl.program_id(2)

        ctx = tl.load(lens_ptr + b)
        # Equal slices of this sequence's own context, rounded up to whole token tiles.
        per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, ctx)

        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = heads < Hq
        offs_l = tl.arange(0, BLOCK_L)
        offs_r = tl.arange(0, BLOCK_R)
        l_ok = offs_l < L
        r_ok = offs_r < R
        q_l = tl.load(ql_ptr + b * stride_qlb + heads[:, None] * stride_qlh + offs_l[None, :] * stride_qll,
                      mask=h_ok[:, None] & l_ok[None, :], other=0.0).to(DOT_DTYPE)
        q_r = tl.load(qr_ptr + b * stride_qrb + heads[:, None] * stride_qrh + offs_r[None, :] * stride_qrr,
                      mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            t_ok = pos < end
            page = tl.load(bt_ptr + b * stride_btb + (pos // page_size) * stride_btn, mask=t_ok, other=0)
            row = page.to(tl.int64) * stride_cb + (pos % page_size) * stride_cs
            c_kv = tl.load(cache_ptr + row[:, None] + offs_l[None, :] * stride_cd,
                           mask=t_ok[:, None] & l_ok[None, :], other=0.0).to(DOT_DTYPE)
            k_pe = tl.load(cache_ptr + row[:, None] + (L + offs_r[None, :]) * stride_cd,
                           mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)
            s = tl.dot(q_l, tl.trans(c_kv), input_precision=PRECISION)
            s = tl.dot(q_r, tl.trans(k_pe), s, input_precision=PRECISION)
            s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(DOT_DTYPE), c_kv, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new

        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_l[None, :] * stride_pl,
                 out, mask=h_ok[:, None] & l_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=h_ok)

    @triton.jit
    def _mla_decode_merge_kernel(
        part_ptr, lse_ptr, out_ptr,
        L, num_splits,
        stride_pb, stride_ph, stride_ps, stride_pl,
        stride_lb, stride_lh, stride_ls,
        stride_ob, stride_oh, stride_ol,
        BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_l = tl.arange(0, BLOCK_L)
        s_ok = offs_s < num_splits
        l_ok = offs_l < L
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(tl.exp2(lse - m), axis=0)  # empty splits: exp2(-inf) = 0
        acc = tl.zeros([BLOCK_L], dtype=tl.float32)
        for s in range(0, num_splits):  # one split row at a time: no [splits, L] tile in registers
            w = tl.exp2(tl.load(lse_ptr + b * stride_lb + h * stride_lh + s * stride_ls) - m)
            part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s * stride_ps + offs_l * stride_pl,
                           mask=l_ok, other=0.0)
            acc += tl.where(w > 0, part, 0.0) * w
        out = acc / tl.where(denom > 0, denom, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_l * stride_ol,
                 out.to(out_ptr.dtype.element_ty), mask=l_ok)


def _mla_decode_triton_impl(q_latent, q_rope, kv_cache, block_tables, context_lens, sm_scale,
                            config: MLAConfig) -> torch.Tensor:
    """:func:`mla_decode_triton` with explicit tiles and split count (tests force several splits)."""
    if not HAS_TRITON:
        raise RuntimeError("mla_decode_triton: triton is not available")
    B, Hq, L, R = _check(q_latent, q_rope, kv_cache, block_tables, context_lens)
    out = torch.empty((B, Hq, L), dtype=q_latent.dtype, device=q_latent.device)
    if B == 0 or Hq == 0:
        return out
    S = config.num_splits
    partial = torch.empty((B, Hq, S, L), dtype=torch.float32, device=q_latent.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q_latent.device)
    # bf16 off a GPU (interpreter): widen dot operands, the interpreter multiplies bf16 as raw integers.
    if kv_cache.dtype == torch.float32 or (kv_cache.dtype == torch.bfloat16 and not kv_cache.is_cuda):
        dot_dtype, precision = tl.float32, "ieee"
    else:
        dot_dtype, precision = (tl.bfloat16 if kv_cache.dtype == torch.bfloat16 else tl.float16), "tf32"
    block_l, block_r = next_pow2(L), max(16, next_pow2(R))
    _mla_decode_split_kernel[(B, cdiv(Hq, config.block_h), S)](
        q_latent, q_rope, kv_cache, block_tables, context_lens, partial, lse,
        float(sm_scale) * math.log2(math.e),
        Hq, L, R, kv_cache.shape[1],
        *q_latent.stride(), *q_rope.stride(), *kv_cache.stride(), *block_tables.stride(),
        *partial.stride(), *lse.stride(),
        NUM_SPLITS=S, BLOCK_H=config.block_h, BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_N=config.block_n,
        DOT_DTYPE=dot_dtype, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
    )
    _mla_decode_merge_kernel[(B, Hq)](
        partial, lse, out, L, S,
        *partial.stride(), *lse.stride(), *out.stride(),
        BLOCK_S=max(2, next_pow2(S)), BLOCK_L=block_l,
        num_warps=4, enable_fp_fusion=True,
    )
    return out


def mla_decode_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Triton split-K MLA decode; tiles and split count from :func:`k2ray.kernels._config.mla_config`."""
    B, Hq, L, R = _check(q_latent, q_rope, kv_cache, block_tables, context_lens)
    config = mla_config(B, Hq, block_tables.shape[1] * kv_cache.shape[1], q_latent.device)
    return _mla_decode_triton_impl(q_latent, q_rope, kv_cache, block_tables, context_lens, sm_scale, config)
