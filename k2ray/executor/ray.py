"""The Ray executor: one model group = A attention workers + E expert shards in one placement group.

The object that owns it (``LLM`` in-process, or the K2Router Serve replica) drives the step loop: per step one Ray
call per worker (the sequences split by attention rank, plus every worker's token count); tensors between workers travel
only through the group's collectives. Any failure — a dead actor, a stalled collective — tears the group down and
raises :class:`ExecutorError` within ``collective_timeout_s``; :meth:`RayExecutor.rebuild` starts a fresh group.
Between steps, :meth:`RayExecutor.heartbeat` finds a worker that died while the group was idle.

Expert load balancing (EPLB): the executor keeps the last ``parallel.eplb.window_steps`` steps of expert load per MoE
layer (:class:`~k2ray.parallel.load_window.LoadWindow`). :meth:`RayExecutor.rebalance` (on demand, or every
``interval_steps`` from a background thread) plans a per-layer placement with redundant copies
(:func:`k2ray.parallel.eplb.plan`) and has every worker stage it in the background; once every worker reports it
staged (in a step's stats), the next step carries ``switch=version`` to all of them, so the whole group changes tables
at one step boundary. Requests in flight go on; only which copy computes a token changes.

Elastic pools: :meth:`RayExecutor.resize` grows or shrinks the attention and expert pools while the group serves.
In a background thread it reserves the added workers (a placement group of their bundles only, checked against the
cluster first), starts and loads them, plans the expert placement for the new shard count and has the kept shards
stage the experts new to them — all while the old layout keeps stepping. The engine meanwhile drains the attention
workers being removed (:attr:`pending_layout`); at a step boundary :meth:`switch_layout` has every kept and new
worker join a new process group (the pause), and the removed workers stop. Workers keep their index (removed ones
are the last), so sequences keep their cache on their attention worker. The bundles reserved at start stay reserved
(growing back to the starting layout never waits); a placement group added by a resize goes with its workers.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k2ray.config import EngineConfig, ModelArgs, ParallelConfig
from k2ray.runtime.step import PendingLayout, StepInput, StepOutput
import numpy as np

from k2ray.parallel import eplb
from k2ray.parallel.groups import GroupLayout
from k2ray.parallel.load_window import LoadWindow
from k2ray.parallel.placement import ExpertPlacement, PerLayerPlacement, check_cluster_fits
from k2ray.workers.attention import AttentionWorker
from k2ray.workers.experts import ExpertShard

log = logging.getLogger(__name__)

_RemoteAttention = ray.remote(AttentionWorker)
_RemoteShard = ray.remote(ExpertShard)


class ExecutorError(RuntimeError):
    """The model group failed (a worker died or a collective stalled); in-flight steps are lost."""


class RayExecutor:
    def __init__(
        self,
        model_dir: str | Path,
        engine: EngineConfig | None = None,
        parallel: ParallelConfig | None = None,
        placement_group: PlacementGroup | None = None,
        bundle_offset: int = 0,
        ready_timeout_s: float = 300.0,
    ):
        self.model_dir = str(model_dir)
        self.engine = engine or EngineConfig()
        self.parallel = parallel or ParallelConfig(executor="ray")
        self.args = ModelArgs.from_dir(model_dir)
        self.parallel.check_against(self.args)
        self._initial_parallel = self.parallel
        self.block_size = self.engine.block_size
        self.num_kv_blocks = self.engine.kv_blocks_for(self.args)
        self._external_pg = placement_group
        self._bundle_offset = bundle_offset if placement_group is not None else 0
        self._ready_timeout_s = ready_timeout_s
        self.failed: str | None = None
        self._eplb_lock = threading.Lock()  # the placement and the rebalance state (engine and router threads)
        self._resize: _Resize | None = None  # a pool resize being prepared
        self._workers_lock = threading.Lock()  # a resize's switch replaces the workers; the heartbeat must not ping
        # the removed ones meanwhile
        self.resizes: list[dict] = []  # every finished or abandoned resize, oldest first
        self._expert_wait_s = self._execute_s = 0.0  # the policy's expert-pool signal, since the last take
        self._start()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _start(self) -> None:
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        p = self.parallel
        self.layout = GroupLayout(p.attention_workers, p.expert_shards)
        self.num_attention_workers = p.attention_workers
        n = self.layout.world_size
        if self._external_pg is None:
            if p.validate_cluster:
                check_cluster_fits(p, ray.nodes())
            bundles = [b or {"CPU": 0.01} for b in p.bundles()]
            selectors = p.bundle_label_selectors()
            self.pg = placement_group(
                bundles, strategy=p.placement_strategy,
                bundle_label_selector=selectors if any(selectors) else None,
            )
            ready, _ = ray.wait([self.pg.ready()], timeout=self._ready_timeout_s)
            if not ready:
                remove_placement_group(self.pg)
                self.pg = None
                raise ExecutorError(
                    f"cannot reserve {n} bundles {bundles} (attention_workers={p.attention_workers} + "
                    f"expert_shards={p.expert_shards}) within {self._ready_timeout_s:.0f}s; "
                    f"cluster resources: {ray.cluster_resources()}"
                )
        else:
            self.pg = self._external_pg
        # Bundle -> node, so redundant expert copies can be spread over nodes and the layout reported.
        bundle_nodes = ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {})
        self.bundle_nodes = [bundle_nodes.get(self._bundle_offset + i) for i in range(n)]
        self.shard_nodes = [str(x) for x in self.bundle_nodes[p.attention_workers :]]
        n_moe = len(self.args.moe_layers)
        self.placement = self._contiguous_placement(p.expert_shards, self.shard_nodes, version=0)
        self.window = LoadWindow(n_moe, self.args.n_routed_experts, p.expert_shards, p.eplb.window_steps)
        self._staging: PerLayerPlacement | None = None  # sent to the workers to stage, not switched to yet
        self._switch_ready = False  # every worker reported the staging done: the next step switches
        self._planning = False  # a periodic plan is being made in the background
        self._steps_since_plan = 0

        self.attention = [self._new_attention(i, self.layout, self.placement, self.pg, self._bundle_offset + i)
                          for i in range(self.layout.attention_workers)]
        self.shards = [
            self._new_shard(s, self.layout, self.placement, self.pg, self._bundle_offset + p.attention_workers + s)
            for s in range(self.layout.expert_shards)
        ]
        self._added_pgs: list[tuple[PlacementGroup, list]] = []  # placement groups of resizes, with their workers
        t0 = time.perf_counter()
        infos = self._get([w.ready.remote() for w in self.workers], self._ready_timeout_s, "loading weights")
        self.worker_info = infos
        address, port = self._get([self.attention[0].rendezvous.remote()], 60, "rendezvous")[0]
        timeout = p.collective_timeout_s
        self._get(
            [w.join_group.remote(p.collective_backend, address, port, timeout) for w in self.workers],
            timeout + 30,
            "joining the process group",
        )
        self.failed = None
        log.debug("model group ready in %.1fs: %s", time.perf_counter() - t0, self.describe())

    def _contiguous_placement(self, n_shards: int, shard_nodes: list[str], version: int) -> PerLayerPlacement:
        """Experts split contiguously over ``n_shards``, the same in every layer, with room for the EPLB copies from
        the start (the first experts until a plan knows the hot ones), so a rebalance does not grow the shards. A
        single shard holds every expert already: nothing to copy."""
        p = self.parallel
        redundant = p.redundant_experts or (p.eplb.redundant_slots_per_shard * n_shards if n_shards > 1 else 0)
        base = ExpertPlacement.contiguous(self.args.n_routed_experts, n_shards, redundant, shard_nodes=shard_nodes)
        return PerLayerPlacement.uniform(base, len(self.args.moe_layers), version)

    def _options(self, pool: str, pg: PlacementGroup, bundle_index: int) -> dict:
        bundle = self.parallel.pool_bundle(pool)
        return dict(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")} or None,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle_index
            ),
        )

    def _new_attention(self, i: int, layout: GroupLayout, placement, pg: PlacementGroup, bundle: int):
        p = self.parallel
        return _RemoteAttention.options(**self._options("attention", pg, bundle)).remote(
            self.model_dir, self.engine, layout, i, placement, p.device, max(1, int(p.cpus_per_worker)),
            p.overlap_shared_expert,
        )

    def _new_shard(self, s: int, layout: GroupLayout, placement: PerLayerPlacement, pg: PlacementGroup, bundle: int):
        p = self.parallel
        return _RemoteShard.options(**self._options("experts", pg, bundle)).remote(
            self.model_dir, self.engine, layout, s, placement.shard_layers(s), p.device,
            max(1, int(p.cpus_per_worker)), placement.version,
        )

    @property
    def workers(self) -> list:
        return self.attention + self.shards

    def describe(self) -> dict:
        p = self.parallel
        return {
            "attention_workers": [
                {"rank": i, "node_id": info.get("node_id"), "node_ip": info.get("node_ip"), "pid": info.get("pid")}
                for i, info in enumerate(self.worker_info[: p.attention_workers])
            ],
            "expert_shards": [
                {
                    "shard": s,
                    "rank": p.attention_workers + s,
                    "node_id": info.get("node_id"),
                    "node_ip": info.get("node_ip"),
                    "pid": info.get("pid"),
                    "experts": sorted({e for layer in self.placement.shard_layers(s) for e in layer}),
                }
                for s, info in enumerate(self.worker_info[p.attention_workers :])
            ],
            "placement_version": self.placement.version,
            "pending_resize": None if self._resize is None else self._resize.describe(),
            "resizes": self.resizes[-10:],
            "backend": p.collective_backend,
            "strategy": p.placement_strategy,
        }

    def _teardown(self) -> None:
        _kill(getattr(self, "attention", []) + getattr(self, "shards", []))
        self.attention, self.shards = [], []

    def _release_added(self) -> None:
        """Remove every placement group a resize added (its workers are gone)."""
        for pg, _ in getattr(self, "_added_pgs", []):
            _remove(pg)
        self._added_pgs = []

    def shutdown(self) -> None:
        self._abandon_resize("the group shuts down")
        self._teardown()
        self._release_added()
        if self._external_pg is None and getattr(self, "pg", None) is not None:
            _remove(self.pg)
            self.pg = None

    def heartbeat(self, timeout_s: float = 1.0) -> str | None:
        """Ping every worker (call it between steps, from any thread): why the group is broken if a worker is dead
        (``failed`` is set then; the owner rebuilds), else None. A worker that is merely slow to answer within
        ``timeout_s`` is not judged: a stalled group is found by the next step's collective timeout."""
        if self.failed:
            return self.failed
        with self._workers_lock:
            return self._ping_all(timeout_s)

    def _ping_all(self, timeout_s: float) -> str | None:
        names = [f"attention worker {i}" for i in range(len(self.attention))]
        names += [f"expert shard {s}" for s in range(len(self.shards))]
        workers = self.attention + self.shards
        if not workers:
            return None
        refs = [w.ping.remote() for w in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        for name, ref in zip(names, refs):
            if ref not in done:
                continue
            try:
                ray.get(ref, timeout=0)
            except Exception as e:
                # The cause (with the actor's pid and address) goes to the log only; the reason stays short.
                log.error("model group: %s died while idle: %s", name, _short(e))
                self.failed = f"model group: {name} died (found while idle)"
                return self.failed
        return None

    def rebuild(self) -> None:
        """Replace every actor of the group (new processes, new process group, weights reloaded), in the layout it
        started with."""
        self._abandon_resize("the group is rebuilt")
        self._teardown()
        self._release_added()
        self.parallel = self._initial_parallel
        self._start()

    # -- stepping -----------------------------------------------------------------------------------------------
    def _get(self, refs: list, timeout_s: float, what: str) -> list:
        """Wait for all refs; the first error or the deadline fails the whole group (no hang)."""
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"model group: {what} did not finish within {timeout_s:.0f}s")
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for r in ready:
                try:
                    ray.get(r)
                except Exception as e:  # RayActorError, a worker exception, ...
                    self._fail(f"model group: {what} failed: {_short(e)}")
        return ray.get(list(refs))

    def _fail(self, msg: str):
        self.failed = msg
        log.error(msg)
        self._teardown()
        raise ExecutorError(msg)

    def execute(self, step: StepInput) -> StepOutput:
        if self.failed:
            raise ExecutorError(self.failed)
        by_rank = [[] for _ in range(self.num_attention_workers)]
        for s in step.seqs:
            by_rank[s.attention_rank].append(s)
        counts = [sum(len(s.token_ids) for s in seqs) for seqs in by_rank]
        with self._eplb_lock:
            new = self._staging if self._switch_ready else None
        switch = new.version if new is not None else None
        t0 = time.perf_counter()
        refs = [w.execute.remote(seqs, counts, switch) for w, seqs in zip(self.attention, by_rank)]
        refs += [s.step.remote(counts, switch) for s in self.shards]
        out = self._get(refs, self.parallel.collective_timeout_s + 10, "step")
        self._execute_s += time.perf_counter() - t0
        worker_stats = [st for _res, st in out[: self.num_attention_workers]] + out[self.num_attention_workers :]
        results = {}
        stats = {"dispatch_s": 0.0, "combine_s": 0.0, "expert_tokens": {}, "expert_layer_tokens": {}}
        if new is not None:
            with self._eplb_lock:
                self.placement, self._staging, self._switch_ready = new, None, False
                self.window.clear()  # shard loads under the old table say nothing of the new one
                self._steps_since_plan = 0
            stats["eplb_switch_s"] = max(st.get("switch_s", 0.0) for st in worker_stats)
            stats["eplb_version"] = new.version
            log.info("model group switched to expert placement version %d (pause %.1f ms)", new.version,
                     1e3 * stats["eplb_switch_s"])
        for res, st in out[: self.num_attention_workers]:
            results.update({r.seq_id: r for r in res})
            stats["dispatch_s"] += st["dispatch_s"]
            stats["combine_s"] += st["combine_s"]
        self._expert_wait_s += (stats["dispatch_s"] + stats["combine_s"]) / self.num_attention_workers
        layers = self.args.moe_layers
        placement = self.placement
        e_load = np.zeros((len(layers), self.args.n_routed_experts), dtype=np.int64)
        s_load = np.zeros((len(layers), self.layout.expert_shards), dtype=np.int64)
        for s, st in enumerate(out[self.num_attention_workers :]):
            for li, row in enumerate(st.get("expert_layer_tokens", [])):  # (model layer, expert, shard) -> tokens
                local = placement.layers[li].shard_experts[s]
                for slot, n in enumerate(row):
                    if n:
                        e = local[slot]
                        key = (layers[li], e, s)
                        stats["expert_layer_tokens"][key] = stats["expert_layer_tokens"].get(key, 0) + n
                        stats["expert_tokens"][(e, s)] = stats["expert_tokens"].get((e, s), 0) + n
                        e_load[li, e] += n
                        s_load[li, s] += n
        if s_load.any():
            with self._eplb_lock:
                self.window.add(e_load, s_load)
        self._after_step(worker_stats)
        return StepOutput(results=results, stats=stats)

    # -- expert load balancing ---------------------------------------------------------------------------------------
    def _after_step(self, worker_stats: list[dict]) -> None:
        """Notice a finished (or failed) staging; start a periodic plan when one is due."""
        cfg = self.parallel.eplb
        with self._eplb_lock:
            if self._staging is not None and not self._switch_ready:
                errors = [st["stage_error"] for st in worker_stats if st.get("stage_error")]
                if errors:
                    log.error("staging expert placement version %d failed, keeping version %d: %s",
                              self._staging.version, self.placement.version, errors[0])
                    self._staging = None
                elif all(st.get("staged") == self._staging.version for st in worker_stats):
                    self._switch_ready = True
            self._steps_since_plan += 1
            due = (cfg.interval_steps and self._staging is None and not self._planning
                   and self._steps_since_plan >= cfg.interval_steps and self.window.steps >= cfg.window_steps)
            if due:
                self._planning, self._steps_since_plan = True, 0
        if due:
            threading.Thread(target=self._periodic_rebalance, name="k2ray-eplb-plan", daemon=True).start()

    def _periodic_rebalance(self) -> None:
        try:
            result = self.rebalance(min_gain=0.01)  # not for less than a point of balancedness: weights move
            log.info("periodic expert rebalance: %s", {k: v for k, v in result.items() if k != "layers"})
        except Exception:
            log.exception("periodic expert rebalance failed")
        finally:
            with self._eplb_lock:
                self._planning = False

    def redundant_slots_per_shard(self) -> int:
        """``eplb.redundant_slots_per_shard``, else as many as ``redundant_experts`` gives each shard."""
        p = self.parallel
        return p.eplb.redundant_slots_per_shard or -(-p.redundant_experts // p.expert_shards)

    def rebalance(self, min_gain: float = 0.0) -> dict:
        """Plan a placement from the load window and have every worker stage it (returns without waiting; the group
        switches at the first step after all workers staged it). The answer gives the mean balancedness over MoE
        layers that the current and the new placement would have had on the window's load, and per layer."""
        with self._eplb_lock:
            current, loads, steps, busy = self.placement, self.window.expert_load(), self.window.steps, self._staging
        base = {"version": current.version, "window_steps": steps}
        if self._resize is not None:
            return {**base, "started": False, "reason": "a pool resize is under way"}
        if busy is not None:
            return {**base, "started": False, "reason": f"placement version {busy.version} is being staged"}
        if not any(any(row) for row in loads):
            return {**base, "started": False, "reason": "no expert load measured yet"}
        new = eplb.plan(loads, self.layout.expert_shards, self.redundant_slots_per_shard(), self.shard_nodes,
                        version=current.version + 1)
        new = eplb.align(new, current)  # experts a shard keeps stay in their slots: only new ones are loaded
        old_b = eplb.predicted_balancedness(current, loads)
        new_b = eplb.predicted_balancedness(new, loads)
        out = {**base, "old_balancedness": sum(old_b) / len(old_b), "new_balancedness": sum(new_b) / len(new_b),
               "layers": {str(layer): {"old": o, "new": n}
                          for layer, o, n in zip(self.args.moe_layers, old_b, new_b)}}
        if new.layers == current.layers or out["new_balancedness"] < out["old_balancedness"] + min_gain:
            return {**out, "started": False, "reason": "the current placement is as balanced"}
        with self._eplb_lock:
            if self._staging is not None or self.placement is not current or self._resize is not None:
                return {**out, "started": False, "reason": "another rebalance or a resize got there first"}
            self._staging, self._switch_ready = new, False
        # Both return at once (the workers stage in background threads); a dead worker shows in the next step.
        for w in self.attention:
            w.stage.remote(new)
        for s, shard in enumerate(self.shards):
            shard.stage.remote(new.version, new.shard_layers(s))
        log.info("expert placement version %d staging: predicted balancedness %.3f -> %.3f", new.version,
                 out["old_balancedness"], out["new_balancedness"])
        return {**out, "version": new.version, "started": True}

    def balancedness(self) -> dict[int, float] | None:
        """Measured mean / max of the shards' tokens over the load window, per MoE layer id (None: no load yet)."""
        with self._eplb_lock:
            b = self.window.balancedness()
        return None if b is None else dict(zip(self.args.moe_layers, b))

    # -- elastic pools ------------------------------------------------------------------------------------------------
    def bounds(self, pool: str) -> tuple[int, int]:
        """(min, max) of ``pool`` ("attention_workers" or "expert_shards") as configured for this group."""
        return self._initial_parallel.pool_bounds(pool)

    def resize(self, attention_workers: int | None = None, expert_shards: int | None = None,
               reason: str = "admin") -> dict:
        """Start resizing the pools to the given sizes (None: unchanged), within ``parallel.elastic``'s ranges.
        Returns at once; the new workers are prepared in the background and the engine switches the group to them
        at a step boundary (:attr:`pending_layout`, :meth:`switch_layout`)."""
        cur = {"attention_workers": self.layout.attention_workers, "expert_shards": self.layout.expert_shards}
        want = {"attention_workers": attention_workers, "expert_shards": expert_shards}
        target = {k: cur[k] if v is None else v for k, v in want.items()}
        for pool, n in target.items():
            lo, hi = self.bounds(pool)
            if not isinstance(n, int) or not lo <= n <= hi:
                raise ValueError(f"{pool}={n} is outside parallel.elastic.{pool} (min {lo}, max {hi})")
        base = {"from": cur, "to": target}
        if self.failed:
            return {**base, "started": False, "reason": self.failed}
        if target == cur:
            return {**base, "started": False, "reason": "the group has that size already"}
        with self._eplb_lock:
            if self._resize is not None:
                return {**base, "started": False, "reason": "another resize is under way"}
            if self._staging is not None:
                return {**base, "started": False, "reason": "an expert rebalance is being staged"}
            drain = self._initial_parallel.elastic.drain_timeout_s
            self._resize = r = _Resize(target["attention_workers"], target["expert_shards"], reason,
                                       time.monotonic() + drain)
        log.info("model group resize (%s): attention workers %d -> %d, expert shards %d -> %d", reason,
                 cur["attention_workers"], r.attention_workers, cur["expert_shards"], r.expert_shards)
        threading.Thread(target=self._prepare_resize, args=(r,), name="k2ray-resize", daemon=True).start()
        return {**base, "started": True}

    def pending_layout(self) -> PendingLayout | None:
        r = self._resize
        if r is None:
            return None
        return PendingLayout(r.attention_workers, r.expert_shards, r.ready, r.drain_deadline)

    def _prepare_resize(self, r: "_Resize") -> None:
        """Reserve, start and load the added workers; plan and stage the new expert placement (old layout steps on)."""
        p, a_old, e_old = self.parallel, self.layout.attention_workers, self.layout.expert_shards
        add_a, add_e = max(0, r.attention_workers - a_old), max(0, r.expert_shards - e_old)
        try:
            new_nodes: list = []
            if add_a or add_e:
                target = p.resized(r.attention_workers, r.expert_shards)
                if p.validate_cluster:
                    check_cluster_fits(target, ray.nodes())
                bundles = [b or {"CPU": 0.01} for b in
                           [p.pool_bundle("attention")] * add_a + [p.pool_bundle("experts")] * add_e]
                selectors = [dict(p.attention_pool.node_labels)] * add_a + [dict(p.expert_pool.node_labels)] * add_e
                r.pg = placement_group(bundles, strategy=p.placement_strategy,
                                       bundle_label_selector=selectors if any(selectors) else None)
                timeout = self._initial_parallel.elastic.reserve_timeout_s
                ready, _ = ray.wait([r.pg.ready()], timeout=timeout)
                if not ready:
                    raise ExecutorError(f"cannot reserve the added bundles {bundles} within {timeout:.0f}s; cluster "
                                        f"resources: {ray.cluster_resources()}")
                table = ray.util.placement_group_table(r.pg).get("bundles_to_node_id", {})
                new_nodes = [table.get(i) for i in range(add_a + add_e)]
            layout = GroupLayout(r.attention_workers, r.expert_shards)
            with self._eplb_lock:
                current, loads = self.placement, self.window.expert_load()
            r.placement = current
            if r.expert_shards != e_old:
                nodes = self.shard_nodes[: r.expert_shards] + [str(x) for x in new_nodes[add_a:]]
                r.placement = self._placement_for(r.expert_shards, nodes, loads, current)
            if r.abandoned:  # the group failed or shut down meanwhile
                return self._release(r)
            for j in range(add_a):
                r.attention.append(self._new_attention(a_old + j, layout, r.placement, r.pg, j))
            for j in range(add_e):
                r.shards.append(self._new_shard(e_old + j, layout, r.placement, r.pg, add_a + j))
            if r.abandoned:
                return self._release(r)
            started = r.attention + r.shards
            r.infos = ray.get([w.ready.remote() for w in started], timeout=self._ready_timeout_s)
            if r.placement is not current:
                kept = range(min(e_old, r.expert_shards))
                for s in kept:
                    self.shards[s].stage.remote(r.placement.version, r.placement.shard_layers(s))
                deadline = time.monotonic() + self._ready_timeout_s
                while True:
                    states = ray.get([self.shards[s].staging.remote() for s in kept], timeout=self._ready_timeout_s)
                    errors = [st["stage_error"] for st in states if st.get("stage_error")]
                    if errors:
                        raise ExecutorError(f"staging the experts of the new layout failed: {errors[0]}")
                    if all(st["staged"] == r.placement.version for st in states):
                        break
                    if time.monotonic() > deadline:
                        raise ExecutorError("the kept expert shards did not stage the new layout in time")
                    time.sleep(0.05)
            if r.abandoned:
                return self._release(r)
            r.ready = True
            r.prepared_s = time.monotonic() - r.started
            log.info("model group resize ready to switch after %.1fs (%d worker(s) started)", r.prepared_s,
                     len(started))
        except Exception as e:
            if r.abandoned:
                return self._release(r)
            self._abandon_resize(_short(e) if not isinstance(e, ExecutorError) else str(e), r)

    def _placement_for(self, n_shards: int, shard_nodes: list, loads, current: PerLayerPlacement) -> PerLayerPlacement:
        """The expert placement for ``n_shards``: planned from the measured load when there is some, else the
        contiguous split with the configured redundant copies; kept shards keep their experts in their slots."""
        version, slots = current.version + 1, self.parallel.eplb.redundant_slots_per_shard
        if any(any(row) for row in loads) and (slots or n_shards > 1):
            new = eplb.plan(loads, n_shards, slots if n_shards > 1 else 0, shard_nodes, version=version)
        else:
            new = self._contiguous_placement(n_shards, shard_nodes, version)
        return eplb.align(new, current)

    def _abandon_resize(self, why: str, only: "_Resize | None" = None) -> None:
        """Give up the pending resize (``only``: if it is still that one)."""
        with self._eplb_lock:
            r = self._resize
            if r is None or (only is not None and r is not only):
                return
            self._resize = None
        r.abandoned = True
        self._release(r)
        self.resizes.append({**r.describe(), "done": False, "error": why})
        log.error("model group resize to %d attention worker(s) + %d expert shard(s) abandoned: %s",
                  r.attention_workers, r.expert_shards, why)

    @staticmethod
    def _release(r: "_Resize") -> None:
        """Stop the workers an abandoned resize started and give back its placement group."""
        _kill(r.attention + r.shards)
        if r.pg is not None:
            _remove(r.pg)

    def switch_layout(self) -> dict:
        """Switch the group to the prepared layout (engine thread, at a step boundary, with the removed attention
        workers idle): every kept and added worker joins a new process group; removed workers stop. Returns the
        resize's record (``pause_s``: how long the group did not step)."""
        with self._workers_lock:
            return self._switch_layout()

    def _switch_layout(self) -> dict:
        r = self._resize
        if r is None or not r.ready:
            raise RuntimeError("no prepared resize to switch to")
        t0 = time.perf_counter()
        old = {"attention_workers": self.layout.attention_workers, "expert_shards": self.layout.expert_shards}
        a, e, p = r.attention_workers, r.expert_shards, self.parallel
        layout = GroupLayout(a, e)
        attention = self.attention[:a] + r.attention
        shards = self.shards[:e] + r.shards
        removed = self.attention[a:] + self.shards[e:]
        restaged = r.placement is not self.placement
        info = self.worker_info
        worker_info = (info[: min(a, old["attention_workers"])] + r.infos[: len(r.attention)]
                       + info[old["attention_workers"]:][:e] + r.infos[len(r.attention):])
        address, port = self._get([attention[0].rendezvous.remote()], 60, "rendezvous")[0]
        timeout = p.collective_timeout_s
        backend = p.collective_backend
        kept_shards = min(e, old["expert_shards"])
        refs = [w.regroup.remote(layout, r.placement, backend, address, port, timeout) for w in attention]
        refs += [sh.regroup.remote(layout, r.placement.version if restaged and s < kept_shards else None, backend,
                                   address, port, timeout) for s, sh in enumerate(shards)]
        self.attention, self.shards = attention, shards  # a failure below tears the new set down
        _kill(removed)  # they hold nothing the new layout needs (the engine drained the attention workers)
        self._get(refs, timeout + 30, "switching to the resized layout")
        if r.pg is not None:
            self._added_pgs.append((r.pg, r.attention + r.shards))
        gone = {id(w) for w in removed}
        still = []
        for pg, members in self._added_pgs:  # a resize's placement group goes once all its workers have
            members = [w for w in members if id(w) not in gone]
            if members:
                still.append((pg, members))
            else:
                _remove(pg)
        self._added_pgs = still
        with self._eplb_lock:
            self.parallel = p.resized(a, e)
            self.layout, self.num_attention_workers = layout, a
            self.worker_info = worker_info
            self.shard_nodes = [str(i.get("node_id")) for i in worker_info[a:]]
            if restaged:
                self.placement = r.placement
                self.window = LoadWindow(len(self.args.moe_layers), self.args.n_routed_experts, e,
                                         p.eplb.window_steps)
            self._resize = None
        pause = time.perf_counter() - t0
        record = {**r.describe(), "done": True, "from": old, "pause_s": pause}
        self.resizes.append(record)
        log.info("model group switched to %d attention worker(s) + %d expert shard(s) (%s; pause %.1f ms)", a, e,
                 r.reason, 1e3 * pause)
        return record

    def take_expert_wait(self) -> float:
        """Share of the time in steps since the last call that the attention workers waited for the experts (their
        compute and the all-to-all), the expert pool's signal; 0 when no step ran."""
        wait, total = self._expert_wait_s, self._execute_s
        self._expert_wait_s = self._execute_s = 0.0
        return min(1.0, wait / total) if total > 0 else 0.0


class _Resize:
    """A pool resize being prepared: its target, the added workers, the new expert placement."""

    def __init__(self, attention_workers: int, expert_shards: int, reason: str, drain_deadline: float):
        self.attention_workers, self.expert_shards, self.reason = attention_workers, expert_shards, reason
        self.drain_deadline = drain_deadline
        self.started = time.monotonic()
        self.pg: PlacementGroup | None = None
        self.attention: list = []
        self.shards: list = []
        self.infos: list[dict] = []
        self.placement: PerLayerPlacement | None = None
        self.ready = False
        self.abandoned = False
        self.prepared_s: float | None = None

    def describe(self) -> dict:
        return {"to": {"attention_workers": self.attention_workers, "expert_shards": self.expert_shards},
                "reason": self.reason, "ready": self.ready, "prepared_s": self.prepared_s}


def _kill(actors: list) -> None:
    """Stop actors for good (already dead ones included)."""
    for w in actors:
        try:
            ray.kill(w, no_restart=True)
        except Exception:
            pass


def _remove(pg: PlacementGroup) -> None:
    try:
        remove_placement_group(pg)
    except Exception:
        pass


# What a Ray error says of where it happened: kept out of messages that reach clients (/health, error bodies).
_INTERNALS = re.compile(r"\b(?:pid|ip|actor_id|node_id|task_id|repr|name|namespace)=[^,)\s]+,?\s*"
                        r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|(?:/[\w.@-]+){2,}")


def _short(e: Exception) -> str:
    """One line of what went wrong: the worker's own exception (not Ray's task wrapper), without pids, addresses
    or paths."""
    if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and not ln.startswith("ray::") and not ln.strip().startswith("File ")]
    errors = [ln for ln in lines if re.match(r"\w+(Error|Exception)\b", ln)]  # a traceback's last line
    first = _INTERNALS.sub("", (errors or lines or [""])[-1 if errors else 0]).strip()
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__
