"""Elastic pools: a Ray model group grows and shrinks its attention and expert pools while it serves.

The policy and the scheduler's drain are unit-tested here; the live tests run 16 streaming requests on the tiny model
(gloo, one node) while the group goes 1+2 -> 2+3 -> 1+2 workers (attention + experts): no request fails, greedy
outputs are those of a fixed layout, every cache block is free at the end, and the switch pause is measured.
"""

import asyncio
import threading
import time

import pytest
import ray

from k2ray.checkpoint.tiny import random_state_dict, tiny_config, write_checkpoint
from k2ray.config import ElasticConfig, EngineConfig, ModelArgs, ParallelConfig
from k2ray.engine.engine import LLMEngine
from k2ray.executor.ray import RayExecutor
from k2ray.parallel.elastic import ElasticPolicy, PoolSignals
from k2ray.runtime.sampling import SamplingParams
from k2ray.runtime.step import PendingLayout

from tests.engine.engine_helpers import FakeExecutor, fake_reference

ENGINE = EngineConfig(num_kv_blocks=128, block_size=8, max_num_seqs=16, enable_prefix_caching=False)
PROMPTS = [[5 + i, 6 * i + 1, 7, 8 + i, 9, 10 * i + 3, 11, 12] for i in range(16)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


# -- the policy ---------------------------------------------------------------------------------------------------------
def _policy(**kw) -> ElasticPolicy:
    cfg = ElasticConfig(window_s=10, cooldown_s=30, **kw)
    return ElasticPolicy(cfg, attention=(1, 2), experts=(2, 4))


def _feed(pol, t0, t1, **sig):
    t = t0
    while t <= t1:
        pol.observe(PoolSignals(t, sig.get("kv", 0.5), sig.get("waiting", 0), sig.get("wait", 0.3)))
        t += 1.0


def test_policy_needs_the_whole_window_and_respects_bounds():
    pol = _policy()
    _feed(pol, 0, 5, kv=0.95, waiting=3)
    assert pol.decide(5, 1, 2) is None  # 5 s of a 10 s window
    _feed(pol, 6, 11, kv=0.95, waiting=3)
    d = pol.decide(11, 1, 2)
    assert (d.pool, d.direction, d.attention_workers, d.expert_shards) == ("attention_workers", "up", 2, 2)
    assert pol.decide(11, 2, 2) is None or pol.decide(11, 2, 2).pool != "attention_workers"  # at its max


def test_policy_hysteresis_and_cooldown():
    pol = _policy()
    _feed(pol, 0, 11, kv=0.5, waiting=0, wait=0.3)  # between every pair of thresholds: nothing to do
    assert pol.decide(11, 2, 3) is None
    _feed(pol, 12, 30, kv=0.5, waiting=0, wait=0.7)  # the experts are the bottleneck
    d = pol.decide(30, 2, 3)
    assert (d.pool, d.direction, d.expert_shards) == ("expert_shards", "up", 4)
    pol.resized(30)
    _feed(pol, 31, 55, kv=0.1, waiting=0, wait=0.0)  # idle: both pools could shrink, but the cooldown holds
    assert pol.decide(55, 2, 4) is None
    _feed(pol, 56, 61, kv=0.1, waiting=0, wait=0.0)
    d = pol.decide(61, 2, 4)
    assert (d.pool, d.direction, d.attention_workers) == ("attention_workers", "down", 1)  # one pool at a time
    # A single observation against the trend keeps the pool as it is.
    pol = _policy()
    _feed(pol, 0, 11, kv=0.1, waiting=0, wait=0.0)
    pol.observe(PoolSignals(11.5, 0.1, 0, 0.2))  # between expert_wait_low and _high
    assert pol.decide(12, 1, 3) is None or pol.decide(12, 1, 3).pool != "expert_shards"


def test_elastic_ranges_are_validated():
    with pytest.raises(ValueError, match="elastic.expert_shards"):
        ParallelConfig(executor="ray", expert_shards=4, elastic={"expert_shards": {"max": 3}})
    with pytest.raises(ValueError, match="need executor 'ray'"):
        ParallelConfig(elastic={"attention_workers": {"max": 2}})
    with pytest.raises(ValueError, match="hysteresis"):
        ElasticConfig(kv_usage_low=0.9, kv_usage_high=0.8)
    p = ParallelConfig(executor="ray", expert_shards=2, elastic={"expert_shards": {"max": 3}})
    assert p.elastic_pools == ["expert_shards"]


# -- the engine follows a resize (model-free) ----------------------------------------------------------------------
class ResizableFake(FakeExecutor):
    """The model-free executor with the resize protocol: a resize is ready ``ready_after`` steps after it starts."""

    def __init__(self, ready_after: int = 3, drain_s: float = 60.0, **kw):
        super().__init__(**kw)
        self.ready_after, self.drain_s = ready_after, drain_s
        self.target: tuple[int, int] | None = None
        self.countdown = 0
        self.deadline = 0.0
        self.switches: list[tuple[int, int]] = []  # (step number, attention workers after)

    def resize(self, attention_workers=None, expert_shards=None, reason="admin"):
        self.target, self.countdown = (attention_workers, expert_shards), self.ready_after
        self.deadline = time.monotonic() + self.drain_s
        return {"started": True}

    def pending_layout(self):
        if self.target is None:
            return None
        return PendingLayout(self.target[0], self.target[1], self.countdown <= 0, self.deadline)

    def execute(self, step):
        assert all(s.attention_rank < self.num_attention_workers for s in step.seqs)
        self.countdown -= 1
        return super().execute(step)

    def switch_layout(self):
        a = self.target[0]
        for rank in range(a, self.num_attention_workers):  # a removed worker must hold nothing any more
            self.cache[rank] = None
        self.cache = self.cache[:a] + [[-1] * (self.num_kv_blocks * self.block_size)
                                       for _ in range(a - len(self.cache))]
        self.num_attention_workers, self.target = a, None
        self.switches.append((len(self.steps), a))
        return {"pause_s": 0.0}


def _add_all(engine, prompts, max_tokens, prefix="r"):
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                           request_id=f"{prefix}{i}")


