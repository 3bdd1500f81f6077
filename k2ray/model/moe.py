"""The MoE layer: noaux_tc sigmoid gate (fp32), routed SwiGLU experts, the shared expert."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from k2ray.config import ModelArgs
from k2ray.model.layers import MLP


class Gate(nn.Module):
    """Top-k routing. Returns ``(topk_ids int64 [T, k], topk_weights fp32 [T, k])``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.n_experts = args.num_experts_per_tok, args.n_routed_experts
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob, self.scaling = args.norm_topk_prob, args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.n_experts // self.n_group, dim=1), float("-inf"))
        topk_ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, topk_ids)  # from the unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.scaling


def routed_experts_forward(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """``sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` over local experts ``e = topk_ids[t,k]``.

    ``w13 [E, 2I, H]`` stacks gate_proj over up_proj; ``w2 [E, H, I]`` is down_proj. Ids of -1 (expert held
    elsewhere) contribute nothing. Tokens are grouped by expert so each expert runs one matmul.
    """
    t, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    valid = flat_ids >= 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        return torch.zeros_like(x)
    order = torch.argsort(torch.where(valid, flat_ids, w13.shape[0]), stable=True)[:n_valid]
    counts = torch.bincount(flat_ids[order], minlength=w13.shape[0]).tolist()
    token_of = order // k
    flat_w = topk_weights.reshape(-1)[order].float().unsqueeze(1)
    # One row per (token, k) pair; summing over k in a fixed order keeps a token's result independent of the batch.
    pairs = torch.zeros(t * k, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        gate, up = F.linear(x[token_of[sl]], w13[e]).chunk(2, dim=-1)
        pairs[order[sl]] = F.linear(F.silu(gate) * up, w2[e]).float() * flat_w[sl]
        start += c
    return pairs.view(t, k, -1).sum(1).to(x.dtype)


class RoutedExperts(nn.Module):
    """The routed experts of one layer held in this process (all of them, or a shard's subset).

    Either dequantized (``w13``/``w2`` in the compute dtype: the CPU path) or kept INT4 pack-quantized for the
    W4A16 grouped-GEMM kernel (``int4=True``: a quarter of the bytes, what real K2 needs on GPUs).
    """

    def __init__(
        self, args: ModelArgs, num_local: int | None = None, dtype: torch.dtype = torch.float32, int4: bool = False
    ):
        super().__init__()
        e = args.n_routed_experts if num_local is None else num_local
        h, i = args.hidden_size, args.moe_intermediate_size
        self.int4 = int4
        if int4:
            g = args.quantization.group_size if args.quantization else 32
            self.register_buffer("w13_packed", torch.empty(e, 2 * i, h // 8, dtype=torch.int32))
            self.register_buffer("w13_scale", torch.empty(e, 2 * i, h // g, dtype=dtype))
            self.register_buffer("w2_packed", torch.empty(e, h, i // 8, dtype=torch.int32))
            self.register_buffer("w2_scale", torch.empty(e, h, i // g, dtype=dtype))
        else:
            self.register_buffer("w13", torch.empty(e, 2 * i, h, dtype=dtype))
            self.register_buffer("w2", torch.empty(e, h, i, dtype=dtype))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.int4:
            from k2ray.kernels import fused_moe_int4

            return fused_moe_int4(
                x, self.w13_packed, self.w13_scale, self.w2_packed, self.w2_scale, topk_ids, topk_weights
            )
        return routed_experts_forward(x, topk_ids, topk_weights, self.w13, self.w2)


RoutedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MoE(nn.Module):
    """``routed(x) + shared_experts(x)``.

    ``routed`` is the local :class:`RoutedExperts` by default; the expert-parallel executor swaps in a callable with
    the same signature that sends tokens to the expert shards (all-to-all) and brings the results back. If it also
    has ``overlap = True`` and ``start(x, ids, weights) -> pending`` (``pending.wait() -> [T, H]``), the shared expert
    runs between the two.
    """

    def __init__(
        self, args: ModelArgs, with_experts: bool = True, dtype: torch.dtype = torch.float32, experts_int4: bool = False
    ):
        super().__init__()
        self.gate = Gate(args)
        self.experts = RoutedExperts(args, dtype=dtype, int4=experts_int4) if with_experts else None
        self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
        self._routed: RoutedFn | None = None

    def set_routed(self, fn: RoutedFn | None) -> None:
        """Replace the routed-expert computation (not registered as a submodule: it holds no weights here)."""
        object.__setattr__(self, "_routed", fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = self.gate(x)
        routed = self._routed or self.experts
        if routed is None:
            raise RuntimeError("MoE layer has no routed experts attached")
        if getattr(routed, "overlap", False):  # remote experts: the shared expert runs while the tokens are away
            pending = routed.start(x, topk_ids, topk_weights)
            shared = self.shared_experts(x)
            return pending.wait() + shared
        return routed(x, topk_ids, topk_weights) + self.shared_experts(x)
