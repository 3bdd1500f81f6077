"""Which physical expert shard serves which logical expert (the routing table), with redundant copies.

Default: logical experts split contiguously over the shards. ``redundant`` extra copies (of the hottest experts, or
the first ones when no load is known) are appended to shards round-robin, so a hot expert can be served from two
places; :meth:`ExpertPlacement.route` spreads an expert's (token, expert) pairs evenly over its copies.
:class:`PerLayerPlacement` holds one table per MoE layer: what the EPLB planner (``eplb.py``) produces from measured
per-layer loads.
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
    def contiguous(
        cls, n_experts: int, n_shards: int, redundant: list[int] | int = 0, shard_nodes: list[str] | None = None
    ) -> "ExpertPlacement":
        """Contiguous primary assignment plus ``redundant`` copies (the first N experts, or the given hot list).

        With ``shard_nodes`` (the node of each shard) a copy goes to a shard on a node that does not yet hold that
        expert, so a hot expert is served from two nodes and one node's loss or load does not pin it.
        """
        if not 1 <= n_shards <= n_experts:
            raise ValueError(f"expert_shards={n_shards} must be between 1 and n_routed_experts={n_experts}")
        base, extra = divmod(n_experts, n_shards)
        shards, start = [], 0
        for s in range(n_shards):
            n = base + (1 if s < extra else 0)
            shards.append(list(range(start, start + n)))
            start += n
        copies = list(range(redundant)) if isinstance(redundant, int) else list(redundant)
        nodes = shard_nodes or [str(s) for s in range(n_shards)]
        if len(nodes) != n_shards:
            raise ValueError(f"shard_nodes has {len(nodes)} entries for {n_shards} shards")
        for i, e in enumerate(copies):
            if not 0 <= e < n_experts:
                raise ValueError(f"redundant expert {e} out of range")
            holders = {nodes[s] for s in range(n_shards) if e in shards[s]}
            order = [(i + 1 + step) % n_shards for step in range(n_shards)]
            # Prefer a shard on another node, then any shard without the expert, least loaded first.
            other_node = [s for s in order if nodes[s] not in holders]
            no_copy = [s for s in order if e not in shards[s]]
            candidates = other_node or no_copy or order
            target = min(candidates, key=lambda s: len(shards[s]))
            shards[target].append(e)
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

    def route(self, topk_ids: torch.Tensor, tables=None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shard [T, k], local slot [T, k])`` for logical ``topk_ids [T, k]``.

        An expert's (token, k) pairs are numbered in token order and dealt round-robin over its copies, starting at
        copy ``offset`` (the attention worker's index, so that workers with one pair each do not all pick copy 0):
        the copies of an expert get its tokens evenly, which is what the EPLB planner assumed when it split the load.
        """
        n_copies, shard, slot = tables or self.lookup_tensors()
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        per_expert = torch.bincount(flat, minlength=self.n_experts)
        first = torch.cumsum(per_expert, 0) - per_expert  # where each expert's run starts in ``order``
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=flat.device) - first[flat[order]]
        pick = ((rank + offset) % n_copies[flat]).view_as(topk_ids)
        return shard[topk_ids, pick], slot[topk_ids, pick]

    def describe(self) -> dict:
        return {f"shard{s}": list(e) for s, e in enumerate(self.shard_experts)}

    def shard_loads(self, expert_load) -> list[float]:
        """Predicted tokens per shard for ``expert_load[e]`` when each expert's tokens split evenly over its copies."""
        loads = [0.0] * self.n_shards
        table = self.copies()
        for e, copies in enumerate(table):
            for s, _slot in copies:
                loads[s] += float(expert_load[e]) / len(copies)
        return loads


@dataclass(frozen=True)
class PerLayerPlacement:
    """The routing table of a model group: one :class:`ExpertPlacement` per MoE layer (in model order), so each layer
    can replicate and place its own hot experts. ``version`` grows with every live rebalance."""

    layers: tuple[ExpertPlacement, ...]
    version: int = 0

    def __post_init__(self):
        if not self.layers:
            raise ValueError("a per-layer placement needs at least one MoE layer")
        if len({(p.n_experts, p.n_shards) for p in self.layers}) != 1:
            raise ValueError("every layer's placement must have the same experts and shards")

    @classmethod
    def uniform(cls, placement: ExpertPlacement, n_layers: int, version: int = 0) -> "PerLayerPlacement":
        return cls((placement,) * n_layers, version)

    @property
    def n_experts(self) -> int:
        return self.layers[0].n_experts

    @property
    def n_shards(self) -> int:
        return self.layers[0].n_shards

    def shard_layers(self, shard: int) -> list[list[int]]:
        """MoE layer -> the logical expert of each local slot of ``shard``."""
        return [list(p.shard_experts[shard]) for p in self.layers]

    def slots_per_shard(self) -> int:
        """The widest shard of any layer (the width of a shard's per-layer load counts)."""
        return max(len(e) for p in self.layers for e in p.shard_experts)

    def describe(self) -> dict:
        return {"version": self.version, "layers": [p.describe() for p in self.layers]}


def check_cluster_fits(parallel, nodes: list[dict]) -> None:
    """Fail before anything starts if the cluster cannot hold the group's bundles.

    ``nodes`` are ``ray.nodes()`` entries. Totals (not free amounts) are used: this checks the plan, not the moment.
    """
    from k2ray.config import ConfigError

    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    free = [dict(n.get("Resources", {})) for n in alive]
    labels = [n.get("Labels", {}) or {} for n in alive]
    pools = [
        ("attention", "attention_workers", parallel.attention_workers, parallel.attention_pool.node_labels),
        ("experts", "expert_shards", parallel.expert_shards, parallel.expert_pool.node_labels),
    ]
    for pool, field, count, selector in pools:
        need = parallel.pool_bundle(pool)
        matching = [i for i in range(len(alive)) if all(labels[i].get(k) == v for k, v in selector.items())]
        placed = 0
        for i in matching:
            node = free[i]
            while placed < count and all(node.get(r, 0.0) >= q - 1e-9 for r, q in need.items()):
                for r, q in need.items():
                    node[r] = node.get(r, 0.0) - q
                placed += 1
        if placed < count:
            where = f" on nodes labelled {selector}" if selector else ""
            if not matching:
                raise ConfigError(f"parallel.{field}={count}: no alive node has the labels {selector}")
            # The resource that runs out first names the problem.
            totals = {r: sum(free[i].get(r, 0.0) for i in matching) for r in need}
            missing = min(need, key=lambda r: totals[r] / need[r])
            raise ConfigError(
                f"parallel.{field}={count} needs {count} bundles of {need}{where} but the cluster provides "
                f"{placed}: not enough {missing!r} (after placing {placed}, {totals[missing]:g} left)"
            )
