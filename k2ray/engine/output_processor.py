"""One step's executor results applied to the sequences, and the :class:`RequestOutput` each request reports.

Per sampled token: the grammar accepts it, it is appended with its logprobs, :func:`~k2ray.engine.stop.check_stop`
decides on stop tokens and length, and — unless it is a stop token — it is detokenized incrementally and the new text
searched for stop strings. A finished sequence leaves the scheduler at once (its cache blocks are freed in the same
step). Outputs are cumulative and carry the deltas since the request's previous output (what a stream sends next).

A failure that belongs to one sequence (no sample for it, its detokenizer or grammar matcher raising, ...) ends that
sequence's request with an error (:meth:`OutputProcessor.fail_request`); the other requests of the step go on.
"""

from __future__ import annotations

import logging
import time
from typing import AbstractSet, Optional

from k2ray.engine.request import CompletionOutput, FinishReason, Request, RequestOutput, Sequence
from k2ray.engine.scheduler import ScheduledSeq, Scheduler
from k2ray.engine.stop import StopDecision, check_stop
from k2ray.runtime.sampling import Sample
from k2ray.runtime.step import SeqResult

log = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, eos_token_ids: AbstractSet[int], max_model_len: int):
        self.scheduler = scheduler
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.num_generation_tokens = 0

    def process(self, scheduled: list[ScheduledSeq], results: dict[int, SeqResult]) -> list[Request]:
        """Apply the results in batch order (every scheduled sequence has one). Returns the requests that got a
        token or finished, each once, in first-touched order."""
        touched: dict[str, Request] = {}
        for c in scheduled:
            seq = c.seq
            req = seq.request
            if seq.finished:  # a sibling sequence failed earlier in this step and took the request with it
                continue
            try:
                res = results[seq.seq_id]
                if res.prompt_logprobs is not None and req.prompt_logprobs is not None:
                    _append_prompt_logprobs(req, res.prompt_logprobs)
                if c.sample:
                    if res.sample is None:
                        self.fail_request(req, "sampling failed")  # the runner logged why
                    else:
                        self._append_token(seq, res.sample)
                    touched[req.request_id] = req
            except Exception as e:
                log.exception("sequence %s of request %s: processing its output raised", seq.seq_id, req.request_id)
                self.fail_request(req, f"processing its output failed ({type(e).__name__})")
                touched[req.request_id] = req
        return list(touched.values())

    def fail_request(self, req: Request, what: str) -> None:
        """End every sequence of ``req`` with an error saying ``what`` failed (no exception text: it may name files)."""
        req.error = f"internal error in this request: {what}; other requests are not affected"
        for s in req.seqs:
            if not s.finished:
                self.scheduler.finish(s, FinishReason.ERROR)

    def _append_token(self, seq: Sequence, s: Sample) -> None:
        tok = s.token_id
        if seq.matcher is not None and not seq.matcher.accept(tok):
            # Cannot happen when the mask was applied; never let a grammar violation pass silently.
            log.error("sequence %s: token %d rejected by its grammar", seq.seq_id, tok)
            seq.request.error = "constrained decoding produced a token outside the grammar"
            self.scheduler.finish(seq, FinishReason.ERROR)
            return
        seq.output_ids.append(tok)
        seq.cumulative_logprob += s.logprob
        self.num_generation_tokens += 1
        req = seq.request
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if seq.logprobs is not None:
            d = {tok: s.logprob}
            if s.top_logprobs:
                for t, v in s.top_logprobs:
                    d.setdefault(t, v)
            seq.logprobs.append(d)
        stop = check_stop(seq.output_ids, len(req.prompt_token_ids), seq.params, self.eos_token_ids,
                          self.max_model_len)
        if stop is None or stop.finish_reason is FinishReason.LENGTH:
            # Not a stop token, so it is text; a stop string it completes wins over a length limit.
            stop = self._detokenize(seq, tok) or stop
        if stop is None:
            return
        if stop.finish_reason is FinishReason.LENGTH and seq.detok is not None:
            seq.text += seq.detok.flush()
        seq.stop_reason = stop.stop_reason
        self.scheduler.finish(seq, stop.finish_reason)

    def _detokenize(self, seq: Sequence, tok: int) -> Optional[StopDecision]:
        """Feed the token to the sequence's detokenizer; a stop decision if the new text completes a stop string."""
        if seq.detok is None:
            return None
        delta = seq.detok.feed(tok)
        if not delta:
            return None
        seq.text += delta
        p = seq.params
        if not p.stop:
            return None
        if len(seq.output_ids) < p.min_tokens:  # stop strings count only from min_tokens on
            seq.stop_checked = len(seq.text)
            return None
        return _find_stop_string(seq)


def _append_prompt_logprobs(req: Request, chunk: list[tuple[float, list[tuple[int, float]]]]) -> None:
    """Per prompt token of the chunk: {actual token: logprob} plus the top alternatives."""
    ptoks = req.prompt_token_ids
    base = len(req.prompt_logprobs)
    for j, (lp, top) in enumerate(chunk):
        d = {ptoks[base + j]: lp}
        for tok, v in top:
            d.setdefault(tok, v)
        req.prompt_logprobs.append(d)


def _find_stop_string(seq: Sequence) -> Optional[StopDecision]:
    """The earliest stop string in the text not searched yet (plus an overlap for one straddling the boundary); the
    text is cut at it (or after it, with ``include_stop_str_in_output``)."""
    text = seq.text
    longest = seq.holdback + 1
    start = max(0, seq.stop_checked - longest + 1)
    best = None
    for stop in seq.params.stop:
        i = text.find(stop, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    seq.stop_checked = len(text)
    if best is None:
        return None
    i, stop = best
    seq.text = text[: i + len(stop)] if seq.params.include_stop_str_in_output else text[:i]
    return StopDecision(FinishReason.STOP, stop)


def make_request_output(req: Request, with_deltas: bool = True) -> RequestOutput:
    """The request's cumulative output; with ``with_deltas`` also what is new since the previous one (and that
    becomes the new baseline). Text a stop string could still complete is held back while a sequence runs."""
    outs = []
    for s in req.seqs:
        lp = s.logprobs
        d_tok = s.output_ids[s.sent_tokens :] if with_deltas else []
        text = s.visible_text()
        outs.append(CompletionOutput(
            index=s.index,
            text=text,
            token_ids=list(s.output_ids),
            logprobs=list(lp) if lp is not None else None,
            cumulative_logprob=s.cumulative_logprob,
            finish_reason=s.finish_reason.value if s.finish_reason is not None else None,
            stop_reason=s.stop_reason,
            delta_text=text[s.sent_text :] if with_deltas else "",
            delta_token_ids=d_tok,
            delta_logprobs=(lp[s.sent_tokens :] if lp is not None and with_deltas else None),
        ))
        if with_deltas:
            s.sent_tokens = len(s.output_ids)
            s.sent_text = len(text)
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=req.prompt_token_ids,
        outputs=outs,
        finished=req.finished,
        prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
        num_cached_tokens=req.num_cached_tokens or 0,
        error=req.error,
    )
