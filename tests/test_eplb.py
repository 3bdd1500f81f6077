"""The EPLB planner (k2ray/parallel/eplb.py): against exhaustive search on small cases, against the contiguous
placement on K2-sized ones, and its invariants (equal slots, copies on distinct shards, nodes spread)."""

import itertools
import random

import pytest
import torch

from k2ray.parallel import eplb
from k2ray.parallel.placement import ExpertPlacement, PerLayerPlacement


def zipf_loads(n_layers: int, n_experts: int, seed: int, s: float = 1.0, tokens: int = 100_000) -> list[list[float]]:
    """Zipf-distributed token counts over experts, a different (random) hot set in every layer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_layers):
        weights = [1.0 / (r + 1) ** s for r in range(n_experts)]
        rng.shuffle(weights)
        total = sum(weights)
        out.append([round(tokens * w / total) for w in weights])
    return out


def exhaustive_optimum(load: list[float], n_shards: int, redundant: int) -> float:
    """The smallest possible most-loaded shard: every expert on a non-empty set of distinct shards (its tokens split
    evenly over them), at most ``slots_per_shard`` experts per shard. Branch and bound, experts heaviest first."""
    n = len(load)
    slots = eplb.slots_per_shard(n, n_shards, redundant)
    order = sorted(range(n), key=lambda e: -load[e])
    total = float(sum(load))
    best = [float("inf")]
    weight = [0.0] * n_shards
    used = [0] * n_shards
    subsets = [c for k in range(1, n_shards + 1) for c in itertools.combinations(range(n_shards), k)]

    def dfs(i: int) -> None:
        cur = max(weight)
        if cur >= best[0] - 1e-9 or total / n_shards >= best[0] - 1e-9:
            return
        if i == n:
            best[0] = cur
            return
        w = load[order[i]]
        empties = [s for s in range(n_shards) if used[s] == 0]
        for sub in subsets:
            if any(used[s] >= slots for s in sub):
                continue
            # Empty shards are interchangeable: a copy may open only the first empty ones.
            new = [s for s in sub if used[s] == 0]
            if new != empties[: len(new)]:
                continue
            part = w / len(sub)
            for s in sub:
                weight[s] += part
                used[s] += 1
            dfs(i + 1)
            for s in sub:
                weight[s] -= part
                used[s] -= 1

    dfs(0)
    return best[0]


def _check_invariants(p: ExpertPlacement, n_experts: int, slots: int) -> None:
    assert all(len(s) == slots for s in p.shard_experts), "every shard holds the same number of slots"
    assert all(len(set(s)) == len(s) for s in p.shard_experts), "two copies of one expert on one shard"
    assert {e for s in p.shard_experts for e in s} == set(range(n_experts)), "an expert without a copy"


@pytest.mark.parametrize("shards", [2, 3, 4])
@pytest.mark.parametrize("redundant", [0, 1, 2])
def test_within_5_percent_of_exhaustive_optimum(shards, redundant):
    worst = 0.0
    for seed in range(3):
        load = zipf_loads(1, 8, seed=seed * 7 + shards)[0]
        p = eplb.plan_layer(load, shards, redundant)
        _check_invariants(p, 8, eplb.slots_per_shard(8, shards, redundant))
        got = eplb.max_shard_load(p, load)
        opt = exhaustive_optimum(load, shards, redundant)
        assert got <= opt * 1.05 + 1e-6, (load, shards, redundant, got, opt, p.shard_experts)
        worst = max(worst, got / opt)
    print(f"8 experts, {shards} shards, {redundant} redundant slots/shard: planned max load <= {worst:.4f} x optimum")


def contiguous_with_hot_copies(load: list[float], shards: int, redundant: int) -> ExpertPlacement:
    """The static layout without EPLB: experts split contiguously, the hottest experts copied round-robin."""
    hot = sorted(range(len(load)), key=lambda e: -load[e])[: shards * redundant]
    return ExpertPlacement.contiguous(len(load), shards, hot)


@pytest.mark.parametrize("shards", [8, 16, 32, 64])
@pytest.mark.parametrize("redundant", [0, 1, 2, 4])
def test_k2_sized_beats_contiguous(shards, redundant):
    """384 experts, a Zipf(1) load with a different hot set per layer. The planned most-loaded shard is within 5% of
    a lower bound (an even split, or the heaviest copy after replication plus the lightest copies filling its
    shard's other slots), so it beats the contiguous placement by
    at least 95% of the best possible factor."""
    loads = zipf_loads(4, 384, seed=shards * 10 + redundant)
    planned = eplb.plan(loads, shards, redundant)
    factors, ideal = [], []
    for p, load in zip(planned.layers, loads):
        _check_invariants(p, 384, eplb.slots_per_shard(384, shards, redundant))
        slots = eplb.slots_per_shard(384, shards, redundant)
        copies = eplb.replicate(load, shards * slots, shards)
        per_copy = sorted(w / c for w, c in zip(load, copies) for _ in range(c))
        # The shard with the heaviest copy holds slots - 1 others, at least the lightest ones.
        bound = max(sum(load) / shards, per_copy[-1] + sum(per_copy[: slots - 1]))
        got = eplb.max_shard_load(p, load)
        base = eplb.max_shard_load(contiguous_with_hot_copies(load, shards, redundant), load)
        assert got <= bound * 1.05, (shards, redundant, got, bound)
        factors.append(base / got)
        ideal.append(base / bound)
    mean_b = sum(eplb.predicted_balancedness(planned, loads)) / len(loads)
    print(f"384 experts, {shards} shards, {redundant} redundant/shard: max shard load {min(factors):.2f}-"
          f"{max(factors):.2f}x lower than contiguous (best possible {min(ideal):.2f}-{max(ideal):.2f}x); "
          f"balancedness {mean_b:.3f}")
    assert min(f / i for f, i in zip(factors, ideal)) >= 0.95
    assert min(factors) >= 1.0


def test_copies_spread_over_nodes():
    """Two nodes of two shards: each replicated expert has a copy on both nodes when possible."""
    load = [100, 90, 80, 10, 9, 8, 7, 6]
    nodes = ["a", "a", "b", "b"]
    p = eplb.plan_layer(load, 4, 1, shard_nodes=nodes)
    for e, copies in enumerate(p.copies()):
        if len(copies) >= 2:
            assert len({nodes[s] for s, _ in copies}) == 2, (e, p.shard_experts)


def test_hot_expert_copied_and_balanced():
    load = [1000] + [10] * 15
    p = eplb.plan_layer(load, 2, 1)
    assert len(p.copies()[0]) == 2
    assert eplb.balancedness(p.shard_loads(load)) > 0.99


def test_no_load_known_still_valid():
    p = eplb.plan_layer([0] * 32, 2, 2)
    _check_invariants(p, 32, 18)
    assert eplb.balancedness(p.shard_loads([0] * 32)) == 1.0


def test_route_splits_tokens_evenly_over_copies():
    p = eplb.plan_layer([1000] + [1] * 7, 2, 1)
    assert len(p.copies()[0]) == 2
    ids = torch.zeros(11, 1, dtype=torch.long)  # 11 tokens, all to expert 0
    ids[::2] = 0  # token order must not matter: even and odd tokens alike
    shard, _slot = p.route(ids)
    per_shard = torch.bincount(shard.flatten(), minlength=2).tolist()
    assert sorted(per_shard) == [5, 6]
    shard1, _ = p.route(ids, offset=1)  # another attention worker starts at the other copy
    assert torch.bincount(shard1.flatten(), minlength=2).tolist() == per_shard[::-1]


def test_per_layer_placement():
    loads = zipf_loads(3, 32, seed=1)
    pl = eplb.plan(loads, 2, 2, version=3)
    assert isinstance(pl, PerLayerPlacement) and pl.version == 3 and len(pl.layers) == 3
    assert pl.slots_per_shard() == 18
    assert len(pl.shard_layers(1)) == 3
    uniform = PerLayerPlacement.uniform(ExpertPlacement.contiguous(32, 2), 3)
    before = eplb.predicted_balancedness(uniform, loads)
    after = eplb.predicted_balancedness(pl, loads)
    assert all(a >= b for a, b in zip(after, before)) and min(after) > 0.97


@pytest.mark.parametrize("old,new", [
    ([0, 1, 2, 3], [3, 9, 1, 8]),  # two kept in place, two new into the freed slots
    ([0, 1, 2], [2, 0, 5, 6]),  # grows: new experts fill the freed slot, then the end
    ([0, 1, 2, 3, 4], [4, 1, 7]),  # shrinks: 4 moves into a hole
    ([0, 0, 1], [0, 1, 2]),  # a duplicate in the old table keeps only its first slot
])
def test_align_slots_keeps_experts_in_place(old, new):
    got = eplb.align_slots(old, new)
    assert sorted(got) == sorted(new)
    width = len(got)
    moved = [e for j, e in enumerate(got) if e in old and (j >= len(old) or old[j] != e)]
    for e in moved:  # an expert that changes slot comes from a slot the new table no longer uses
        assert min(i for i, x in enumerate(old) if x == e) >= width or old.count(e) > 1 or e not in old[:width]
    kept_in_place = [j for j, e in enumerate(got) if j < len(old) and old[j] == e]
    assert len(kept_in_place) >= len(set(old[:width]) & set(new)) - len(moved)


def test_load_window_slides_and_measures_balancedness():
    from k2ray.parallel.load_window import LoadWindow

    w = LoadWindow(n_layers=2, n_experts=4, n_shards=2, window_steps=2)
    assert w.balancedness() is None
    w.add([[4, 0, 0, 0], [1, 1, 1, 1]], [[4, 0], [2, 2]])
    w.add([[0, 2, 2, 0], [1, 1, 1, 1]], [[2, 2], [2, 2]])
    assert w.expert_load() == [[4, 2, 2, 0], [2, 2, 2, 2]]
    assert w.balancedness() == [pytest.approx(4 / 6), 1.0]
    w.add([[0, 0, 0, 2], [0, 0, 0, 0]], [[0, 2], [0, 0]])  # the first step leaves the window
    assert w.steps == 2 and w.expert_load() == [[0, 2, 2, 2], [1, 1, 1, 1]]
    assert w.shard_load() == [[2, 4], [2, 2]]
    w.clear()
    assert w.steps == 0 and w.balancedness() is None


def test_eplb_config_validation():
    from k2ray.config import ConfigError, ModelArgs, ParallelConfig
    from k2ray.checkpoint.tiny import tiny_config

    assert ParallelConfig().eplb.interval_steps == 0  # periodic rebalancing is off by default
    ok = ParallelConfig(executor="ray", expert_shards=2, eplb={"window_steps": 64, "interval_steps": 128,
                                                                "redundant_slots_per_shard": 2})
    assert ok.eplb.redundant_slots_per_shard == 2
    bad = [
        {"eplb": {"window_steps": 0}},
        {"eplb": {"redundant_slots_per_shard": -1}},
        {"eplb": {"interval_steps": 10, "window_steps": 64}, "executor": "ray", "expert_shards": 2},
        {"eplb": {"interval_steps": 128}},  # local executor: one shard, nothing to balance
        {"eplb": {"windows": 3}},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            ParallelConfig(**kw)
    args = ModelArgs.from_dict(tiny_config())  # 32 experts
    with pytest.raises(ConfigError, match="redundant_slots_per_shard"):
        ParallelConfig(executor="ray", expert_shards=2, eplb={"redundant_slots_per_shard": 17}).check_against(args)
    ParallelConfig(eplb={"redundant_slots_per_shard": 2}).check_against(args)  # one shard: nothing to copy, no error


def test_metered_executor_exports_balancedness_and_rebalances():
    """The router's metering wrapper turns the executor's window and switch stats into the EPLB metrics."""
    from types import SimpleNamespace

    from k2ray import metrics
    from k2ray.runtime.step import StepInput, StepOutput, SeqWork
    from k2ray.serve.step_metrics import MeteredExecutor

    class Inner:
        args = SimpleNamespace(moe_layers=[1, 2], n_routed_experts=4)
        block_size, num_kv_blocks, num_attention_workers, failed = 8, 8, 1, None

        def execute(self, step):
            return StepOutput(results={}, stats={"eplb_switch_s": 0.003, "expert_tokens": {(0, 0): 2},
                                                 "expert_layer_tokens": {(1, 0, 0): 2}})

        def balancedness(self):
            return {1: 0.5, 2: 1.0}

        def rebalance(self):
            return {"started": True}

    reg = metrics.configure(backend="prometheus")
    try:
        ex = MeteredExecutor(Inner(), "m", expert_shards=2)
        ex.execute(StepInput([SeqWork(seq_id=0, token_ids=[1], start_pos=0, block_table=[0], attention_rank=0)]))
        ex.flush_expert_load()
        assert ex.rebalance() == {"started": True}
        text = reg.exposition().decode()
        assert 'k2ray_expert_balancedness{layer="1",model="m"} 0.5' in text
        assert 'k2ray_expert_balancedness{layer="mean",model="m"} 0.75' in text
        assert 'k2ray_eplb_rebalances_total{model="m"} 1.0' in text
        assert 'k2ray_eplb_switch_seconds_count{model="m"} 1.0' in text
    finally:
        metrics.configure()


def test_align_across_a_shard_count_change():
    """A pool resize plans for another shard count: kept shards keep every expert they still serve in its slot;
    an added shard takes the plan's order; a removed shard is gone."""
    cur = PerLayerPlacement.uniform(ExpertPlacement.contiguous(12, 2), 2)
    grown = eplb.align(PerLayerPlacement.uniform(ExpertPlacement.contiguous(12, 3), 2, 1), cur)
    for layer in grown.layers:
        assert layer.shard_experts == ((0, 1, 2, 3), (6, 7, 4, 5), (8, 9, 10, 11))  # 4, 5 move into 1's free slots
    shrunk = eplb.align(PerLayerPlacement.uniform(ExpertPlacement.contiguous(12, 2), 2, 2), grown)
    for layer in shrunk.layers:
        assert layer.n_shards == 2 and sorted(sum(layer.shard_experts, ())) == list(range(12))
        assert layer.shard_experts[0][:4] == (0, 1, 2, 3)  # nothing of shard 0 moved
