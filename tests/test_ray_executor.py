"""The Ray executor (attention workers x expert shards over gloo) against the local executor, and its failures."""

import threading
import time

import pytest
import ray
import torch

from k2ray.config import EngineConfig, ParallelConfig
from k2ray.runtime.sampling import SampleRequest, SamplingParams
from k2ray.runtime.step import SeqWork, StepInput
from k2ray.executor.local import LocalExecutor
from k2ray.executor.ray import ExecutorError, RayExecutor

pytestmark = pytest.mark.ray

ENGINE = EngineConfig(num_kv_blocks=48, block_size=8)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [100, 200], [42] * 19, [7, 1000, 2000, 3]]
GREEDY = SamplingParams(temperature=0.0)


def greedy_decode(executor, prompts, steps, num_attention_workers=1):
    """A minimal driver: prefill every prompt in one step, then decode all together; blocks assigned statically."""
    toks = [list(p) for p in prompts]
    pos = [0] * len(prompts)
    per_seq = 6
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    for step in range(steps):
        seqs = [
            SeqWork(
                seq_id=i,
                token_ids=toks[i] if step == 0 else [toks[i][-1]],
                start_pos=pos[i],
                block_table=tables[i],
                attention_rank=i % num_attention_workers,
                sample=SampleRequest(GREEDY),
            )
            for i in range(len(prompts))
        ]
        out = executor.execute(StepInput(seqs))
        for s in seqs:
            pos[s.seq_id] += len(s.token_ids)
            toks[s.seq_id].append(out.results[s.seq_id].sample.token_id)
    return [t[len(p):] for t, p in zip(toks, prompts)]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_tokens(tiny_weights_dir):
    return greedy_decode(LocalExecutor(tiny_weights_dir, ENGINE), PROMPTS, steps=8)


@pytest.mark.parametrize("a,e,overlap", [(1, 1, True), (1, 2, True), (1, 2, False), (2, 2, True), (1, 4, True)])
def test_ray_equals_local(cluster, tiny_weights_dir, local_tokens, a, e, overlap):
    """Token for token, with the shared expert overlapped with the all-to-all (the default) and run after it."""
    par = ParallelConfig(executor="ray", attention_workers=a, expert_shards=e, overlap_shared_expert=overlap)
    ex = RayExecutor(tiny_weights_dir, ENGINE, par)
    try:
        got = greedy_decode(ex, PROMPTS, steps=8, num_attention_workers=a)
        stats = ex.execute(StepInput([])).stats  # an empty step still runs every collective
    finally:
        ex.shutdown()
    assert got == local_tokens
    assert stats["expert_tokens"] == {}


def test_expert_shards_read_only_their_tensors(cluster, tiny_weights_dir):
    ex = RayExecutor(tiny_weights_dir, ENGINE, ParallelConfig(executor="ray", attention_workers=1, expert_shards=2))
    try:
        for s, shard in enumerate(ex.shards):
            names = ray.get(shard.read_tensor_names.remote())
            mine = {e for layer in ex.placement.shard_layers(s) for e in layer}
            assert names and all(".mlp.experts." in n for n in names)
            assert {int(n.split(".")[5]) for n in names} == mine
            # 3 MoE layers x 16 experts x 3 projections x (packed, scale, shape)
            assert len(names) == 3 * len(mine) * 3 * 3
    finally:
        ex.shutdown()


def test_redundant_experts_same_tokens(cluster, tiny_weights_dir, local_tokens):
    par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2, redundant_experts=6)
    ex = RayExecutor(tiny_weights_dir, ENGINE, par)
    try:
        assert all(sum(len(s) for s in p.shard_experts) == 32 + 6 for p in ex.placement.layers)
        assert greedy_decode(ex, PROMPTS, steps=8) == local_tokens
    finally:
        ex.shutdown()


