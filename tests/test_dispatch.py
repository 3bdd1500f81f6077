"""Dispatch/combine over a real multi-process gloo group (no Ray) == computing every expert locally."""

import os
import runpy
import socket

import pytest
import torch
import torch.multiprocessing as mp

from k2ray.model.moe import routed_experts_forward
from k2ray.parallel.dispatch import DispatchClient, ExpertServer, wire_mode
from k2ray.parallel.groups import GroupLayout, destroy_group, init_group
from k2ray.parallel import eplb
from k2ray.parallel.placement import ExpertPlacement, PerLayerPlacement

H, I, N_EXPERTS, LAYERS = 32, 16, 8, 2
RANK_MAIN = "k2ray_dispatch_rank"


def _weights(layer):
    g = torch.Generator().manual_seed(100 + layer)
    return torch.randn(N_EXPERTS, 2 * I, H, generator=g) * 0.2, torch.randn(N_EXPERTS, H, I, generator=g) * 0.2


def _inputs(worker, tokens, top_k, layer, empty_expert):
    g = torch.Generator().manual_seed(1000 * worker + layer)
    x = torch.randn(tokens, H, generator=g)
    scores = torch.rand(tokens, N_EXPERTS, generator=g)
    if empty_expert is not None:
        scores[:, empty_expert] = -1  # never chosen: that expert (maybe a whole shard) gets no tokens
    ids = scores.topk(top_k, dim=1).indices
    w = torch.rand(tokens, top_k, generator=g)
    return x, ids, w


def _placement(e: int, redundant) -> PerLayerPlacement:
    """``redundant`` copies in a contiguous table shared by every layer, or ("eplb", slots): a planned table per layer
    for a different hot expert in each layer."""
    if isinstance(redundant, tuple):
        loads = [[100 if x == layer % N_EXPERTS else 5 for x in range(N_EXPERTS)] for layer in range(LAYERS)]
        return eplb.plan(loads, e, redundant[1])
    return PerLayerPlacement.uniform(ExpertPlacement.contiguous(N_EXPERTS, e, redundant), LAYERS)


def _run(rank, cfg, port, results):
    torch.set_num_threads(1)
    a, e, top_k, tokens, redundant, empty_expert, dtype = cfg
    layout = GroupLayout(a, e)
    per_layer = _placement(e, redundant)
    # The contiguous cases hand the client one table for all layers, the planned one a table per layer.
    placement = per_layer if isinstance(redundant, tuple) else per_layer.layers[0]
    init_group("gloo", "127.0.0.1", port, rank, layout.world_size, 30)
    try:
        if rank < a:
            client = DispatchClient(layout, rank, placement, H, top_k)
            outs = []
            client.begin_step(tokens)  # once per step: the client counts the MoE layers
            for layer in range(LAYERS):
                x, ids, w = _inputs(rank, tokens[rank], top_k, layer, empty_expert)
                pending = client.start(x.to(dtype), ids, w)
                (x @ x.T).sum()  # other work while the rows are away, as MoE.forward runs the shared expert
                outs.append(pending.wait().float())
            results[rank] = outs
        else:
            s = rank - a
            layers = []
            for layer in range(LAYERS):
                local = per_layer.layers[layer].shard_experts[s]
                w13, w2 = _weights(layer)
                w13, w2 = w13[list(local)].to(dtype), w2[list(local)].to(dtype)
                layers.append(lambda x, i, w, w13=w13, w2=w2: routed_experts_forward(x, i, w, w13, w2))
            server = ExpertServer(layout, s, layers, H, top_k, dtype, num_local=per_layer.slots_per_shard())
            stats = server.run_step(tokens)
            results[rank] = stats["expert_layer_tokens"]
    finally:
        destroy_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    # (attention workers, shards, top_k, tokens per worker, redundant copies, never-chosen expert, dtype)
    "1x1": (1, 1, 4, [5], 0, None, torch.float32),
    "1x2-padded": (1, 2, 4, [7], 0, None, torch.float32),
    "2x2-uneven-empty-worker": (2, 2, 4, [6, 0], 0, None, torch.float32),
    "1x3-counts-mode": (1, 3, 2, [9], 0, None, torch.float32),
    "2x3-counts-redundant": (2, 3, 2, [4, 11], 2, None, torch.float32),
    "1x4-shard-gets-nothing": (1, 4, 1, [6], 0, 0, torch.float32),
    "1x2-bf16": (1, 2, 4, [5], 0, None, torch.bfloat16),
    "2x3-counts-eplb-per-layer": (2, 3, 2, [7, 12], ("eplb", 2), None, torch.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dispatch_combine_matches_local(name):
    cfg = CASES[name]
    a, e, top_k, tokens, redundant, empty_expert, dtype = cfg
    if name == "1x3-counts-mode":
        assert wire_mode(GroupLayout(a, e), top_k) == "counts"
    if name == "1x2-padded":
        assert wire_mode(GroupLayout(a, e), top_k) == "padded"
    if name == "1x4-shard-gets-nothing":
        # Expert 0 is never chosen and top_k=1 with 4 shards: check shard 0 (experts 0,1) can still end up empty.
        pass
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    port = _free_port()
    ctx = mp.get_context("spawn")
    # Each rank runs this file by path (the test package is not importable by name: the checkout is not on sys.path).
    procs = [ctx.Process(target=runpy.run_path, args=(__file__,),
                         kwargs={"init_globals": {"RANK_ARGS": (r, cfg, port, results)}, "run_name": RANK_MAIN})
             for r in range(a + e)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    total_load = [0] * N_EXPERTS
    per_layer = _placement(e, redundant)
    for s in range(e):
        for layer, row in enumerate(results[a + s]):
            for slot, n in enumerate(row):
                if n:  # rows are as wide as the widest shard
                    total_load[per_layer.layers[layer].shard_experts[s][slot]] += n
    expected_load = [0] * N_EXPERTS
    for r in range(a):
        for layer in range(LAYERS):
            w13, w2 = _weights(layer)
            x, ids, w = _inputs(r, tokens[r], top_k, layer, empty_expert)
            ref = routed_experts_forward(x.to(dtype), ids, w, w13.to(dtype), w2.to(dtype)).float()
            got = results[r][layer]
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            for i in ids.flatten().tolist():
                expected_load[i] += 1
    assert total_load == expected_load
    if empty_expert is not None:
        assert total_load[empty_expert] == 0


if __name__ == RANK_MAIN:  # a rank process (see test_dispatch_combine_matches_local)
    _run(*RANK_ARGS)  # noqa: F821 - given by runpy's init_globals
