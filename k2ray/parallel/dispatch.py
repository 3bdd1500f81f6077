"""All-to-all token dispatch and combine between attention workers and expert shards.

Per MoE layer an attention worker sends each token at most once to each expert shard, together with the shard-local
slots of the token's top-k experts held there (-1 elsewhere) and the routing weights; the shard runs its experts and
returns one weighted partial sum per received row; the attention worker adds the partial sums of all shards.

Two wire modes, chosen from the layout so both sides agree without talking:
- ``padded`` (expert_shards <= top_k, where a token reaches most shards anyway): every token goes to every shard,
  so the receive sizes follow from the per-worker token counts the router hands out with the step — no count
  exchange, two collectives per layer (dispatch, combine).
- ``counts``: only tokens with an expert on the shard travel; the per-peer row counts go first (three collectives).
Rows travel as raw bytes (hidden states in the model dtype, int32 slots, fp32 weights) in one tensor, so a dispatch
is one collective whatever the dtype.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from k2ray.model.moe import Finished, PendingRouted
from k2ray.parallel.groups import GroupLayout
from k2ray.parallel.placement import ExpertPlacement, PerLayerPlacement


def wire_mode(layout: GroupLayout, top_k: int) -> str:
    return "padded" if layout.expert_shards <= top_k else "counts"


def pack_rows(hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    parts = [hidden, slots.to(torch.int32), weights.to(torch.float32)]
    return torch.cat([_as_bytes(p) for p in parts], dim=1)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[rows, n]`` of any dtype -> ``[rows, n * itemsize]`` uint8 (same memory)."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


def unpack_rows(buf: torch.Tensor, hidden_size: int, top_k: int, dtype: torch.dtype):
    hb = hidden_size * dtype.itemsize
    hidden = buf[:, :hb].contiguous().view(dtype)
    slots = buf[:, hb : hb + 4 * top_k].contiguous().view(torch.int32)
    weights = buf[:, hb + 4 * top_k :].contiguous().view(torch.float32)
    return hidden, slots, weights


def _a2a(send: torch.Tensor, in_splits: list[int], out_splits: list[int], group=None) -> torch.Tensor:
    recv = send.new_empty((sum(out_splits),) + tuple(send.shape[1:]))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    return recv


def _a2a_bytes(t: torch.Tensor, in_splits: list[int], out_splits: list[int], group=None) -> torch.Tensor:
    """All-to-all of a 2-D tensor of any dtype, carried as bytes (gloo lacks some dtypes, e.g. bf16)."""
    return _a2a(_as_bytes(t), in_splits, out_splits, group).view(t.dtype)


class DispatchStats:
    def __init__(self):
        self.dispatch_s = 0.0
        self.combine_s = 0.0
        self.layers = 0

    def take(self) -> dict:
        d = {"dispatch_s": self.dispatch_s, "combine_s": self.combine_s, "moe_layers": self.layers}
        self.dispatch_s = self.combine_s = 0.0
        self.layers = 0
        return d


class DispatchClient:
    """Attention-worker side: a :class:`~k2ray.model.moe.RoutedBackend` (connected to the model's
    :class:`~k2ray.model.moe.RemoteExperts`). Call :meth:`begin_step` with every attention worker's token count before
    each forward.

    ``placement``: one table for every MoE layer, or a :class:`PerLayerPlacement`; then the MoE layers of a forward
    are counted from :meth:`begin_step` on (they run in model order, as the shards serve them)."""

    def __init__(
        self,
        layout: GroupLayout,
        worker: int,
        placement: ExpertPlacement | PerLayerPlacement,
        hidden_size: int,
        top_k: int,
        group=None,
        overlap: bool = True,
    ):
        self.layout, self.worker = layout, worker
        self.overlap = overlap  # let MoE.forward run the shared expert while the tokens are away
        self.hidden_size, self.top_k, self.group = hidden_size, top_k, group
        self.mode = wire_mode(layout, top_k)
        self.set_placement(placement)
        self.tokens_per_worker: list[int] | None = None
        self.stats = DispatchStats()

    @staticmethod
    def lookup_tables(placement: ExpertPlacement | PerLayerPlacement) -> list[tuple]:
        """The vectorised routing tables, one per MoE layer (one for all layers given a single table)."""
        if isinstance(placement, ExpertPlacement):
            return [placement.lookup_tensors()]
        built: dict[int, tuple] = {}  # a table shared by several layers is built once
        for p in placement.layers:
            if id(p) not in built:
                built[id(p)] = p.lookup_tensors()
        return [built[id(p)] for p in placement.layers]

    def set_placement(self, placement: ExpertPlacement | PerLayerPlacement, tables: list[tuple] | None = None) -> None:
        """Route with ``placement`` from the next layer on (``tables``: its :meth:`lookup_tables`, if built already)."""
        self.placement = placement
        self.layer_placements = [placement] if isinstance(placement, ExpertPlacement) else list(placement.layers)
        self.tables = tables if tables is not None else self.lookup_tables(placement)
        self.layer = 0

    def begin_step(self, tokens_per_worker: list[int]) -> None:
        self.tokens_per_worker = list(tokens_per_worker)
        self.layer = 0

    def start(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingRouted:
        """This layer's dispatch and combine, pending when ``overlap`` (else done: the shared expert then runs after
        the combine, the baseline that ``overlap_shared_expert`` is measured against)."""
        pending = self._post(x, topk_ids, topk_weights)
        return pending if self.overlap else Finished(pending.wait())

    def _post(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> "PendingCombine":
        """Send this layer's rows and post the receive of the shards' partial sums without waiting for either, so
        the caller can run the shared expert while the shards compute (``MoE.forward`` does). Both collectives are
        issued in the same order on every rank, so the shards see the usual dispatch-then-combine sequence."""
        a, e = self.layout.attention_workers, self.layout.expert_shards
        t = x.shape[0]
        if self.tokens_per_worker is None or self.tokens_per_worker[self.worker] != t:
            raise RuntimeError("DispatchClient: begin_step() was not called with this worker's token count")
        dev = x.device
        li = min(self.layer, len(self.tables) - 1)  # a single table serves every layer
        self.layer += 1
        tables = self.tables[li]
        if tables[0].device != dev:  # routing tables live where the router's top-k ids are
            tables = self.tables[li] = tuple(tb.to(dev) for tb in tables)
        shard, slot = self.layer_placements[li].route(topk_ids, tables, offset=self.worker)
        rows, token_of = [], []
        for s in range(e):
            on_s = shard == s
            slots_s = torch.where(on_s, slot, torch.full_like(slot, -1))
            if self.mode == "padded":
                tok = torch.arange(t, device=dev)
            else:
                tok = torch.nonzero(on_s.any(dim=1)).flatten()
            rows.append(pack_rows(x[tok], slots_s[tok], topk_weights[tok]))
            token_of.append(tok)
        send = torch.cat(rows) if rows else x.new_empty(0, 0, dtype=torch.uint8)
        counts = [len(tk) for tk in token_of]
        t0 = time.perf_counter()
        if self.mode == "counts":
            _a2a(torch.tensor([0] * a + counts, dtype=torch.int64, device=dev), [1] * (a + e), [1] * (a + e),
                 self.group)
        send_splits = [0] * a + counts
        recv = torch.empty(sum(counts), self.hidden_size * x.element_size(), dtype=torch.uint8, device=dev)
        works = [
            dist.all_to_all_single(
                send.new_empty((0, send.shape[1])), send, [0] * (a + e), send_splits, group=self.group, async_op=True
            ),
            dist.all_to_all_single(
                recv, _as_bytes(x.new_empty(0, self.hidden_size)), send_splits, [0] * (a + e),
                group=self.group, async_op=True,
            ),
        ]
        self.stats.dispatch_s += time.perf_counter() - t0
        return PendingCombine(self, works, recv, torch.cat(token_of), t, x.dtype)


class PendingCombine:
    """One MoE layer's dispatch and combine in flight; :meth:`wait` returns the summed partial results ``[T, H]``."""

    def __init__(self, client: DispatchClient, works, recv, token_of, tokens, dtype):
        self.client, self.works, self.recv, self.token_of = client, works, recv, token_of
        self.tokens, self.dtype = tokens, dtype

    def wait(self) -> torch.Tensor:
        stats = self.client.stats
        t1 = time.perf_counter()
        for w in self.works:
            w.wait()
        t2 = time.perf_counter()
        stats.combine_s += t2 - t1  # what is still outstanding once the overlapped work is done
        stats.layers += 1
        back = self.recv.view(self.dtype)
        out = torch.zeros(self.tokens, self.client.hidden_size, dtype=torch.float32, device=self.recv.device)
        out.index_add_(0, self.token_of, back.float())
        return out.to(self.dtype)


