"""Which physical expert shard serves which logical expert (the routing table), with redundant copies.

Default: logical experts split contiguously over the shards. ``redundant`` extra copies (of the hottest experts, or
the first ones when no load is known) are appended to shards round-robin, so a hot expert can be served from two
places; :meth:`ExpertPlacement.route` spreads (token, expert) pairs over the copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    n_experts: int
    n_shards: int
    shard_experts: tuple[tuple[int, ...], ...]  # shard -> logical expert of each local slot

    @classmethod
    def contiguous(cls, n_experts: int, n_shards: int, redundant: list[int] | int = 0) -> "ExpertPlacement":
        if not 1 <= n_shards <= n_experts:
            raise ValueError(f"expert_shards={n_shards} must be between 1 and n_routed_experts={n_experts}")
        base, extra = divmod(n_experts, n_shards)
        shards, start = [], 0
        for s in range(n_shards):
            n = base + (1 if s < extra else 0)
            shards.append(list(range(start, start + n)))
            start += n
        copies = list(range(redundant)) if isinstance(redundant, int) else list(redundant)
        for i, e in enumerate(copies):
            if not 0 <= e < n_experts:
                raise ValueError(f"redundant expert {e} out of range")
            # Put the copy on a shard that does not already hold the expert.
            for step in range(n_shards):
                s = (i + 1 + step) % n_shards
                if e not in shards[s] or n_shards == 1:
                    shards[s].append(e)
                    break
        return cls(n_experts, n_shards, tuple(tuple(s) for s in shards))

    def copies(self) -> list[list[tuple[int, int]]]:
        """logical expert -> [(shard, local slot), ...]"""
        table: list[list[tuple[int, int]]] = [[] for _ in range(self.n_experts)]
        for s, experts in enumerate(self.shard_experts):
            for slot, e in enumerate(experts):
                table[e].append((s, slot))
        return table

    def lookup_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(num_copies [E], shard [E, C], slot [E, C])`` padded with the first copy, for vectorised routing."""
        table = self.copies()
        c = max(len(t) for t in table)
        shard = torch.zeros(self.n_experts, c, dtype=torch.long)
        slot = torch.zeros(self.n_experts, c, dtype=torch.long)
        for e, t in enumerate(table):
            for j in range(c):
                shard[e, j], slot[e, j] = t[j % len(t)]
        return torch.tensor([len(t) for t in table]), shard, slot

    def route(self, topk_ids: torch.Tensor, tables=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shard [T, k], local slot [T, k])`` for logical ``topk_ids [T, k]``; copies picked per token."""
        n_copies, shard, slot = tables or self.lookup_tensors()
        t = torch.arange(topk_ids.shape[0], device=topk_ids.device).unsqueeze(1)
        pick = t % n_copies[topk_ids]
        return shard[topk_ids, pick], slot[topk_ids, pick]

    def describe(self) -> dict:
        return {f"shard{s}": list(e) for s, e in enumerate(self.shard_experts)}
