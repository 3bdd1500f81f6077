"""Continuous-batching scheduler: which sequences run how many tokens in the next step.

Each step has two budgets: ``max_num_batched_tokens`` tokens, and a cost budget in token-equivalents
(:mod:`k2ray.engine.step_cost`: a token at context ``c`` costs ``1 + c / attention_cost_tokens``, so the same number
of tokens costs more at long context; the budget is ``max_step_cost``, or calibrated to ``max_step_ms``). Policy, per
step, with at most ``max_num_seqs`` running sequences:

1. Every running sequence that decodes (one new token) is scheduled, oldest first, before any prompt work. Decodes
   spend the budgets but are never dropped for a prompt chunk (only ``max_num_batched_tokens`` bounds them).
2. Prompt work takes turns: the running sequences still in their prompt (chunked prefill) and the admission of
   waiting sequences (3) are served least-recently-led first (ties: admission, then the oldest). The sequence that
   gets the step's first chunk, and admission if it came from there, "led" the step; the others get what is left.
   Two long prompts therefore lead alternately instead of the older one taking every step until it is done, and a
   new request is admitted within a few steps even while a long prompt prefills.
3. Waiting sequences are admitted strictly first-come-first-served: if the head of the queue does not fit (token or
   cost budget, sequence limit or free cache blocks), nothing behind it is admitted either, so a large request is
   never starved by a stream of small ones. No admission in a step that had to preempt.
4. A chunk is as large as both budgets allow. The step's first chunk is at least one block (``block_size`` tokens,
   or the rest of the prompt) even over the cost budget, so a long prompt always progresses; later chunks smaller
   than that wait for their turn instead.

When a running sequence needs a new cache block and its attention worker has none, the most recently arrived running
sequence on that worker is *preempted by recompute*: its blocks are released (published full blocks stay in the
prefix cache, so recomputation is often cheap) and it returns to the waiting queue in arrival order, keeping the
tokens it has generated. The oldest request can always preempt every younger one, so it always makes progress.

Every sequence is pinned to one attention worker (its ``attention_rank``; each worker has its own cache blocks) when
first admitted: the worker holding the longest cached prefix, then the least loaded one.

Elastic attention pool: :meth:`Scheduler.drain_from` stops placing sequences on the workers about to be removed (the
last ones); their running sequences finish there, or :meth:`Scheduler.migrate_from` moves them by recomputation
(preempted, unpinned, readmitted elsewhere with the tokens they have). Once :meth:`Scheduler.ranks_idle_from` holds,
:meth:`Scheduler.set_attention_workers` takes the new count (added workers start with empty caches).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from k2ray.engine.kv_cache import BlockManager, block_hashes
from k2ray.engine.request import FinishReason, Sequence, SeqStatus
from k2ray.engine.step_cost import StepBudget, chunk_cost, max_chunk


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed before the step)
    num_new: int
    sample: bool  # the chunk reaches the last known token: sample the next one
    cost: int = 0  # token-equivalents (attention included), see k2ray.engine.step_cost


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    cost: int = 0  # token-equivalents of the scheduled chunks
    cost_budget: int = 0  # the step's cost budget


class _Batch:
    """The chunks chosen so far in one step and what is left of the step's two budgets."""

    def __init__(self, tokens: int, cost: int):
        self.chosen: dict[int, ScheduledSeq] = {}
        self.tokens_left = tokens
        self.cost_left = cost
        self.num_chunks = 0  # prompt chunks (not decodes)

    def add(self, c: ScheduledSeq) -> None:
        self.chosen[c.seq.seq_id] = c
        self.tokens_left -= c.num_new
        self.cost_left -= c.cost
        self.num_chunks += _is_chunk(c)

    def drop(self, seq: Sequence) -> None:
        """Refund a chosen sequence that was preempted later in the step."""
        c = self.chosen.pop(seq.seq_id, None)
        if c is not None:
            self.tokens_left += c.num_new
            self.cost_left += c.cost
            self.num_chunks -= _is_chunk(c)