def test_per_layer_placement_after_rebalance_same_tokens(cluster, tiny_weights_dir, local_tokens):
    """After a live rebalance (per-layer tables, redundant copies, 2 attention workers splitting copies from
    different offsets) the group still decodes exactly what the local executor does."""
    par = ParallelConfig(executor="ray", attention_workers=2, expert_shards=2,
                         eplb={"redundant_slots_per_shard": 3})
    ex = RayExecutor(tiny_weights_dir, ENGINE, par)
    try:
        assert greedy_decode(ex, PROMPTS, steps=8, num_attention_workers=2) == local_tokens
        plan = ex.rebalance()
        assert plan["started"], plan
        for _ in range(200):  # empty steps until every worker staged it and the group switched
            if ex.placement.version == plan["version"]:
                break
            ex.execute(StepInput([]))
            time.sleep(0.05)
        assert ex.placement.version == plan["version"]
        layers = ex.placement.layers
        assert len({p.shard_experts for p in layers}) > 1, "expected a different table per layer"
        assert all(len(s) == 19 for p in layers for s in p.shard_experts)
        assert greedy_decode(ex, PROMPTS, steps=8, num_attention_workers=2) == local_tokens
    finally:
        ex.shutdown()


def test_killed_shard_fails_fast_and_group_rebuilds(cluster, tiny_weights_dir, local_tokens):
    par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2, collective_timeout_s=20)
    ex = RayExecutor(tiny_weights_dir, ENGINE, par)
    errors = []

    def generate_forever():
        try:
            for _ in range(1000):
                greedy_decode(ex, PROMPTS, steps=4)
        except ExecutorError as e:
            errors.append((time.monotonic(), e))

    t = threading.Thread(target=generate_forever)
    t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    ray.kill(ex.shards[1], no_restart=True)
    t.join(timeout=40)
    try:
        assert not t.is_alive(), "generation hung after an expert shard died"
        assert errors, "no error surfaced after an expert shard died"
        when, err = errors[0]
        assert when - killed_at < 25
        assert "model group" in str(err) and "step failed" in str(err)
        with pytest.raises(ExecutorError):
            ex.execute(StepInput([]))
        ex.rebuild()
        assert greedy_decode(ex, PROMPTS, steps=8) == local_tokens
    finally:
        ex.shutdown()


def test_impossible_layout_fails_fast(cluster, tiny_weights_dir):
    from k2ray.config import ConfigError

    par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2, cpus_per_worker=100)
    with pytest.raises(ConfigError, match=r"parallel.attention_workers=1 needs 1 bundles.*not enough 'CPU'"):
        RayExecutor(tiny_weights_dir, ENGINE, par)
    # Without the up-front check, the placement group wait still fails in bounded time.
    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match="cannot reserve 3 bundles"):
        RayExecutor(tiny_weights_dir, ENGINE, par.model_copy(update={"validate_cluster": False}), ready_timeout_s=3)
    assert time.monotonic() - t0 < 20


def test_more_shards_than_experts_rejected(tiny_weights_dir):
    from k2ray.config import ConfigError

    with pytest.raises(ConfigError, match="expert_shards=64 exceeds"):
        RayExecutor(tiny_weights_dir, ENGINE, ParallelConfig(executor="ray", expert_shards=64))


def test_group_failure_reasons_carry_no_internals():
    """Why a group failed reaches /health and logs' one-liners: the worker's own error, never Ray's task repr, a pid,
    an address or a path."""
    from k2ray.executor.ray import _short

    raw = RuntimeError("ray::AttentionWorker.execute() (pid=4242, ip=10.1.2.3, actor_id=ab12, repr=<AttentionWorker>)\n"
                       "  File \"/srv/app/k2ray/runtime/runner.py\", line 7\nIndexError: index 2304 is out of bounds")
    assert _short(raw) == "RuntimeError: IndexError: index 2304 is out of bounds"
    msg = _short(RuntimeError("gloo connect to 10.1.2.3:29500 failed (pid=77) in /tmp/ray/session/x.py"))
    assert "10.1.2.3" not in msg and "77" not in msg and "/tmp" not in msg and msg.startswith("RuntimeError: gloo")