class ExpertServer:
    """Expert-shard side: per step, for each MoE layer in order, receive rows, run local experts, send results."""

    def __init__(
        self,
        layout: GroupLayout,
        shard: int,
        experts: list[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]],
        hidden_size: int,
        top_k: int,
        dtype: torch.dtype,
        num_local: int,
        group=None,
        device: str | torch.device = "cpu",
    ):
        self.layout, self.shard, self.experts = layout, shard, experts
        self.device = torch.device(device)  # buffers handed to the collective (NCCL needs them on the GPU)
        self.hidden_size, self.top_k, self.dtype, self.group = hidden_size, top_k, dtype, group
        self.mode = wire_mode(layout, top_k)
        self.num_local = num_local
        self.stats = DispatchStats()

    def set_experts(self, experts: list[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]],
                    num_local: int) -> None:
        """Serve these per-layer experts from the next step on (a live rebalance's switch)."""
        self.experts, self.num_local = experts, num_local

    def run_step(self, tokens_per_worker: list[int]) -> dict:
        a, e = self.layout.attention_workers, self.layout.expert_shards
        width = self.hidden_size * self.dtype.itemsize + 8 * self.top_k
        dev = self.device
        load = torch.zeros(len(self.experts), self.num_local, dtype=torch.int64, device=dev)  # [moe layer, local slot]
        for li, layer_experts in enumerate(self.experts):
            t0 = time.perf_counter()
            if self.mode == "counts":
                got = _a2a(torch.zeros(a + e, dtype=torch.int64, device=dev), [1] * (a + e), [1] * (a + e),
                           self.group)
                recv_splits = got.tolist()
            else:
                recv_splits = list(tokens_per_worker) + [0] * e
            buf = _a2a(torch.empty(0, width, dtype=torch.uint8, device=dev), [0] * (a + e), recv_splits, self.group)
            t1 = time.perf_counter()
            hidden, slots, weights = unpack_rows(buf, self.hidden_size, self.top_k, self.dtype)
            out = layer_experts(hidden, slots.long(), weights)
            valid = slots[slots >= 0].long()
            if valid.numel():
                load[li] += torch.bincount(valid, minlength=self.num_local)
            t2 = time.perf_counter()
            _a2a_bytes(out, recv_splits, [0] * (a + e), self.group)
            t3 = time.perf_counter()
            self.stats.dispatch_s += t1 - t0
            self.stats.combine_s += t3 - t2
            self.stats.layers += 1
        d = self.stats.take()
        d["expert_tokens"] = load.sum(0).tolist()
        d["expert_layer_tokens"] = load.tolist()
        return d
