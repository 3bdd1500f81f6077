"""The scheduler's decisions turned into the executor's input (:class:`~k2ray.runtime.step.StepInput`).

For every scheduled chunk: its tokens, block table and attention rank; a sampling request when the chunk reaches the
last known token (stop tokens banned before ``min_tokens``); the prompt-logprob request while the first completion
runs through its prompt; and, for sequences under a grammar, the token mask the sampler applies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from k2ray.engine.request import Sequence
from k2ray.engine.scheduler import ScheduledSeq
from k2ray.runtime.sampling import SampleRequest
from k2ray.runtime.step import SeqWork, StepInput

if TYPE_CHECKING:  # pragma: no cover
    from k2ray.engine.structured import StructuredOutputs


@dataclass
class BuiltStep:
    step_input: StepInput
    grammar_mask_s: float  # time spent computing grammar masks
    num_constrained: int  # sequences sampled under a grammar


class WorkBuilder:
    def __init__(self, grammars: Callable[[], "StructuredOutputs"]):
        self._grammars = grammars  # called only when a constrained sequence samples (it is built by then)
        self.grammar_mask_time_s = 0.0  # total over all steps

    def build(self, scheduled: list[ScheduledSeq]) -> BuiltStep:
        works = [self._work(c) for c in scheduled]
        constrained = [(c.seq.matcher, w.sample) for c, w in zip(scheduled, works)
                       if c.sample and c.seq.matcher is not None]
        mask_s = 0.0
        if constrained:
            t0 = time.perf_counter()
            masks = self._grammars().allowed_masks([m for m, _ in constrained])  # bool [vocab] each
            for (_, sr), mask in zip(constrained, masks):
                sr.allowed_mask = mask
            mask_s = time.perf_counter() - t0
            self.grammar_mask_time_s += mask_s
        return BuiltStep(StepInput(works), mask_s, len(constrained))

    def _work(self, c: ScheduledSeq) -> SeqWork:
        seq = c.seq
        req = seq.request
        work = SeqWork(seq.seq_id, seq.token_at(c.start, c.start + c.num_new), c.start, seq.block_table,
                       seq.attention_rank)
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
