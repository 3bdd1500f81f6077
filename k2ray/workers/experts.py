"""ExpertShard: the routed experts assigned to this shard, per MoE layer; reads only their tensors.

A live rebalance stages the new assignment in the background (:meth:`ExpertShard.stage`: experts the shard already
holds are copied, only the new ones are read from the checkpoint), then :meth:`ExpertShard.step` switches to it at
the step the executor names and drops the old weights. Meanwhile the shard holds both (room for one more copy of its
experts)."""

from __future__ import annotations

import logging
import os
import time

import torch

from k2ray import logs
from k2ray.checkpoint.loader import WeightLoader, fill_experts, refill_experts
from k2ray.config import EngineConfig, ModelArgs
from k2ray.model.moe import RoutedExperts
from k2ray.parallel.dispatch import ExpertServer
from k2ray.parallel.groups import GroupLayout, init_group
from k2ray.workers.node import node_id, node_ip
from k2ray.workers.staging import Stager

log = logging.getLogger(__name__)


class ExpertShard:
    def __init__(
        self,
        model_dir: str,
        engine: EngineConfig,
        layout: GroupLayout,
        shard: int,
        layer_experts: list[list[int]],
        device: str = "cpu",
        threads: int = 1,
        placement_version: int = 0,
    ):
        """``layer_experts[i]``: the logical expert of each local slot in the i-th MoE layer."""
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.layout, self.shard, self.device = layout, shard, device
        self.layer_experts = [list(e) for e in layer_experts]
        self.version = placement_version
        self.dtype = engine.torch_dtype
        t0 = time.perf_counter()
        self.args = ModelArgs.from_dir(model_dir)
        if len(self.layer_experts) != len(self.args.moe_layers):
            raise ValueError(f"{len(self.layer_experts)} expert lists for {len(self.args.moe_layers)} MoE layers")
        self.int4 = engine.experts_int4(self.args, device)
        self.loader = WeightLoader(model_dir, self.args, self.dtype)
        self.layers = []
        for layer, experts in zip(self.args.moe_layers, self.layer_experts):
            mod = RoutedExperts(self.args, num_local=len(experts), dtype=self.dtype, int4=self.int4)
            fill_experts(mod, self.loader, layer, experts)
            self.layers.append(mod.to(device))
        self.tensors_read = list(self.loader.index.tensors_read)
        self.load_s = time.perf_counter() - t0
        logs.configure()
        log.info("expert shard %d (pid %d): %d expert slots x %d MoE layers loaded in %.1fs on %s", shard,
                 os.getpid(), self.width, len(self.layers), self.load_s, device)
        self.server: ExpertServer | None = None
        self.stager = Stager()

    @property
    def experts(self) -> list[int]:
        """Every logical expert this shard holds in some layer."""
        return sorted({e for layer in self.layer_experts for e in layer})

    @property
    def width(self) -> int:
        return max(len(e) for e in self.layer_experts)

    def ping(self) -> bool:
        """The router's idle heartbeat: answers at once (queued behind a running step, which a busy group has)."""
        return True

    def ready(self) -> dict:
        return {"node_ip": node_ip(), "node_id": node_id(), "pid": os.getpid(), "experts": self.experts,
                "placement_version": self.version,
                "tensors_read": len(self.tensors_read), "load_s": self.load_s}

    def read_tensor_names(self) -> list[str]:
        """Every checkpoint tensor this shard has read (at start, then by stagings)."""
        return list(self.loader.index.tensors_read)

    def staged_version(self) -> int | None:
        return self.stager.report()["staged"]

    def join_group(self, backend: str, address: str, port: int, timeout_s: float) -> None:
        init_group(backend, address, port, self.layout.shard_rank(self.shard), self.layout.world_size, timeout_s)
        a = self.args
        self.server = ExpertServer(
            self.layout, self.shard, self.layers, a.hidden_size, a.num_experts_per_tok, self.dtype, self.width,
            device=self.device,
        )

    def stage(self, version: int, layer_experts: list[list[int]]) -> None:
        """Load the assignment of placement ``version`` in the background (returns at once)."""
        self.stager.start(version, lambda: self._build(layer_experts))

    @torch.inference_mode()
    def _build(self, layer_experts: list[list[int]]) -> tuple[list[list[int]], list[RoutedExperts]]:
        t0 = time.perf_counter()
        layers, read = [], 0
        for i, (layer, experts) in enumerate(zip(self.args.moe_layers, layer_experts)):
            mod = RoutedExperts(self.args, num_local=len(experts), dtype=self.dtype, int4=self.int4).to(self.device)
            read += len(refill_experts(mod, experts, self.layers[i], self.layer_experts[i], self.loader, layer))
            layers.append(mod)
        log.info("expert shard %d: next placement staged in %.2fs (%d experts read from the checkpoint)",
                 self.shard, time.perf_counter() - t0, read)
        return [list(e) for e in layer_experts], layers

    @torch.inference_mode()
    def step(self, tokens_per_worker: list[int], switch: int | None = None) -> dict:
        """One step's MoE layers; with ``switch``, first serve the staged placement of that version."""
        pause = None
        if switch is not None:
            t0 = time.perf_counter()
            self.layer_experts, self.layers = self.stager.take(switch)  # the old modules are dropped here
            self.version = switch
            self.server.set_experts(self.layers, self.width)
            pause = time.perf_counter() - t0
        d = self.server.run_step(tokens_per_worker)
        d.update(self.stager.report())
        if pause is not None:
            d["switch_s"] = pause
        return d
