"""AttentionWorker: embedding, every layer's MLA + latent cache, dense layer, shared experts, gate, lm_head, sampling.

Holds no routed experts: the model is built with one :class:`RemoteExperts` for every MoE layer, which
:meth:`AttentionWorker.join_group` connects to a :class:`DispatchClient` that exchanges tokens with the expert shards
over the group's process group. A live rebalance stages the next routing table's lookup tensors in the background
(:meth:`AttentionWorker.stage`) and switches to them at the step the executor names.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from k2ray import logs
from k2ray.checkpoint.loader import load_model
from k2ray.config import EngineConfig, ModelArgs
from k2ray.model.moe import RemoteExperts
from k2ray.runtime.step import SeqResult, SeqWork
from k2ray.runtime.runner import ModelRunner
from k2ray.parallel.dispatch import DispatchClient
from k2ray.parallel.groups import GroupLayout, free_port, init_group
from k2ray.workers.node import node_id, node_ip
from k2ray.parallel.placement import ExpertPlacement, PerLayerPlacement
from k2ray.workers.staging import Stager

log = logging.getLogger(__name__)


class AttentionWorker:
    def __init__(
        self,
        model_dir: str,
        engine: EngineConfig,
        layout: GroupLayout,
        index: int,
        placement: ExpertPlacement | PerLayerPlacement,
        device: str = "cpu",
        threads: int = 1,
        overlap_shared_expert: bool = True,
    ):
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.layout, self.index, self.placement, self.device = layout, index, placement, device
        t0 = time.perf_counter()
        self.args = ModelArgs.from_dir(model_dir)
        self.remote = RemoteExperts()  # connected to the expert shards in join_group, once the process group exists
        model = load_model(
            model_dir, dtype=engine.torch_dtype, with_experts=False, routed=lambda layer: self.remote
        ).to(device)
        self.load_s = time.perf_counter() - t0
        logs.configure()
        log.info("attention worker %d (pid %d): weights loaded in %.1fs on %s", index, os.getpid(), self.load_s, device)
        self.num_kv_blocks = engine.kv_blocks_for(self.args)
        self.runner = ModelRunner(model, self.num_kv_blocks, engine.block_size, engine.torch_dtype, device)
        self.client: DispatchClient | None = None
        self.overlap = overlap_shared_expert
        self.stager = Stager()

    def ping(self) -> bool:
        """The router's idle heartbeat: answers at once (queued behind a running step, which a busy group has)."""
        return True

    def ready(self) -> dict:
        return {"num_kv_blocks": self.num_kv_blocks, "node_ip": node_ip(), "node_id": node_id(), "pid": os.getpid(),
                "load_s": self.load_s}

    def rendezvous(self) -> tuple[str, int]:
        """An address on this node for the group's process-group rendezvous (this worker is rank 0)."""
        return node_ip(), free_port()

    def join_group(self, backend: str, address: str, port: int, timeout_s: float) -> None:
        init_group(backend, address, port, self.layout.attention_rank(self.index), self.layout.world_size, timeout_s)
        a = self.args
        self.client = DispatchClient(
            self.layout, self.index, self.placement, a.hidden_size, a.num_experts_per_tok, overlap=self.overlap
        )
        self.remote.connect(self.client)

    def regroup(self, layout: GroupLayout, placement: ExpertPlacement | PerLayerPlacement, backend: str, address: str,
                port: int, timeout_s: float) -> None:
        """A pool resize's switch: route by ``placement`` over the group's new process group under ``layout``
        (this worker keeps its index, rank and cache)."""
        self.layout, self.placement = layout, placement
        self.join_group(backend, address, port, timeout_s)

    def stage(self, placement: PerLayerPlacement) -> None:
        """Build the lookup tensors of ``placement`` in the background (returns at once)."""
        self.stager.start(placement.version, lambda: (placement, DispatchClient.lookup_tables(placement)))

    def execute(
        self, seqs: list[SeqWork], tokens_per_worker: list[int], switch: int | None = None
    ) -> tuple[list[SeqResult], dict]:
        """One step; with ``switch``, first route by the staged placement of that version."""
        pause = None
        if switch is not None:
            t0 = time.perf_counter()
            placement, tables = self.stager.take(switch)
            self.placement = placement
            self.client.set_placement(placement, tables)
            pause = time.perf_counter() - t0
        self.client.begin_step(tokens_per_worker)
        results = self.runner.execute(seqs)
        stats = self.client.stats.take()
        stats.update(self.stager.report())
        if pause is not None:
            stats["switch_s"] = pause
        return results, stats
