"""Placement across a multi-node Ray cluster, on one machine: three raylets with pool resources and labels."""

import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from k2ray.config import ConfigError, EngineConfig, ParallelConfig
from k2ray.executor.local import LocalExecutor
from k2ray.executor.ray import ExecutorError, RayExecutor
from k2ray.runtime.step import StepInput
from .test_ray_executor import PROMPTS, greedy_decode

pytestmark = pytest.mark.ray

ENGINE = EngineConfig(num_kv_blocks=48, block_size=8)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {
        "attention": c.add_node(num_cpus=2, resources={"k2ray_attention": 2}, labels={"k2ray/pool": "attention"}),
        "experts-a": c.add_node(num_cpus=2, resources={"k2ray_experts": 2}, labels={"k2ray/pool": "experts"}),
        "experts-b": c.add_node(num_cpus=2, resources={"k2ray_experts": 2}, labels={"k2ray/pool": "experts"}),
    }
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, {name: n.node_id for name, n in nodes.items()}
    ray.shutdown()
    c.shutdown()


def plan(**kw):
    base = dict(
        executor="ray",
        attention_workers=1,
        expert_shards=2,
        cpus_per_worker=0.5,
        redundant_experts=4,
        placement_strategy="SPREAD",
        attention_pool={"resources": {"k2ray_attention": 1}, "node_labels": {"k2ray/pool": "attention"}},
        expert_pool={"resources": {"k2ray_experts": 1}, "node_labels": {"k2ray/pool": "experts"}},
    )
    base.update(kw)
    return ParallelConfig(**base)


def test_pools_land_on_their_nodes_and_match_local(cluster, tiny_weights_dir):
    c, nodes = cluster
    local = greedy_decode(LocalExecutor(tiny_weights_dir, ENGINE), PROMPTS, steps=6)
    ex = RayExecutor(tiny_weights_dir, ENGINE, plan())
    try:
        layout = ex.describe()
        assert [w["node_id"] for w in layout["attention_workers"]] == [nodes["attention"]]
        assert {s["node_id"] for s in layout["expert_shards"]} == {nodes["experts-a"], nodes["experts-b"]}
        # Redundant copies of the hot experts live on the other node than their primary copy.
        node_of_shard = {s["shard"]: s["node_id"] for s in layout["expert_shards"]}
        for e in range(4):
            layer0 = ex.placement.layers[0]
            holders = {node_of_shard[s] for s, experts in enumerate(layer0.shard_experts) if e in experts}
            assert len(holders) == 2, (e, layer0.shard_experts)
        assert greedy_decode(ex, PROMPTS, steps=6) == local
    finally:
        ex.shutdown()


def test_impossible_plan_fails_fast_naming_resource(cluster, tiny_weights_dir):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"expert_shards=6 needs 6 bundles.*not enough 'k2ray_experts'"):
        RayExecutor(tiny_weights_dir, ENGINE, plan(expert_shards=6))
    with pytest.raises(ConfigError, match=r"no alive node has the labels \{'k2ray/pool': 'gpu'\}"):
        RayExecutor(tiny_weights_dir, ENGINE, plan(attention_pool={"node_labels": {"k2ray/pool": "gpu"}}))
    assert time.monotonic() - t0 < 10


def test_removing_an_expert_node_fails_the_group_cleanly(cluster, tiny_weights_dir):
    c, nodes = cluster
    ex = RayExecutor(tiny_weights_dir, ENGINE, plan(redundant_experts=0, collective_timeout_s=20))
    victim = next(n for n in c.worker_nodes if n.node_id == ex.describe()["expert_shards"][1]["node_id"])
    errors = []

    def run():
        try:
            for _ in range(1000):
                greedy_decode(ex, PROMPTS, steps=4)
        except ExecutorError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    c.remove_node(victim)
    t.join(timeout=45)
    try:
        assert not t.is_alive(), "generation hung after a node was removed"
        assert errors and "model group" in str(errors[0])
        with pytest.raises(ExecutorError):
            ex.execute(StepInput([]))
    finally:
        ex.shutdown()
