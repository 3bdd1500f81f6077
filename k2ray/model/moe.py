"""The MoE layer: noaux_tc sigmoid gate (fp32), routed SwiGLU experts, the shared expert.

Where a layer's routed experts run is a :class:`RoutedBackend` handed to the layer when it is built: the experts in
this process (:class:`RoutedExperts`), or experts held by other processes (:class:`RemoteExperts`, which the
expert-parallel worker connects to its all-to-all dispatch once its process group exists).
"""

from __future__ import annotations

from typing import Callable, Protocol

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


# Up to this many (token, expert) rows the grouped GEMM beats the per-expert loop on CPU (decode-sized batches: its
# fixed cost per expert is gone); past it, PyTorch's CPU grouped GEMM is slower than one matmul per expert.
GROUPED_MM_MAX_ROWS = 512


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _use_grouped_mm(x: torch.Tensor, rows: int) -> bool:
    return _HAS_GROUPED_MM and x.device.type == "cpu" and x.dtype == torch.float32 and rows <= GROUPED_MM_MAX_ROWS


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
    token_of = order // k
    flat_w = topk_weights.reshape(-1)[order].float().unsqueeze(1)
    # One row per (token, k) pair; summing over k in a fixed order keeps a token's result independent of the batch.
    pairs = torch.zeros(t * k, x.shape[1], dtype=torch.float32, device=x.device)
    if _use_grouped_mm(x, n_valid):
        # All experts in two grouped GEMMs (bit-identical to the loop below on CPU, without its per-expert ops).
        offs = torch.cumsum(torch.bincount(flat_ids[order], minlength=w13.shape[0]), 0).to(torch.int32)
        gate, up = torch._grouped_mm(x[token_of], w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        pairs[order] = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs).float() * flat_w
        return pairs.view(t, k, -1).sum(1).to(x.dtype)
    counts = torch.bincount(flat_ids[order], minlength=w13.shape[0]).tolist()
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        gate, up = F.linear(x[token_of[sl]], w13[e]).chunk(2, dim=-1)
        pairs[order[sl]] = F.linear(F.silu(gate) * up, w2[e]).float() * flat_w[sl]
        start += c
    return pairs.view(t, k, -1).sum(1).to(x.dtype)


class PendingRouted(Protocol):
    """A routed-expert computation under way."""

    def wait(self) -> torch.Tensor:
        """The result ``[T, H]`` (in the input's dtype), once it is there."""
        ...


class RoutedBackend(Protocol):
    """Where one MoE layer's routed experts run."""

    def start(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingRouted:
        """Start ``sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x_t)`` for every token ``t``. The MoE layer
        runs the shared expert before it waits, so a backend that sends the tokens away overlaps the two."""
        ...


# Builds the routed experts of MoE layer L (called once per MoE layer while the model is built).
RoutedFactory = Callable[[int], RoutedBackend]


class Finished:
    """A :class:`PendingRouted` whose result is already there."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def wait(self) -> torch.Tensor:
        return self.out


class RoutedExperts(nn.Module):
    """The routed experts of one layer held in this process (all of them, or a shard's subset): a
    :class:`RoutedBackend` that computes synchronously in :meth:`start`.

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

    def start(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingRouted:
        return Finished(self(x, topk_ids, topk_weights))

    @property
    def weight_names(self) -> tuple[str, ...]:
        return ("w13_packed", "w13_scale", "w2_packed", "w2_scale") if self.int4 else ("w13", "w2")

    @property
    def num_local(self) -> int:
        return getattr(self, self.weight_names[0]).shape[0]

    @torch.no_grad()
    def resize(self, num_local: int) -> None:
        """Keep the first ``num_local`` slots' experts; slots added are uninitialised, slots cut are freed."""
        for name in self.weight_names:
            w = getattr(self, name)
            if num_local > w.shape[0]:
                w = torch.cat([w, w.new_empty((num_local - w.shape[0],) + tuple(w.shape[1:]))])
            elif num_local < w.shape[0]:
                w = w[:num_local].clone()
            setattr(self, name, w)

    @torch.no_grad()
    def put(self, slots: list[int], src: "RoutedExperts") -> None:
        """Copy ``src``'s experts, in order, into ``slots`` (a live rebalance taking up experts new to this shard)."""
        for name in self.weight_names:
            dst, w = getattr(self, name), getattr(src, name)
            for i, slot in enumerate(slots):
                dst[slot].copy_(w[i])


def local_experts(args: ModelArgs, dtype: torch.dtype = torch.float32, int4: bool = False) -> RoutedFactory:
    """Every MoE layer holds all of its routed experts in this process."""
    return lambda layer: RoutedExperts(args, dtype=dtype, int4=int4)


class RemoteExperts:
    """A :class:`RoutedBackend` for routed experts held by other processes, reached through a transport that only
    exists once the process group does: the model is built with it, the worker connects the transport (its
    :class:`~k2ray.parallel.dispatch.DispatchClient`) after joining the group. One instance serves every layer."""

    def __init__(self):
        self.transport: RoutedBackend | None = None

    def connect(self, transport: RoutedBackend) -> None:
        self.transport = transport

    def start(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingRouted:
        if self.transport is None:
            raise RuntimeError("MoE layer has no routed experts attached")
        return self.transport.start(x, topk_ids, topk_weights)


class MoE(nn.Module):
    """``routed(x) + shared_experts(x)``, the shared expert running while the routed computation is under way.

    ``experts`` is the layer's :class:`RoutedBackend`. A :class:`RoutedExperts` module registers as a submodule (its
    weights are the checkpoint's ``mlp.experts.*``); any other backend holds no weights here and is a plain
    attribute. ``None`` builds a layer whose forward fails (weights only, e.g. to load the dense ones).
    """

    def __init__(self, args: ModelArgs, experts: RoutedBackend | None):
        super().__init__()
        self.gate = Gate(args)
        self.experts = experts
        self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = self.gate(x)
        if self.experts is None:
            raise RuntimeError("MoE layer has no routed experts attached")
        pending = self.experts.start(x, topk_ids, topk_weights)
        shared = self.shared_experts(x)
        return pending.wait() + shared