def _finish(engine, max_steps=10_000) -> dict:
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests() and engine.executor.pending_layout() is None:
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("drain_s", [60.0, 0.0])
def test_engine_drains_or_migrates_then_switches(drain_s):
    """1 -> 2 attention workers, then 2 -> 1 while both hold sequences: with a long drain timeout the removed worker's
    sequences finish there first; with none they move to the kept worker by recomputation. Either way every output
    is the unbatched reference and no block leaks."""
    ex = ResizableFake(num_attention_workers=1, num_kv_blocks=64, block_size=4, drain_s=drain_s)
    engine = LLMEngine(ex, EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=8, enable_prefix_caching=False))
    prompts = [list(range(1 + i, 9 + i)) for i in range(6)]
    engine.resize(2, None)
    _add_all(engine, prompts[:3], 12)
    for _ in range(6):
        engine.step()
    assert ex.switches and ex.switches[0][1] == 2 and engine.num_attention_workers == 2
    _add_all(engine, [[50 + i for i in range(8)]], 20, prefix="new")  # placed on the new, empty worker
    engine.step()
    assert 1 in {s.attention_rank for s in engine.scheduler.running}
    engine.resize(1, None)
    late = [list(range(30 + i, 38 + i)) for i in range(3)]
    for i, prompt in enumerate(late):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                           request_id=f"late{i}")
    final = _finish(engine)
    assert ex.switches[-1][1] == 1 and engine.num_attention_workers == 1
    if drain_s:
        assert engine.scheduler.num_preemptions == 0  # the removed worker's sequences finished there
    else:
        assert engine.scheduler.num_preemptions > 0  # moved by recomputation
    for i, prompt in enumerate(prompts[:3]):
        assert final[f"r{i}"] == fake_reference(prompt, 12)
    assert final["new0"] == fake_reference([50 + i for i in range(8)], 20) and len(final) == 7
    for i, prompt in enumerate(late):
        assert final[f"late{i}"] == fake_reference(prompt, 10)
    for bm in engine.scheduler.managers:
        bm.check_consistent()
        assert bm.num_free_blocks == bm.num_blocks


# -- live: a Ray model group resized under load ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cfg = tiny_config()
    out = tmp_path_factory.mktemp("tiny-elastic")
    write_checkpoint(out, cfg, random_state_dict(ModelArgs.from_dict(cfg), seed=0))
    return out


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


