"""Per-step metrics of a model group, recorded around its executor (never on the model's own path)."""

from __future__ import annotations

import logging
import threading
import time

from k2ray import metrics
from k2ray.runtime.step import Executor

log = logging.getLogger("k2ray.serve.step_metrics")


class MeteredExecutor:
    """The group's executor (:class:`~k2ray.runtime.step.Executor`) seen through a wrapper that records per-step
    metrics: step time by phase, mean all-to-all time per exchange, tokens per (expert, shard), the shards'
    balancedness per MoE layer and live rebalances (EPLB)."""

    def __init__(self, inner: Executor, model: str, expert_shards: int):
        self.inner = inner
        self._model = model
        self._step = {ph: metrics.STEP_SECONDS.labels(model=model, phase=ph) for ph in ("prefill", "decode", "mixed")}
        self._a2a = {op: metrics.ALL_TO_ALL_SECONDS.labels(model=model, op=op) for op in ("dispatch", "combine")}
        args = inner.args
        self._exchanges = max(1, len(args.moe_layers)) * inner.num_attention_workers
        shards = expert_shards
        # Flushed by the router's poller thread (flush_expert_load), not on the step path.
        # Per-layer series only when the flag is on (K2RAY_METRICS_PER_LAYER_EXPERTS=1): then counts are 3-D.
        self._per_layer = metrics.get_registry().per_layer_experts
        self._layers = list(args.moe_layers)
        self._tracker = metrics.ExpertLoadTracker(
            model, args.n_routed_experts, shards, interval_s=float("inf"),
            **({"num_layers": len(self._layers), "layer_ids": self._layers} if self._per_layer else {}),
        )
        self._tracker_lock = threading.Lock()
        self._shards = shards
        self._rebalances = metrics.EPLB_REBALANCES_TOTAL.labels(model=model)
        self._switch_pause = metrics.POOL_RESIZE_PAUSE_SECONDS.labels(model=model)
        self._pool_workers = {pool: metrics.POOL_WORKERS.labels(model=model, pool=pool)
                              for pool in ("attention_workers", "expert_shards")}
        self._switch = metrics.EPLB_SWITCH_SECONDS.labels(model=model)

    # -- the Executor contract, forwarded ---------------------------------------------------------------------------
    args = property(lambda self: self.inner.args)
    block_size = property(lambda self: self.inner.block_size)
    num_kv_blocks = property(lambda self: self.inner.num_kv_blocks)
    num_attention_workers = property(lambda self: self.inner.num_attention_workers)
    failed = property(lambda self: self.inner.failed)

    def describe(self) -> dict:
        return self.inner.describe()

    def rebuild(self) -> None:
        self.inner.rebuild()

    def heartbeat(self, timeout_s: float) -> str | None:
        return self.inner.heartbeat(timeout_s)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def rebalance(self) -> dict:
        """Plan and stage a new expert placement now (see :meth:`k2ray.executor.ray.RayExecutor.rebalance`)."""
        if not hasattr(self.inner, "rebalance"):
            raise ValueError("expert rebalancing needs the Ray executor (parallel.executor: ray)")
        return self.inner.rebalance()

    # -- elastic pools ----------------------------------------------------------------------------------------------
    def resize(self, attention_workers: int | None = None, expert_shards: int | None = None,
               reason: str = "admin") -> dict:
        """Start resizing the pools (see :meth:`k2ray.executor.ray.RayExecutor.resize`)."""
        if not hasattr(self.inner, "resize"):
            raise ValueError("resizing needs the Ray executor (parallel.executor: ray)")
        return self.inner.resize(attention_workers, expert_shards, reason=reason)

    def pending_layout(self):
        pending = getattr(self.inner, "pending_layout", None)
        return pending() if pending is not None else None

    def switch_layout(self) -> dict:
        self.flush_expert_load()  # the load so far belongs to the old shard count
        record = self.inner.switch_layout()
        try:
            self._switch_pause.observe(record["pause_s"])
            for pool, n in record["to"].items():
                was = record["from"][pool]
                if n != was:
                    metrics.POOL_RESIZES_TOTAL.inc(model=self._model, pool=pool, direction="up" if n > was else "down")
            self._exchanges = max(1, len(self.inner.args.moe_layers)) * self.inner.num_attention_workers
        except Exception:
            log.debug("resize metrics failed", exc_info=True)
        return record

    def take_expert_wait(self) -> float:
        take = getattr(self.inner, "take_expert_wait", None)
        return take() if take is not None else 0.0

    def execute(self, step):
        t0 = time.perf_counter()
        out = self.inner.execute(step)
        dt = time.perf_counter() - t0
        if step.seqs:
            try:
                prefill = any(len(s.token_ids) > 1 or s.sample is None for s in step.seqs)
                decode = any(len(s.token_ids) == 1 and s.sample is not None for s in step.seqs)
                phase = "mixed" if prefill and decode else ("prefill" if prefill else "decode")
                self._step[phase].observe(dt)
                stats = out.stats or {}
                for op in ("dispatch", "combine"):
                    v = stats.get(f"{op}_s")
                    if v:
                        self._a2a[op].observe(v / self._exchanges)
                if "eplb_switch_s" in stats:
                    self._rebalances.inc()
                    self._switch.observe(stats["eplb_switch_s"])
                et = stats.get("expert_tokens")
                if et:
                    import numpy as np

                    n_exp = self.inner.args.n_routed_experts
                    if self._per_layer:
                        counts = np.zeros((len(self._layers), n_exp, self._shards), dtype=np.int64)
                        index = {layer: i for i, layer in enumerate(self._layers)}
                        for (layer, e, s), n in stats.get("expert_layer_tokens", {}).items():
                            counts[index[layer], e, s] += n
                    else:
                        counts = np.zeros((n_exp, self._shards), dtype=np.int64)
                        for (e, s), n in et.items():
                            counts[e, s] += n
                    with self._tracker_lock:
                        self._tracker.add(counts)
            except Exception:  # metrics never break a step
                log.debug("step metrics failed", exc_info=True)
        return out

    def flush_expert_load(self) -> None:
        """The poller's once-a-second export: expert load, balancedness and the pools' sizes."""
        layout = getattr(self.inner, "layout", None)  # an elastic expert pool may be below the tracker's max
        with self._tracker_lock:
            self._tracker.flush(layout.expert_shards if layout is not None else None)
        self._pool_workers["attention_workers"].set(self.inner.num_attention_workers)
        self._pool_workers["expert_shards"].set(layout.expert_shards if layout is not None else 1)
        per_layer = self.inner.balancedness() if hasattr(self.inner, "balancedness") else None
        if per_layer:
            for layer, b in per_layer.items():
                metrics.EXPERT_BALANCEDNESS.set(b, model=self._model, layer=str(layer))
            metrics.EXPERT_BALANCEDNESS.set(sum(per_layer.values()) / len(per_layer), model=self._model,
                                            layer="mean")
