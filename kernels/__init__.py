"""Triton kernels with torch reference twins, imported as ``k2ray.kernels``.

Every kernel has a Triton implementation (``*_triton``) and a torch twin (``*_torch``) with the same signature; the
un-suffixed function dispatches: Triton when all tensor arguments are on a CUDA device (and Triton imports), the torch
twin otherwise. ``K2RAY_KERNELS=triton|torch|auto`` (default ``auto``) forces either, read at every call.
"""

from __future__ import annotations

import torch

from ._config import ENV_VAR, HAS_TRITON, backend_choice, use_triton
from .mla_decode import mla_decode_plan, mla_decode_torch, mla_decode_triton, yarn_softmax_scale
from .moe_align import moe_align_torch, moe_align_triton
from .w4a16_moe import fused_moe_int4_torch, fused_moe_int4_triton

__all__ = [
    "ENV_VAR", "HAS_TRITON", "backend_choice",
    "moe_align", "moe_align_torch", "moe_align_triton",
    "fused_moe_int4", "fused_moe_int4_torch", "fused_moe_int4_triton",
    "mla_decode", "mla_decode_plan", "mla_decode_torch", "mla_decode_triton",
    "yarn_softmax_scale",
]


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort routes by expert into ``block_size``-aligned groups: ``(sorted_token_ids, expert_ids,
    num_tokens_post_padded)``; ``-1`` ids are skipped. See :mod:`k2ray.kernels.moe_align`."""
    fn = moe_align_triton if use_triton(topk_ids) else moe_align_torch
    return fn(topk_ids, num_experts, block_size)


def fused_moe_int4(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))``, ``e = topk_ids[t, k]``
    (``-1``: skip), INT4 pack-quantized expert weights, fp32 accumulation, output in ``x.dtype``.
    See :mod:`k2ray.kernels.w4a16_moe`."""
    args = (x, w13_packed, w13_scale, w2_packed, w2_scale, topk_ids, topk_weights)
    fn = fused_moe_int4_triton if use_triton(*args) else fused_moe_int4_torch
    return fn(*args)


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sm_scale: float,
    plan_cache: dict | None = None,
) -> torch.Tensor:
    """Absorbed-MLA decode attention over the paged latent cache -> ``[B, Hq, L]`` in ``q_latent.dtype``.
    ``plan_cache``: a dict living for one step, where the torch twin keeps its batching plan across layers.
    See :mod:`k2ray.kernels.mla_decode`."""
    tensors = (q_latent, q_rope, kv_cache, block_tables, context_lens)
    if use_triton(*tensors):
        return mla_decode_triton(*tensors, sm_scale)
    return mla_decode_torch(*tensors, sm_scale, plan_cache)