async def _stream_one(engine, prompt) -> list[int]:
    last = None
    async for out in engine.stream(prompt, GREEDY, request_id=f"q{time.monotonic_ns()}"):
        assert out.error is None, out.error
        last = out
    assert last.finished and last.outputs[0].finish_reason == "length"
    return list(last.outputs[0].token_ids)


async def _wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.ray
@pytest.mark.slow
def test_pools_grow_and_shrink_under_load(cluster, tiny_dir):
    par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2,
                         elastic={"attention_workers": {"max": 2}, "expert_shards": {"max": 3}, "drain_timeout_s": 3})
    ex = RayExecutor(tiny_dir, ENGINE, par)
    engine = LLMEngine(ex, ENGINE)
    sizes = lambda: (ex.layout.attention_workers, ex.layout.expert_shards)  # noqa: E731

    async def scenario():
        baseline = await asyncio.gather(*(_stream_one(engine, p) for p in PROMPTS))
        got: list[tuple[int, list[int]]] = []
        done = asyncio.Event()
        seen_sizes = set()

        async def client(i):  # 16 streaming clients, each asking again until the resizes are over
            while not done.is_set():
                got.append((i, await _stream_one(engine, PROMPTS[i])))
                seen_sizes.add(sizes())

        clients = [asyncio.create_task(client(i)) for i in range(len(PROMPTS))]
        await asyncio.sleep(0.5)
        up = await asyncio.to_thread(engine.resize, 2, 3)
        assert up["started"], up
        await _wait_for(lambda: sizes() == (2, 3) and ex.pending_layout() is None, 180, "the group to grow")
        await asyncio.sleep(1.0)  # some steps on the grown layout
        down = await asyncio.to_thread(engine.resize, 1, 2)
        assert down["started"], down
        await _wait_for(lambda: sizes() == (1, 2) and ex.pending_layout() is None, 180, "the group to shrink")
        done.set()
        await asyncio.gather(*clients)
        return baseline, got, seen_sizes

    try:
        baseline, got, seen = asyncio.run(scenario())
        assert len(got) >= 2 * len(PROMPTS)
        assert all(out == baseline[i] for i, out in got)  # greedy outputs as on the fixed layout
        assert (2, 3) in seen
        done = [r for r in ex.resizes if r["done"]]
        assert [r["to"] for r in done] == [{"attention_workers": 2, "expert_shards": 3},
                                            {"attention_workers": 1, "expert_shards": 2}], ex.resizes
        print("resize pauses (ms):", [round(1e3 * r["pause_s"], 1) for r in done],
              "prepared in (s):", [round(r["prepared_s"], 1) for r in done])
        assert len(ex.attention) == 1 and len(ex.shards) == 2 and not ex._added_pgs
        for bm in engine.scheduler.managers:
            assert bm.num_free_blocks == bm.num_blocks
        # The shrunk group still serves, with the expert placement it switched to.
        assert asyncio.run(_stream_one(engine, PROMPTS[0])) == baseline[0]
    finally:
        engine.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_resize_that_cannot_fit_is_abandoned_and_the_group_serves_on(cluster, tiny_dir):
    """The cluster (6 CPUs) holds 1+2 workers of 2 CPUs each but not a third shard: the resize is refused before
    anything starts, recorded with the reason, and the group serves on unchanged. Sizes outside the range are errors
    naming the pool."""
    par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2, cpus_per_worker=2,
                         elastic={"expert_shards": {"max": 3}})
    ex = RayExecutor(tiny_dir, ENGINE, par)
    engine = LLMEngine(ex, ENGINE)
    try:
        with pytest.raises(ValueError, match=r"attention_workers=2 is outside parallel.elastic.attention_workers"):
            engine.resize(2, None)
        assert engine.resize(None, 3)["started"]
        deadline = time.monotonic() + 60
        while ex.pending_layout() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ex.pending_layout() is None and (ex.layout.attention_workers, ex.layout.expert_shards) == (1, 2)
        last = ex.resizes[-1]
        assert not last["done"] and "CPU" in last["error"], last
        out = asyncio.run(_stream_one(engine, PROMPTS[1]))
        assert len(out) == GREEDY.max_tokens
        assert engine.scheduler.accepting_ranks == 1
    finally:
        engine.shutdown()
