"""Continuous-batching scheduler: which sequences run how many tokens in the next step.

Policy, per step, within ``max_num_batched_tokens`` tokens and ``max_num_seqs`` running sequences:

1. Running sequences that decode (one new token each) go first, oldest first, so that a long prompt never stalls
   generation.
2. Running sequences still in their prompt (chunked prefill) get the next chunk, oldest first.
3. Waiting sequences are admitted strictly first-come-first-served: if the head of the queue does not fit (token
   budget, sequence limit or free cache blocks), nothing behind it is admitted either, so a large request is never
   starved by a stream of small ones.

When a running sequence needs a new cache block and its attention worker has none, the most recently arrived running
sequence on that worker is *preempted by recompute*: its blocks are released (published full blocks stay in the
prefix cache, so recomputation is often cheap) and it returns to the waiting queue in arrival order, keeping the
tokens it has generated. The oldest request can always preempt every younger one, so it always makes progress.

Every sequence is pinned to one attention worker (its ``attention_rank``; each worker has its own cache blocks) when
first admitted: the worker holding the longest cached prefix, then the least loaded one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from k2ray.engine.kv_cache import BlockManager, block_hashes
from k2ray.engine.request import FinishReason, Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed before the step)
    num_new: int
    sample: bool  # the chunk reaches the last known token: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


def _order(seq: Sequence) -> tuple[int, int]:
    return (seq.request.arrival_index, seq.index)


class Scheduler:
    def __init__(
        self,
        num_attention_workers: int,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool = True,
        watermark: float = 0.01,
    ):
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.managers = [BlockManager(num_blocks, block_size, enable_prefix_caching) for _ in range(num_attention_workers)]
        # Admission keeps this many blocks free per attention worker so running sequences can grow without preemption.
        self.watermark_blocks = int(watermark * num_blocks)
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.running_per_rank = [0] * num_attention_workers
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # tokens run through the model (prefill + decode, recompute included)

    # -- queues --------------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and release its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.running_per_rank[seq.attention_rank] -= 1
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove ``seq`` (its blocks are freed at once) and mark it finished for ``reason``."""
        self.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- blocks --------------------------------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.managers[seq.attention_rank].free(seq.block_table)
            seq.block_table = []
        seq.num_computed = 0
        seq.num_published = 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.running_per_rank[seq.attention_rank] -= 1
        self._release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        req = seq.request
        if req.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_token_ids):
            req.prompt_logprobs = [None]  # the prompt will be recomputed from the start
        self.add(seq)
        out.preempted.append(seq)

    # -- the step ------------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        chosen: dict[int, ScheduledSeq] = {}

        # 1 + 2: running sequences; decodes first, then prefill chunks, each oldest first.
        decodes = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        if len(decodes) == len(self.running):
            passes = (decodes,)
        else:
            passes = (decodes, [s for s in self.running if s.num_tokens - s.num_computed > 1])
        for group in passes:
            for seq in group:
                if budget <= 0:
                    break
                if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                    continue
                n = min(seq.num_tokens - seq.num_computed, budget)
                need = self._blocks_for(seq.num_computed + n) - len(seq.block_table)
                if need > 0 and not self._make_room(seq, need, chosen, out):
                    continue  # seq itself was preempted
                if need > 0:
                    seq.block_table.extend(self.managers[seq.attention_rank].allocate(need))
                chosen[seq.seq_id] = ScheduledSeq(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens)
                budget -= n

        # Refund the budget of sequences preempted after being chosen (they are no longer in `chosen`).
        budget = self.max_num_batched_tokens - sum(c.num_new for c in chosen.values())

        # 3: admit waiting sequences, strictly FCFS; not while the cache is under pressure this step.
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                sched = self._admit(seq, budget)
                if sched is None:
                    break
                self.waiting.pop(0)
                seq.status = SeqStatus.RUNNING
                bisect.insort(self.running, seq, key=_order)
                self.running_per_rank[seq.attention_rank] += 1
                chosen[seq.seq_id] = sched
                budget -= sched.num_new

        # Present in arrival order (deterministic batches).
        out.scheduled = sorted(chosen.values(), key=lambda c: _order(c.seq))
        for c in out.scheduled:
            out.num_batched_tokens += c.num_new
            if c.sample and c.num_new == 1:
                out.num_decode_tokens += 1
            else:
                out.num_prefill_tokens += c.num_new
        return out

    def _make_room(self, seq: Sequence, need: int, chosen: dict[int, ScheduledSeq], out: SchedulerOutput) -> bool:
        """Free ``need`` blocks on ``seq``'s attention worker by preempting younger sequences there (latest first).
        Returns False if ``seq`` had to preempt itself."""
        bm = self.managers[seq.attention_rank]
        while bm.num_free_blocks < need:
            victim = None
            for cand in reversed(self.running):
                if cand is seq:
                    break
                if cand.attention_rank == seq.attention_rank:
                    victim = cand
                    break
            if victim is None:
                chosen.pop(seq.seq_id, None)
                self._preempt(seq, out)
                return False
            chosen.pop(victim.seq_id, None)
            self._preempt(victim, out)
        return True

    def _admit(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        """Place ``seq``, take its cached prefix and blocks for its first chunk; None if it does not fit now."""
        bs = self.block_size
        total = seq.num_tokens
        # Full blocks that may come from the cache: at least the last known token is always computed (its logits
        # give the next token), and a hit block is never partially recomputed.
        max_hit = (total - 1) // bs
        want_prompt_logprobs = (
            seq.request.prompt_logprobs is not None and len(seq.request.prompt_logprobs) < len(seq.prompt_ids)
        )
        if want_prompt_logprobs:
            max_hit = 0
        if len(seq.block_hashes) < max_hit:
            block_hashes(seq.token_at(0, max_hit * bs), bs, max_hit, seq.block_hashes,
                         extra_of=seq.request.block_extra)
        hashes = seq.block_hashes[:max_hit]
        if seq.attention_rank is None:
            rank, hit = self._pick_attention_rank(hashes)
        else:
            rank = seq.attention_rank
            hit = self.managers[rank].match_prefix(hashes)
        bm = self.managers[rank]
        start = len(hit) * bs
        n = min(total - start, budget)
        need = self._blocks_for(start + n) - len(hit)
        reviving = sum(1 for b in hit if bm.ref_count(b) == 0)  # cached blocks nobody holds count as free
        reserve = self.watermark_blocks if self.running_per_rank[rank] else 0
        if need + reviving + reserve > bm.num_free_blocks:
            return None
        seq.attention_rank = rank
        bm.take(hit)
        seq.block_table = hit + bm.allocate(need)
        seq.num_computed = start
        seq.num_published = len(hit)
        if seq.request.num_cached_tokens is None:
            seq.request.num_cached_tokens = start
        bm.record_lookup(total, start)
        return ScheduledSeq(seq, start, n, start + n == total)

    def _pick_attention_rank(self, hashes: list[bytes]) -> tuple[int, list[int]]:
        best = None
        for rank, bm in enumerate(self.managers):
            hit = bm.match_prefix(hashes)
            key = (len(hit), -self.running_per_rank[rank], bm.num_free_blocks, -rank)
            if best is None or key > best[0]:
                best = (key, rank, hit)
        return best[1], best[2]

    # -- after the step --------------------------------------------------------------------------------------------
    def commit(self, scheduled: list[ScheduledSeq]) -> None:
        """Advance computed counts and publish newly filled blocks to the prefix cache. Call after the executor ran
        the step and *before* appending sampled tokens (published blocks must hold computed tokens only)."""
        bs = self.block_size
        for c in scheduled:
            seq = c.seq
            seq.num_computed = c.start + c.num_new
            self.num_computed_tokens += c.num_new
            full = seq.num_computed // bs
            if full > seq.num_published:
                bm = self.managers[seq.attention_rank]
                if bm.enable_prefix_caching:
                    if len(seq.block_hashes) < full:
                        block_hashes(seq.token_at(0, full * bs), bs, full, seq.block_hashes,
                                     extra_of=seq.request.block_extra)
                    for i in range(seq.num_published, full):
                        bm.publish(seq.block_table[i], seq.block_hashes[i])
                seq.num_published = full

    # -- metrics -------------------------------------------------------------------------------------------------
    def kv_usage(self) -> float:
        """Mean fraction of cache blocks held by live sequences over attention workers."""
        return sum(bm.usage for bm in self.managers) / len(self.managers)

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(queried tokens, hit tokens) summed over attention workers since start."""
        return (sum(bm.prefix_queries for bm in self.managers), sum(bm.prefix_hits for bm in self.managers))
