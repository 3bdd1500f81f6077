"""EPLB: per MoE layer, which experts get redundant copies and which shard holds each copy.

Pure functions (no Ray, no torch) over measured token loads ``load[layer][expert]``:

1. Replicate: every shard has the same number of slots, ``ceil(experts / shards) + redundant_slots_per_shard``; the
   slots beyond one per expert go, one at a time, to the expert whose per-copy load is the heaviest (an expert's
   tokens are split evenly over its copies, see :meth:`ExpertPlacement.route`). This minimises the heaviest copy.
2. Pack: copies largest first, each onto the least-loaded shard that has a free slot and does not hold that expert
   yet (a second copy on the same shard would balance nothing), preferring shards on nodes that do not hold it.
3. Refine: swap a copy of the most-loaded shard with a lighter one elsewhere while that lowers the maximum.

The result minimises the most-loaded shard's tokens, i.e. maximises the balancedness ``mean / max`` of shard loads.
"""

from __future__ import annotations

import heapq
from typing import Sequence

from k2ray.parallel.placement import ExpertPlacement, PerLayerPlacement

_EPS = 1e-9


def slots_per_shard(n_experts: int, n_shards: int, redundant_slots_per_shard: int) -> int:
    """Slots of every shard in every layer: an equal share of the experts plus the redundant slots (never more
    than one slot per expert, since a shard holds at most one copy of each)."""
    return min(n_experts, -(-n_experts // n_shards) + redundant_slots_per_shard)


def balancedness(shard_loads: Sequence[float]) -> float:
    """Mean over max of the tokens each shard computes: 1 when even, 1/shards when one shard does everything."""
    top = max(shard_loads, default=0.0)
    return 1.0 if top <= 0 else (sum(shard_loads) / len(shard_loads)) / top


def replicate(load: Sequence[float], n_copies: int, max_copies: int) -> list[int]:
    """Copies per expert (each at least 1, at most ``max_copies``, ``n_copies`` in all where possible): each extra
    copy goes to the expert with the heaviest load per copy (ties: lower expert id)."""
    copies = [1] * len(load)
    heap = [(-float(w), e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    extra = n_copies - len(load)
    while extra > 0 and heap:
        _, e = heapq.heappop(heap)
        if copies[e] >= max_copies:
            continue
        copies[e] += 1
        extra -= 1
        if copies[e] < max_copies:
            heapq.heappush(heap, (-float(load[e]) / copies[e], e))
    return copies


def pack(
    load: Sequence[float], copies: Sequence[int], n_shards: int, slots: int, shard_nodes: Sequence[str]
) -> list[list[int]]:
    """Shard -> experts, largest per-copy load first onto the least-loaded shard with room (see module doc)."""
    items = sorted(((float(load[e]) / copies[e], e) for e in range(len(load)) for _ in range(copies[e])),
                   key=lambda it: (-it[0], it[1]))
    held: list[list[int]] = [[] for _ in range(n_shards)]
    have: list[set[int]] = [set() for _ in range(n_shards)]
    weight = [0.0] * n_shards
    for w, e in items:
        free = [s for s in range(n_shards) if len(held[s]) < slots and e not in have[s]]
        if not free:
            free = [_make_room(e, held, have, weight, load, copies, slots)]
        nodes_with = {shard_nodes[s] for s in range(n_shards) if e in have[s]}
        elsewhere = [s for s in free if shard_nodes[s] not in nodes_with]
        s = min(elsewhere or free, key=lambda s: (weight[s], len(held[s]), s))
        held[s].append(e)
        have[s].add(e)
        weight[s] += w
    _refine(held, have, weight, load, copies)
    return held


def _make_room(e, held, have, weight, load, copies, slots) -> int:
    """Every shard with a free slot already holds ``e``: move another copy onto such a shard, freeing a slot on a
    shard without ``e``. Rare (only near the end of the packing, when few slots are left)."""
    for t in range(len(held)):
        if len(held[t]) >= slots:
            continue
        for u in range(len(held)):
            if e in have[u]:
                continue
            for x in held[u]:
                if x not in have[t]:
                    w = float(load[x]) / copies[x]
                    held[u].remove(x), have[u].discard(x)
                    held[t].append(x), have[t].add(x)
                    weight[u] -= w
                    weight[t] += w
                    return u
    raise ValueError(f"cannot place a copy of expert {e}: too many copies for the shards")


def _refine(held, have, weight, load, copies, max_rounds: int = 1000) -> None:
    """Swap a copy on the most-loaded shard with a lighter copy on another shard while the maximum drops."""
    per_copy = [float(load[e]) / copies[e] for e in range(len(load))]
    for _ in range(max_rounds):
        a = max(range(len(held)), key=lambda s: weight[s])
        best = None  # (new max of the pair, b, i, j)
        for b in range(len(held)):
            if b == a:
                continue
            for i, x in enumerate(held[a]):
                for j, y in enumerate(held[b]):
                    d = per_copy[x] - per_copy[y]
                    if d <= _EPS or y in have[a] or x in have[b]:
                        continue
                    pair_max = max(weight[a] - d, weight[b] + d)
                    if pair_max < weight[a] - _EPS and (best is None or pair_max < best[0]):
                        best = (pair_max, b, i, j)
        if best is None:
            return
        _, b, i, j = best
        x, y = held[a][i], held[b][j]
        d = per_copy[x] - per_copy[y]
        held[a][i], held[b][j] = y, x
        have[a].discard(x), have[a].add(y), have[b].discard(y), have[b].add(x)
        weight[a] -= d
        weight[b] += d


def plan_layer(
    load: Sequence[float], n_shards: int, redundant_slots_per_shard: int, shard_nodes: Sequence[str] | None = None
) -> ExpertPlacement:
    """One MoE layer's placement for the token loads ``load[expert]``."""
    n = len(load)
    if not 1 <= n_shards <= n:
        raise ValueError(f"{n_shards} shards for {n} experts")
    if redundant_slots_per_shard < 0:
        raise ValueError("redundant_slots_per_shard must not be negative")
    nodes = list(shard_nodes) if shard_nodes is not None else [str(s) for s in range(n_shards)]
    if len(nodes) != n_shards:
        raise ValueError(f"shard_nodes has {len(nodes)} entries for {n_shards} shards")
    slots = slots_per_shard(n, n_shards, redundant_slots_per_shard)
    copies = replicate(load, n_shards * slots, n_shards)
    held = pack(load, copies, n_shards, slots, nodes)
    return ExpertPlacement(n, n_shards, tuple(tuple(s) for s in held))


def plan(
    loads: Sequence[Sequence[float]],
    n_shards: int,
    redundant_slots_per_shard: int,
    shard_nodes: Sequence[str] | None = None,
    version: int = 0,
) -> PerLayerPlacement:
    """Every MoE layer's placement for ``loads[layer][expert]``."""
    return PerLayerPlacement(
        tuple(plan_layer(load, n_shards, redundant_slots_per_shard, shard_nodes) for load in loads), version
    )


def align_slots(old: Sequence[int], new: Sequence[int]) -> list[int]:
    """``new``'s experts in the slot order that keeps every expert ``old`` also holds in its slot: the experts new
    to the shard take the freed slots, then slots beyond ``old``'s, so a shard loads only what is new to it and
    overwrites only what it drops. If the shard has fewer slots than before, experts from the end move into the
    holes (from slots the new table no longer uses, so they are not overwritten first)."""
    wanted = set(new)
    out: list[int | None] = []
    placed: set[int] = set()
    for e in old:
        keep = e in wanted and e not in placed  # an expert held twice keeps its first slot
        out.append(e if keep else None)
        if keep:
            placed.add(e)
    incoming = iter([e for e in new if e not in placed])
    out = [e if e is not None else next(incoming, None) for e in out]
    out.extend(incoming)
    while None in out:
        last = out.pop()
        if last is not None:
            out[out.index(None)] = last
    return out  # type: ignore[return-value]


def align(new: PerLayerPlacement, current: PerLayerPlacement) -> PerLayerPlacement:
    """``new`` with each shard's slots ordered by :func:`align_slots` against ``current``. Shards that ``current``
    does not have (a grown pool) keep ``new``'s order; shards ``new`` does not have (a shrunk pool) are gone."""
    layers = []
    for p_new, p_old in zip(new.layers, current.layers):
        old = p_old.shard_experts
        shards = tuple(tuple(align_slots(old[s], n)) if s < len(old) else tuple(n)
                       for s, n in enumerate(p_new.shard_experts))
        layers.append(ExpertPlacement(p_new.n_experts, p_new.n_shards, shards))
    return PerLayerPlacement(tuple(layers), new.version)


def predicted_balancedness(placement: PerLayerPlacement, loads: Sequence[Sequence[float]]) -> list[float]:
    """Balancedness per layer if ``loads`` were served by ``placement`` (tokens split evenly over copies)."""
    return [balancedness(p.shard_loads(load)) for p, load in zip(placement.layers, loads)]


def max_shard_load(placement: ExpertPlacement, load: Sequence[float]) -> float:
    return max(placement.shard_loads(load))
