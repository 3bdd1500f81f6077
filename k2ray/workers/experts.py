"""ExpertShard: the routed experts assigned to this shard, per MoE layer; reads only their tensors.

A live rebalance stages the new assignment in the background (:meth:`ExpertShard.stage` reads only the experts new
to the shard from the checkpoint, into a small buffer), then :meth:`ExpertShard.step` switches to it at the step the
executor names: the new experts overwrite, in place, the slots of the experts the shard no longer serves. The extra
memory is the staged experts only, and the pause a copy of them on the device."""

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
from k2ray.workers.staging import Stager

log = logging.getLogger(__name__)


class _Slots:
    """Some slots of a module's experts, in a given order, as a source for :meth:`RoutedExperts.put`."""

    def __init__(self, mod: RoutedExperts, slots: list[int]):
        for name in mod.weight_names:
            setattr(self, name, getattr(mod, name)[slots].clone())
        self.weight_names = mod.weight_names


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

    def staging(self) -> dict:
        """The staged version and a staging error (a resize waits on this while the group is idle)."""
        return self.stager.report()

    def regroup(self, layout: GroupLayout, switch: int | None, backend: str, address: str, port: int,
                timeout_s: float) -> None:
        """A pool resize's switch: take up the staged placement ``switch`` (if any), then join the group's new
        process group under ``layout`` (this shard keeps its index; its rank follows the attention workers)."""
        if switch is not None:
            self._switch(switch)
        self.layout = layout
        self.join_group(backend, address, port, timeout_s)

    def join_group(self, backend: str, address: str, port: int, timeout_s: float) -> None:
        init_group(backend, address, port, self.layout.shard_rank(self.shard), self.layout.world_size, timeout_s)
        a = self.args
        self.server = ExpertServer(
            self.layout, self.shard, self.layers, a.hidden_size, a.num_experts_per_tok, self.dtype, self.width,
            device=self.device,
        )

    def stage(self, version: int, layer_experts: list[list[int]]) -> None:
        """Load the experts that placement ``version`` newly assigns to this shard, in the background (returns at
        once). ``layer_experts`` keeps every expert the shard still serves in its slot (``eplb.align``)."""
        self.stager.start(version, lambda: self._read_new(layer_experts))

    @torch.inference_mode()
    def _read_new(self, layer_experts: list[list[int]]) -> tuple[list[list[int]], list[RoutedExperts]]:
        """Per layer, the experts new to this shard in a small module of their own (read from the checkpoint)."""
        t0 = time.perf_counter()
        staged = []
        for layer, old, new in zip(self.args.moe_layers, self.layer_experts, layer_experts):
            fresh = [e for e in new if e not in old]
            mod = RoutedExperts(self.args, num_local=len(fresh), dtype=self.dtype, int4=self.int4)
            fill_experts(mod, self.loader, layer, fresh)
            staged.append(mod.to(self.device))
        log.info("expert shard %d: next placement staged in %.2fs (%d experts read)", self.shard,
                 time.perf_counter() - t0, sum(m.num_local for m in staged))
        return [list(e) for e in layer_experts], staged

    def _switch(self, version: int) -> None:
        """Take up the staged placement in place: new experts overwrite the slots of dropped ones (a shard with fewer
        slots than before moves experts from its tail into the holes)."""
        layer_experts, staged = self.stager.take(version)
        for mod, old, new, fresh in zip(self.layers, self.layer_experts, layer_experts, staged):
            moved = [(j, old.index(e)) for j, e in enumerate(new) if e in old and (j >= len(old) or old[j] != e)]
            tail = _Slots(mod, [i for _, i in moved])  # copied before anything is overwritten
            mod.resize(len(new))
            mod.put([new.index(e) for e in new if e not in old], fresh)
            mod.put([j for j, _ in moved], tail)
        self.layer_experts, self.version = layer_experts, version
        if self.server is not None:
            self.server.set_experts(self.layers, self.width)

    @torch.inference_mode()
    def step(self, tokens_per_worker: list[int], switch: int | None = None) -> dict:
        """One step's MoE layers; with ``switch``, first serve the staged placement of that version."""
        pause = None
        if switch is not None:
            t0 = time.perf_counter()
            self._switch(switch)
            pause = time.perf_counter() - t0
        d = self.server.run_step(tokens_per_worker)
        d.update(self.stager.report())
        if pause is not None:
            d["switch_s"] = pause
        return d
