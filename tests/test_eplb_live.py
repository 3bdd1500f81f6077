"""Live expert rebalancing on a Ray model group (1 attention worker + 2 expert shards, gloo).

The checkpoint is the tiny model with a gate biased towards a hot set of experts per layer (a different one in each
layer, all on one shard under the contiguous placement), so the shards are clearly unbalanced. Under concurrent
requests a rebalance switches the group to the planner's per-layer placement with redundant copies: the measured
balancedness reaches the prediction, no request fails, and greedy outputs are the same before, during and after.
"""

import asyncio
import time

import pytest
import ray

from k2ray.checkpoint.tiny import random_state_dict, tiny_config, write_checkpoint
from k2ray.config import EngineConfig, ModelArgs, ParallelConfig
from k2ray.engine.engine import LLMEngine
from k2ray.executor.ray import RayExecutor
from k2ray.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# MoE layer -> experts whose gate bias makes every token pick them (4 of its top 8); none of them among the first
# experts, which the initial placement copies into the redundant slots.
HOT = {1: [6, 7, 8, 10], 2: [20, 21, 22, 23], 3: [5, 9, 12, 14]}
ENGINE = EngineConfig(num_kv_blocks=96, block_size=8, max_num_seqs=8, enable_prefix_caching=False)
PROMPTS = [[5 + i, 6 * i + 1, 7, 8 + i, 9, 10 * i + 3, 11, 12] for i in range(6)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def write_hot_expert_checkpoint(out_dir, hot: dict[int, list[int]], seed: int = 0, bias: float = 2.0):
    """The tiny checkpoint with ``bias`` added to the gate's ``e_score_correction_bias`` of the hot experts of each
    layer: it only steers the top-k choice (weights come from the unbiased scores), so those experts get every
    token."""
    cfg = tiny_config()
    sd = random_state_dict(ModelArgs.from_dict(cfg), seed=seed)
    for layer, experts in hot.items():
        sd[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][experts] += bias
    write_checkpoint(out_dir, cfg, sd)
    return out_dir


@pytest.fixture(scope="module")
def hot_dir(tmp_path_factory):
    return write_hot_expert_checkpoint(tmp_path_factory.mktemp("tiny-hot"), HOT)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


async def _run_all(engine, on_first_token=None) -> list[list[int]]:
    """Every prompt at once; ``on_first_token`` runs (in a thread) once the first request has a token."""
    fired = []

    async def one(i, prompt):
        last = None
        async for out in engine.stream(prompt, GREEDY, request_id=f"r{time.monotonic_ns()}-{i}"):
            assert out.error is None, out.error
            if on_first_token is not None and not fired and out.outputs[0].token_ids:
                fired.append(asyncio.create_task(asyncio.to_thread(on_first_token)))
            last = out
        assert last.finished and last.outputs[0].finish_reason == "length"
        return list(last.outputs[0].token_ids)

    outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
    for t in fired:
        await t
    return outs


def test_rebalance_under_load_keeps_outputs_and_balances(cluster, hot_dir):
    par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2,
                         eplb={"window_steps": 512, "redundant_slots_per_shard": 2})
    ex = RayExecutor(hot_dir, ENGINE, par)
    engine = LLMEngine(ex, ENGINE)
    switches = []  # (tokens in the switching step, seconds the switch paused the workers)
    engine.on_step = lambda st: switches.append((st.num_batched_tokens, st.executor["eplb_switch_s"])) if (
        "eplb_switch_s" in st.executor) else None
    try:
        before = asyncio.run(_run_all(engine))
        measured_before = ex.balancedness()
        assert measured_before is not None
        mean_before = sum(measured_before.values()) / len(measured_before)
        assert mean_before < 0.8, measured_before  # the hot sets really unbalance the contiguous placement

        plans = []
        during = asyncio.run(_run_all(engine, on_first_token=lambda: plans.append(ex.rebalance())))
        plan = plans[0]
        assert plan["started"], plan
        assert plan["old_balancedness"] == pytest.approx(mean_before, rel=0.05)
        # The switch happened while the requests were in flight, one step after every worker staged the placement.
        assert ex.placement.version == plan["version"]
        assert len(switches) == 1 and switches[0][0] > 0, switches
        assert len(ex.placement.layers[0].shard_experts[0]) == 18  # 16 + 2 redundant slots

        after = asyncio.run(_run_all(engine))
        measured = ex.balancedness()
        mean_after = sum(measured.values()) / len(measured)
        print(f"balancedness: contiguous {mean_before:.3f} (per layer {measured_before}), planned "
              f"{plan['new_balancedness']:.3f}, measured after the switch {mean_after:.3f} (per layer {measured}); "
              f"switch pause {1e3 * switches[0][1]:.2f} ms")
        assert mean_after >= 0.9 * plan["new_balancedness"]
        assert during == before and after == before
    finally:
        engine.shutdown()


def test_stage_reads_only_new_experts(cluster, hot_dir):
    """A shard stages by copying what it holds and reading only the experts new to it from the checkpoint."""
    par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2)
    ex = RayExecutor(hot_dir, ENGINE, par)
    try:
        shard = ex.shards[0]
        first = len(ray.get(shard.read_tensor_names.remote()))
        old = ex.placement.shard_layers(0)
        new = [layer[2:] + [30, 31] for layer in old]  # drop two experts, take two from the other shard
        ray.get(shard.stage.remote(1, new))
        for _ in range(100):
            if ray.get(shard.ready.remote()) and ray.get(shard.staged_version.remote()) == 1:
                break
            time.sleep(0.1)
        assert ray.get(shard.staged_version.remote()) == 1
        names = ray.get(shard.read_tensor_names.remote())
        read_now = names[first:]
        assert {int(n.split(".")[5]) for n in read_now} == {30, 31}
        assert len(read_now) == 3 * 2 * 3 * 3  # 3 layers x 2 experts x 3 projections x (packed, scale, shape)
    finally:
        ex.shutdown()
