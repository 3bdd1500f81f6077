"""The scheduler's decisions turned into the executor's input (:class:`~k2ray.runtime.step.StepInput`).

For every scheduled chunk: its tokens, block table and attention rank; a sampling request when the chunk reaches the
last known token (stop tokens banned before ``min_tokens``); the prompt-logprob request while the first completion
runs through its prompt; and, for sequences under a grammar, the token mask the sampler applies. A sequence whose work
cannot be built (its grammar matcher raising, ...) is left out of the step and reported in ``BuiltStep.failed``: the
engine fails its request alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from k2ray.engine.request import Sequence
from k2ray.engine.scheduler import ScheduledSeq
from k2ray.runtime.sampling import SampleRequest
from k2ray.runtime.step import SeqWork, StepInput

if TYPE_CHECKING:  # pragma: no cover
    from k2ray.engine.structured import StructuredOutputs

log = logging.getLogger(__name__)


@dataclass
class BuiltStep:
    step_input: StepInput
    grammar_mask_s: float  # time spent computing grammar masks
    num_constrained: int  # sequences sampled under a grammar
    # Chunks left out of step_input because building their work raised, with what failed (no exception text).
    failed: list[tuple[ScheduledSeq, str]] = field(default_factory=list)
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # the chunks in step_input, in its order


class WorkBuilder:
    def __init__(self, grammars: Callable[[], "StructuredOutputs"]):
        self._grammars = grammars  # called only when a constrained sequence samples (it is built by then)
        self.grammar_mask_time_s = 0.0  # total over all steps

    def build(self, scheduled: list[ScheduledSeq]) -> BuiltStep:
        failed: list[tuple[ScheduledSeq, str]] = []
        kept: list[tuple[ScheduledSeq, SeqWork]] = []
        for c in scheduled:
            try:
                kept.append((c, self._work(c)))
            except Exception:
                log.exception("building the step for sequence %d raised", c.seq.seq_id)
                failed.append((c, "preparing its model input failed"))
        constrained = [(c, w.sample) for c, w in kept if c.sample and c.seq.matcher is not None]
        mask_s, num_bad = 0.0, 0
        if constrained:
            t0 = time.perf_counter()
            bad = self._masks(constrained)
            mask_s = time.perf_counter() - t0
            self.grammar_mask_time_s += mask_s
            if bad:
                num_bad = len(bad)
                failed += [(c, "computing its grammar mask failed") for c in bad]
                bad_ids = {id(c) for c in bad}
                kept = [(c, w) for c, w in kept if id(c) not in bad_ids]
        return BuiltStep(StepInput([w for _, w in kept]), mask_s, len(constrained) - num_bad, failed,
                         [c for c, _ in kept])

    def _masks(self, constrained: list) -> list[ScheduledSeq]:
        """Set each constrained row's allowed mask (batched); the chunks whose matcher raised, found row by row."""
        grammars = self._grammars()
        try:
            masks = grammars.allowed_masks([c.seq.matcher for c, _ in constrained])  # bool [vocab] each
        except Exception:
            log.warning("batched grammar masks raised; computing them one by one", exc_info=True)
        else:
            for (_, sr), mask in zip(constrained, masks):
                sr.allowed_mask = mask
            return []
        bad = []
        for c, sr in constrained:
            try:
                sr.allowed_mask = grammars.allowed_masks([c.seq.matcher])[0]
            except Exception:
                log.exception("grammar mask of sequence %d raised", c.seq.seq_id)
                bad.append(c)
        return bad

    def _work(self, c: ScheduledSeq) -> SeqWork:
        seq = c.seq
        req = seq.request
        work = SeqWork(seq.seq_id, seq.token_at(c.start, c.start + c.num_new), c.start, seq.block_table,
                       seq.attention_rank)
        if req.mm_items and c.start < len(req.prompt_token_ids):
            work.embeds = req.embeds_for(c.start, c.start + c.num_new)
        if c.sample:
            work.sample = _sample_request(seq)
        plp = req.prompt_logprobs
        # Prompt logprobs come from the first completion only, chunk by chunk, in order.
        if plp is not None and seq.index == 0 and c.start == len(plp) - 1:
            prompt_len = len(req.prompt_token_ids)
            end = c.start + c.num_new
            if c.start < prompt_len - 1:
                work.prompt_logprobs = req.params.prompt_logprobs
                work.next_prompt_token = req.prompt_token_ids[end] if end < prompt_len else None
        return work


def _sample_request(seq: Sequence) -> SampleRequest:
    """The sequence's SampleRequest, built once and updated per step (the output list is shared, not copied)."""
    sr = seq.sample_request
    if sr is None:
        sr = seq.sample_request = SampleRequest(seq.params)
        if seq.params.needs_history:
            sr.prompt_ids = seq.request.prompt_token_ids
            sr.output_ids = seq.output_ids
    n_out = len(seq.output_ids)
    sr.output_index = n_out
    sr.banned_ids = seq.min_tokens_ban if n_out < seq.params.min_tokens else []
    return sr