def _is_chunk(c: ScheduledSeq) -> int:
    """1 for prompt work, 0 for a decode (one token, sampled)."""
    return int(c.num_new > 1 or not c.sample)


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
        max_step_cost: int | None = None,
        attention_cost_tokens: int = 8192,
        max_step_ms: float | None = None,
    ):
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.attention_cost_tokens = attention_cost_tokens
        self.budget = StepBudget(max_step_cost or max_num_batched_tokens, max_step_ms)
        self.num_steps = 0  # schedule() calls: the clock of the prefill rotation
        self.admission_turn = -1  # the last step whose prefill work admission led
        self.managers = [BlockManager(num_blocks, block_size, enable_prefix_caching) for _ in range(num_attention_workers)]
        # Admission keeps this many blocks free per attention worker so running sequences can grow without preemption.
        self.watermark_blocks = int(watermark * num_blocks)
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.running_per_rank = [0] * num_attention_workers
        self.num_blocks, self.enable_prefix_caching = num_blocks, enable_prefix_caching
        self.accepting_ranks = num_attention_workers  # new sequences go to ranks below this (a drain lowers it)
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

    # -- elastic attention pool ----------------------------------------------------------------------------------
    def drain_from(self, keep: int) -> None:
        """Place no new sequence on ranks ``keep`` and above (their running sequences go on)."""
        self.accepting_ranks = max(1, min(keep, len(self.managers)))

    def migrate_from(self, keep: int) -> list[Sequence]:
        """Move every sequence pinned to ranks ``keep`` and above to the others by recomputation: running ones are
        preempted (their tokens kept), and all of them are unpinned. Returns the preempted sequences."""
        self.drain_from(keep)
        out = SchedulerOutput()
        for seq in [s for s in self.running if s.attention_rank >= keep]:
            self._preempt(seq, out)
        for seq in self.waiting:
            if seq.attention_rank is not None and seq.attention_rank >= keep:
                seq.attention_rank = None
        return out.preempted

    def ranks_idle_from(self, keep: int) -> bool:
        """No sequence runs on, or waits for, ranks ``keep`` and above."""
        return (not any(self.running_per_rank[keep:])
                and not any(s.attention_rank is not None and s.attention_rank >= keep for s in self.waiting))

    def set_attention_workers(self, n: int) -> None:
        """Take a new attention worker count at a step boundary: added ranks start empty; removed ranks must be idle
        (their cached prefixes are forgotten)."""
        if n < len(self.managers) and not self.ranks_idle_from(n):
            raise RuntimeError(f"attention ranks {n}.. still hold sequences")
        del self.managers[n:], self.running_per_rank[n:]
        while len(self.managers) < n:
            self.managers.append(BlockManager(self.num_blocks, self.block_size, self.enable_prefix_caching))
            self.running_per_rank.append(0)
        self.accepting_ranks = n

    # -- the step ------------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.num_steps += 1
        out = SchedulerOutput(cost_budget=self.budget.value)
        batch = _Batch(self.max_num_batched_tokens, out.cost_budget)

        # 1: every decode, oldest first (a chunk never displaces one).
        for seq in [s for s in self.running if s.num_tokens - s.num_computed == 1]:
            if batch.tokens_left <= 0:
                break
            if seq.status is SeqStatus.RUNNING:  # else preempted earlier in this loop
                self._schedule_running(seq, 1, batch, out)

        # 2: prompt work in turns, least recently led first; None stands for admission (3).
        prefills = sorted((s for s in self.running if s.num_tokens - s.num_computed > 1),
                          key=lambda s: (s.prefill_turn, _order(s)))
        k = bisect.bisect_left([s.prefill_turn for s in prefills], self.admission_turn)
        for turn in prefills[:k] + [None] + prefills[k:]:
            if batch.tokens_left <= 0:
                break
            leader = None
            if turn is None:
                if not out.preempted:  # not while the cache is under pressure this step
                    leader = self._admit_waiting(batch)
                    if leader is not None:
                        self.admission_turn = self.num_steps
            elif turn.status is SeqStatus.RUNNING:  # else preempted earlier in this step
                n = self._chunk_size(turn.num_computed, turn.num_tokens - turn.num_computed, batch)
                if n:
                    leader = turn if batch.num_chunks == 0 else None
                    self._schedule_running(turn, n, batch, out)
            if leader is not None:
                leader.prefill_turn = self.num_steps

        # Present in arrival order (deterministic batches).
        out.scheduled = sorted(batch.chosen.values(), key=lambda c: _order(c.seq))
        for c in out.scheduled:
            out.num_batched_tokens += c.num_new
            out.cost += c.cost
            if _is_chunk(c):
                out.num_prefill_tokens += c.num_new
            else:
                out.num_decode_tokens += 1
        return out

    def observe_step(self, cost: int, seconds: float) -> None:
        """A step's cost and wall time, for the budget's calibration to ``max_step_ms``."""
        self.budget.observe(cost, seconds)

    def _chunk_size(self, start: int, remaining: int, batch: _Batch) -> int:
        """Tokens of a prompt chunk at context ``start`` that fit both budgets; at least one block for the step's
        first chunk (progress), and no fragment below a block for the others (0: wait for the next turn)."""
        limit = min(remaining, batch.tokens_left)
        n = max_chunk(start, limit, batch.cost_left, self.attention_cost_tokens)
        floor = min(self.block_size, limit)
        if batch.num_chunks == 0:
            return max(n, floor)
        return n if n >= min(self.block_size, remaining) else 0

    def _schedule_running(self, seq: Sequence, n: int, batch: _Batch, out: SchedulerOutput) -> None:
        """Blocks for ``n`` more tokens of a running sequence (preempting younger ones if needed), then choose it."""
        need = self._blocks_for(seq.num_computed + n) - len(seq.block_table)
        if need > 0:
            if not self._make_room(seq, need, batch, out):
                return  # seq itself was preempted
            seq.block_table.extend(self.managers[seq.attention_rank].allocate(need))
        start = seq.num_computed
        batch.add(ScheduledSeq(seq, start, n, start + n == seq.num_tokens,
                               chunk_cost(n, start, self.attention_cost_tokens)))

    def _admit_waiting(self, batch: _Batch) -> Sequence | None:
        """Admit waiting sequences strictly in arrival order while they fit. Returns the admitted sequence whose chunk
        is the step's first (it led the step), if any."""
        leader = None
        while self.waiting and batch.tokens_left > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            sched = self._admit(seq, batch)
            if sched is None:
                break
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            self.running_per_rank[seq.attention_rank] += 1
            if batch.num_chunks == 0 and _is_chunk(sched):
                leader = seq
            batch.add(sched)
        return leader

    def _make_room(self, seq: Sequence, need: int, batch: _Batch, out: SchedulerOutput) -> bool:
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
                batch.drop(seq)
                self._preempt(seq, out)
                return False
            batch.drop(victim)
            self._preempt(victim, out)
        return True

    def _admit(self, seq: Sequence, batch: _Batch) -> ScheduledSeq | None:
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
        if seq.attention_rank is not None and seq.attention_rank >= self.accepting_ranks:
            seq.attention_rank = None  # preempted on a worker being removed: start again elsewhere
        if seq.attention_rank is None:
            rank, hit = self._pick_attention_rank(hashes)
        else:
            rank = seq.attention_rank
            hit = self.managers[rank].match_prefix(hashes)
        bm = self.managers[rank]
        start = len(hit) * bs
        n = self._chunk_size(start, total - start, batch)
        if n == 0:
            return None
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
        return ScheduledSeq(seq, start, n, start + n == total, chunk_cost(n, start, self.attention_cost_tokens))

    def _pick_attention_rank(self, hashes: list[bytes]) -> tuple[int, list[int]]:
        best = None
        for rank, bm in enumerate(self.managers[: self.accepting_ranks]):
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
