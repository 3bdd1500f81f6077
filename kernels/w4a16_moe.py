"""W4A16 fused MoE: routed SwiGLU experts with compressed-tensors pack-quantized INT4 weights.

``out[t] = sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with ``e = topk_ids[t, k]`` (``-1``: skip).

Weights, per local expert ``e`` (each a compressed-tensors linear ``[out, in]``, see ``k2ray.checkpoint.int4``):
``w13_packed [E, 2I, H/8]`` / ``w13_scale [E, 2I, H/32]`` (rows ``0..I-1`` gate_proj, ``I..2I-1`` up_proj) and
``w2_packed [E, H, I/8]`` / ``w2_scale [E, H, I/32]`` (down_proj).

The Triton path runs two grouped GEMMs over the :func:`moe_align` layout, dequantizing the INT4 nibbles in registers
(so weights cross HBM at 4 bits + one scale per 32):

1. gate/up: for a block of routes of one expert, ``gate`` and ``up`` tiles are accumulated side by side in fp32 and
   ``silu(gate) * up`` is written once per route (in the activation dtype);
2. down: the intermediate is multiplied by ``down_proj``, scaled by the route's top-k weight in fp32 and written per
   route; the ``K`` routes of a token are then summed in fp32 (no atomics, so the result is deterministic).
"""

from __future__ import annotations

import torch

from k2ray.checkpoint.int4 import GROUP_SIZE, PACK_FACTOR, dequantize_int4

from ._config import HAS_TRITON, MoEConfig, cdiv, moe_config, tl, triton
from .moe_align import moe_align_triton


