"""``moe_align``: lay (token, expert) routes out by expert in block-aligned groups (the fused-MoE layout).

Given ``topk_ids [T, K]`` the routes are numbered ``r = t * K + k``. The output lists the route numbers sorted by
expert (stable: ascending ``r`` inside an expert), every expert's group padded up to a multiple of ``block_size`` with
the sentinel ``T * K``, so that each block of ``block_size`` consecutive entries belongs to one expert:

- ``sorted_token_ids`` int32 ``[max_padded]`` with ``max_padded = n + min(n, E) * (block_size - 1)``, ``n = T * K``;
  entries at and beyond ``num_tokens_post_padded`` are the sentinel too.
- ``expert_ids`` int32 ``[max_padded // block_size]``: the expert of each block, ``-1`` past the end.
- ``num_tokens_post_padded`` int32 ``[1]``: the used length (a device tensor, so no host sync is needed).

Routes whose id is outside ``[0, num_experts)`` (``-1``: the expert lives on another shard) are skipped.
Experts with no route take no space.
"""

from __future__ import annotations

import torch

from ._config import HAS_TRITON, tl, triton


def _buffer_sizes(numel: int, num_experts: int, block_size: int) -> tuple[int, int]:
    max_padded = numel + min(numel, num_experts) * (block_size - 1)
    return max_padded, max_padded // block_size


def _check(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align: topk_ids must be [T, K], got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_align: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if num_experts < 1 or block_size < 1:
        raise ValueError("moe_align: num_experts and block_size must be positive")


def moe_align_torch(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`moe_align_triton` (same outputs, bit for bit)."""
    _check(topk_ids, num_experts, block_size)
    dev = topk_ids.device
    numel = topk_ids.numel()
    max_padded, max_blocks = _buffer_sizes(numel, num_experts, block_size)
    flat = topk_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    experts = torch.where(valid, flat, torch.full_like(flat, num_experts))  # invalid routes sort last
    counts = torch.bincount(experts, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    total = int(ends[-1]) if num_experts else 0

    order = torch.sort(experts, stable=True).indices  # routes by expert, ascending route number inside an expert
    n_valid = int(valid.sum())
    order = order[:n_valid]
    e_sorted = experts[order]
    # rank of a route inside its expert = its position among the sorted valid routes minus the expert's first position
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_valid, device=dev) - first[e_sorted]
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=dev)
    sorted_ids[starts[e_sorted] + rank] = order.to(torch.int32)

    expert_ids = torch.full((max_blocks,), -1, dtype=torch.int32, device=dev)
    block_start = torch.arange(max_blocks, device=dev) * block_size
    used = block_start < total
    # expert of a block = number of experts whose (padded) group ends at or before the block's first slot
    owner = torch.searchsorted(ends, block_start[used], right=True)
    expert_ids[used] = owner.to(torch.int32)
    ntpp = torch.tensor([total], dtype=torch.int32, device=dev)
    return sorted_ids, expert_ids, ntpp


if HAS_TRITON:

    @triton.jit
    def _moe_align_kernel(
        ids_ptr,
        sorted_ptr,
        expert_ids_ptr,
        ntpp_ptr,
        numel,
        num_experts,
        max_blocks,
        BLOCK_SIZE: tl.constexpr,
        E_PAD: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        # One program: deterministic (a stable order inside each expert) and cheap at decode sizes.
        e_range = tl.arange(0, E_PAD)
        e_live = e_range < num_experts

        # Pass 1: routes per expert.
        counts = tl.zeros([E_PAD], dtype=tl.int32)
        for start in range(0, numel, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
            hit = ((ids[:, None] == e_range[None, :]) & e_live[None, :]).to(tl.int32)
            counts += tl.sum(hit, axis=0)

        padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        total = tl.sum(padded, axis=0)
        tl.store(ntpp_ptr, total)

        # Block owners: the expert of block b is the number of groups ending at or before its first slot.
        for b0 in range(0, max_blocks, CHUNK):
            blk = b0 + tl.arange(0, CHUNK)
            first_slot = blk * BLOCK_SIZE
            owner = tl.sum(((ends[None, :] <= first_slot[:, None]) & e_live[None, :]).to(tl.int32), axis=1)
            owner = tl.where(first_slot < total, owner, -1)
            tl.store(expert_ids_ptr + blk, owner, mask=blk < max_blocks)

        # Pass 2: scatter route numbers; rank inside a chunk from an exclusive prefix count per expert.
        cursor = starts
        for start in range(0, numel, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
            hit = ((ids[:, None] == e_range[None, :]) & e_live[None, :]).to(tl.int32)
            before = tl.cumsum(hit, axis=0) - hit
            rank = tl.sum(before * hit, axis=1)
            base = tl.sum(cursor[None, :] * hit, axis=1)
            routed = tl.sum(hit, axis=1) > 0
            tl.store(sorted_ptr + base + rank, offs, mask=routed)
            cursor += tl.sum(hit, axis=0)


def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``moe_align`` (one program; see the module docstring for the layout)."""
    if not HAS_TRITON:
        raise RuntimeError("moe_align_triton: triton is not available")
    _check(topk_ids, num_experts, block_size)
    dev = topk_ids.device
    numel = topk_ids.numel()
    max_padded, max_blocks = _buffer_sizes(numel, num_experts, block_size)
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=dev)
    expert_ids = torch.empty((max_blocks,), dtype=torch.int32, device=dev)
    ntpp = torch.zeros((1,), dtype=torch.int32, device=dev)
    if numel == 0:
        return sorted_ids, expert_ids, ntpp
    ids = topk_ids.contiguous()
    e_pad = max(16, 1 << (num_experts - 1).bit_length())
    chunk = max(16, min(64, 16384 // e_pad))
    _moe_align_kernel[(1,)](
        ids, sorted_ids, expert_ids, ntpp, numel, num_experts, max_blocks,
        BLOCK_SIZE=block_size, E_PAD=e_pad, CHUNK=chunk, num_warps=8, enable_fp_fusion=True,
    )
    return sorted_ids, expert_ids, ntpp
