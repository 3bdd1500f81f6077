"""ExpertShard: the routed experts assigned to this shard, for every MoE layer; reads only their tensors."""

from __future__ import annotations

import logging
import os
import time

import torch

from k2ray import logs
from k2ray.checkpoint.loader import WeightLoader, fill_experts
from k2ray.config import EngineConfig, ModelArgs
from k2ray.model.moe import RoutedExperts
from k2ray.parallel.dispatch import ExpertServer
from k2ray.parallel.groups import GroupLayout, init_group
from k2ray.workers.node import node_id, node_ip

log = logging.getLogger(__name__)


class ExpertShard:
    def __init__(
        self,
        model_dir: str,
        engine: EngineConfig,
        layout: GroupLayout,
        shard: int,
        experts: list[int],
        device: str = "cpu",
        threads: int = 1,
    ):
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.layout, self.shard, self.experts, self.device = layout, shard, list(experts), device
        self.dtype = engine.torch_dtype
        t0 = time.perf_counter()
        self.args = ModelArgs.from_dir(model_dir)
        int4 = engine.experts_int4(self.args, device)
        loader = WeightLoader(model_dir, self.args, self.dtype)
        self.layers = []
        for layer in self.args.moe_layers:
            mod = RoutedExperts(self.args, num_local=len(self.experts), dtype=self.dtype, int4=int4)
            fill_experts(mod, loader, layer, self.experts)
            self.layers.append(mod.to(device))
        self.tensors_read = list(loader.index.tensors_read)
        self.load_s = time.perf_counter() - t0
        logs.configure()
        log.info("expert shard %d (pid %d): %d experts x %d MoE layers loaded in %.1fs on %s", shard, os.getpid(),
                 len(self.experts), len(self.layers), self.load_s, device)
        self.server: ExpertServer | None = None

    def ping(self) -> bool:
        """The router's idle heartbeat: answers at once (queued behind a running step, which a busy group has)."""
        return True

    def ready(self) -> dict:
        return {"node_ip": node_ip(), "node_id": node_id(), "pid": os.getpid(), "experts": self.experts,
                "tensors_read": len(self.tensors_read), "load_s": self.load_s}

    def read_tensor_names(self) -> list[str]:
        return self.tensors_read

    def join_group(self, backend: str, address: str, port: int, timeout_s: float) -> None:
        init_group(backend, address, port, self.layout.shard_rank(self.shard), self.layout.world_size, timeout_s)
        a = self.args
        self.server = ExpertServer(
            self.layout, self.shard, self.layers, a.hidden_size, a.num_experts_per_tok, self.dtype, len(self.experts),
            device=self.device,
        )

    @torch.inference_mode()
    def step(self, tokens_per_worker: list[int]) -> dict:
        return self.server.run_step(tokens_per_worker)