def _check(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_ids, topk_weights) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"fused_moe_int4: x must be [T, H], got {tuple(x.shape)}")
    T, H = x.shape
    if w13_packed.dim() != 3 or w2_packed.dim() != 3:
        raise ValueError("fused_moe_int4: packed weights must be [E, out, in/8]")
    E, two_i, h8 = w13_packed.shape
    I = two_i // 2
    if two_i % 2 or h8 * PACK_FACTOR != H or H % GROUP_SIZE or I % GROUP_SIZE:
        raise ValueError(f"fused_moe_int4: w13_packed {tuple(w13_packed.shape)} does not fit hidden size {H}")
    if tuple(w13_scale.shape) != (E, two_i, H // GROUP_SIZE):
        raise ValueError(f"fused_moe_int4: w13_scale {tuple(w13_scale.shape)} != {(E, two_i, H // GROUP_SIZE)}")
    if tuple(w2_packed.shape) != (E, H, I // PACK_FACTOR):
        raise ValueError(f"fused_moe_int4: w2_packed {tuple(w2_packed.shape)} != {(E, H, I // PACK_FACTOR)}")
    if tuple(w2_scale.shape) != (E, H, I // GROUP_SIZE):
        raise ValueError(f"fused_moe_int4: w2_scale {tuple(w2_scale.shape)} != {(E, H, I // GROUP_SIZE)}")
    if w13_packed.dtype != torch.int32 or w2_packed.dtype != torch.int32:
        raise ValueError("fused_moe_int4: packed weights must be int32")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError("fused_moe_int4: topk_ids and topk_weights must both be [T, K]")
    return E, H, I


# --------------------------------------------------------------------------------------------------------------------
# torch twin


def fused_moe_int4_torch(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference: per expert, dequantize to fp32 and run the SwiGLU expert on its routes; everything in fp32."""
    E, H, I = _check(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_ids, topk_weights)
    T, K = topk_ids.shape
    out = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    if T == 0 or K == 0:
        return out.to(x.dtype)
    flat = topk_ids.reshape(-1).to(torch.int64)
    weights = topk_weights.reshape(-1).to(torch.float32)
    tokens = torch.arange(T * K, device=x.device) // K
    valid = (flat >= 0) & (flat < E)
    for e in torch.unique(flat[valid]).tolist():
        routes = torch.nonzero(flat == e).squeeze(1)
        t = tokens[routes]
        xs = x[t].to(torch.float32)
        w13 = dequantize_int4(w13_packed[e], w13_scale[e], dtype=torch.float32)
        h = xs @ w13.T
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        w2 = dequantize_int4(w2_packed[e], w2_scale[e], dtype=torch.float32)
        y = (act @ w2.T) * weights[routes].unsqueeze(1)
        out.index_add_(0, t, y)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:

    @triton.jit
    def _dequant_tile(w_ptr, s_ptr, rows, k0, n_in, n_ok, stride_wn, stride_wk, stride_sn, stride_sk,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
        """Transposed weight tile ``W[rows, k0:k0+BLOCK_K].T`` -> fp32 ``[BLOCK_K, BLOCK_N]``.

        Each packed word is loaded once and fanned out into its 8 nibbles in registers (word ``w``, nibble ``j`` is
        column ``8 w + j``); one scale per 32 columns is broadcast the same way.
        """
        words_k = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w_mask = (words_k[:, None] < n_in // 8) & n_ok[None, :]
        words = tl.load(w_ptr + rows[None, :] * stride_wn + words_k[:, None] * stride_wk, mask=w_mask, other=0)
        shifts = tl.arange(0, 8) * 4
        nib = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        q = tl.reshape(nib - 8, [BLOCK_K // GROUP, GROUP, BLOCK_N]).to(tl.float32)
        groups_k = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        s_mask = (groups_k[:, None] < n_in // GROUP) & n_ok[None, :]
        scale = tl.load(s_ptr + rows[None, :] * stride_sn + groups_k[:, None] * stride_sk, mask=s_mask, other=0.0)
        return tl.reshape(q * scale.to(tl.float32)[:, None, :], [BLOCK_K, BLOCK_N])

    @triton.jit
    def _w4a16_gate_up_kernel(
        x_ptr, w_ptr, s_ptr, act_ptr,
        sorted_ptr, expert_ids_ptr, ntpp_ptr,
        num_routes, top_k, H, I,
        stride_xt, stride_xh,
        stride_we, stride_wn, stride_wk,
        stride_se, stride_sn, stride_sk,
        stride_ar, stride_ai,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
            return
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        routes = tl.load(sorted_ptr + offs_m)
        row_ok = routes < num_routes
        tokens = (routes // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I

        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            a = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_gate = _dequant_tile(w_base, s_base, offs_n, k0, H, n_ok,
                                   stride_wn, stride_wk, stride_sn, stride_sk, BLOCK_K, BLOCK_N, GROUP)
            w_up = _dequant_tile(w_base, s_base, offs_n + I, k0, H, n_ok,
                                 stride_wn, stride_wk, stride_sn, stride_sk, BLOCK_K, BLOCK_N, GROUP)
            a = a.to(DOT_DTYPE)
            acc_gate = tl.dot(a, w_gate.to(DOT_DTYPE), acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, w_up.to(DOT_DTYPE), acc_up, input_precision=PRECISION)

        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        tl.store(act_ptr + routes[:, None].to(tl.int64) * stride_ar + offs_n[None, :] * stride_ai,
                 act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _w4a16_down_kernel(
        act_ptr, w_ptr, s_ptr, topk_w_ptr, out_ptr,
        sorted_ptr, expert_ids_ptr, ntpp_ptr,
        num_routes, H, I,
        stride_ar, stride_ai,
        stride_we, stride_wn, stride_wk,
        stride_se, stride_sn, stride_sk,
        stride_or, stride_oh,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
            return
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        routes = tl.load(sorted_ptr + offs_m)
        row_ok = routes < num_routes
        routes64 = routes.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H

        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < I
            a = tl.load(act_ptr + routes64[:, None] * stride_ar + offs_k[None, :] * stride_ai,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = _dequant_tile(w_base, s_base, offs_n, k0, I, n_ok,
                              stride_wn, stride_wk, stride_sn, stride_sk, BLOCK_K, BLOCK_N, GROUP)
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)

        gate_w = tl.load(topk_w_ptr + routes64, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * gate_w[:, None]
        tl.store(out_ptr + routes64[:, None] * stride_or + offs_n[None, :] * stride_oh,
                 acc, mask=row_ok[:, None] & n_ok[None, :])


def _dot_dtype(x: torch.Tensor):
    """Operand type of ``tl.dot``: the activation dtype on a GPU. Off a GPU (only ``TRITON_INTERPRET=1`` runs there)
    bf16 operands are widened to fp32, because the interpreter multiplies bf16 dot operands as raw integers."""
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[x.dtype]


def _fused_moe_int4_triton_impl(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_ids, topk_weights,
                                config: MoEConfig) -> torch.Tensor:
    """:func:`fused_moe_int4_triton` with explicit tile sizes (tests use it to force multi-tile loops)."""
    if not HAS_TRITON:
        raise RuntimeError("fused_moe_int4_triton: triton is not available")
    E, H, I = _check(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_ids, topk_weights)
    T, K = topk_ids.shape
    num_routes = T * K
    if num_routes == 0:
        return torch.zeros((T, H), dtype=x.dtype, device=x.device)
    if config.block_k % GROUP_SIZE:
        raise ValueError(f"fused_moe_int4: block_k must be a multiple of the scale group ({GROUP_SIZE})")
    sorted_ids, expert_ids, ntpp = moe_align_triton(topk_ids, E, config.block_m)
    num_blocks = expert_ids.numel()
    # fp32 operands: exact IEEE dots (not TF32); 16-bit operands: tensor cores with fp32 accumulation.
    dot_dtype = _dot_dtype(x)
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"

    act = torch.empty((num_routes, I), dtype=x.dtype, device=x.device)
    _w4a16_gate_up_kernel[(num_blocks, cdiv(I, config.block_n))](
        x, w13_packed, w13_scale, act,
        sorted_ids, expert_ids, ntpp,
        num_routes, K, H, I,
        x.stride(0), x.stride(1),
        w13_packed.stride(0), w13_packed.stride(1), w13_packed.stride(2),
        w13_scale.stride(0), w13_scale.stride(1), w13_scale.stride(2),
        act.stride(0), act.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP=GROUP_SIZE, PRECISION=precision, DOT_DTYPE=dot_dtype,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
    )

    weights = topk_weights.to(torch.float32).contiguous()
    per_route = torch.zeros((num_routes, H), dtype=torch.float32, device=x.device)  # skipped routes stay zero
    _w4a16_down_kernel[(num_blocks, cdiv(H, config.block_n))](
        act, w2_packed, w2_scale, weights, per_route,
        sorted_ids, expert_ids, ntpp,
        num_routes, H, I,
        act.stride(0), act.stride(1),
        w2_packed.stride(0), w2_packed.stride(1), w2_packed.stride(2),
        w2_scale.stride(0), w2_scale.stride(1), w2_scale.stride(2),
        per_route.stride(0), per_route.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP=GROUP_SIZE, PRECISION=precision, DOT_DTYPE=dot_dtype,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
    )
    return per_route.view(T, K, H).sum(1).to(x.dtype)


def fused_moe_int4_triton(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Triton W4A16 fused MoE; tiles from :func:`k2ray.kernels._config.moe_config`."""
    E, H, I = _check(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_ids, topk_weights)
    config = moe_config(topk_ids.numel(), E, H, I)
    return _fused_moe_int4_triton_impl(x, w13_packed, w13_scale, w2_packed, w2_scale, topk_ids, topk_weights, config)
