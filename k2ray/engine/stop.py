"""When a sequence stops on a token: EOS, a stop token id, ``max_tokens`` or the context limit.

:func:`check_stop` is pure (in the spirit of vLLM's ``check_stop``): it looks at the generated ids and the sampling
parameters and says why the sequence ends, or ``None``. Stop *strings* are not decided here: they need the detokenized
text, which the output processor (:mod:`k2ray.engine.output_processor`) owns.
"""

from __future__ import annotations

from typing import AbstractSet, NamedTuple, Optional, Sequence

from k2ray.engine.request import FinishReason
from k2ray.runtime.sampling import SamplingParams


class StopDecision(NamedTuple):
    finish_reason: FinishReason
    # The stop token id (or, from the output processor, the stop string) that ended it; None for EOS and length.
    stop_reason: Optional[int | str] = None


def check_stop(
    output_ids: Sequence[int],
    num_prompt_tokens: int,
    params: SamplingParams,
    eos_token_ids: AbstractSet[int],
    max_model_len: int,
) -> Optional[StopDecision]:
    """Why the sequence ends after its last generated token (``output_ids[-1]``), or None if it goes on.

    A stop token ends it with ``stop`` (``stop_reason`` = the id, None when it is only an EOS); it wins over a length
    limit reached by the same token. Stop tokens count only after ``min_tokens`` generated tokens: the sampler bans
    them before that (``Sequence.min_tokens_ban``), so one that slipped through is generated text like any other.
    ``length`` when ``max_tokens`` tokens were generated or prompt + output fill the context (``max_model_len``).
    """
    n_out = len(output_ids)
    tok = output_ids[-1]
    if n_out > params.min_tokens:
        if tok in params.stop_token_ids:
            return StopDecision(FinishReason.STOP, tok)
        if not params.ignore_eos and tok in eos_token_ids:
            return StopDecision(FinishReason.STOP)
    if (params.max_tokens is not None and n_out >= params.max_tokens) or num_prompt_tokens + n_out >= max_model_len:
        return StopDecision(FinishReason.LENGTH)
    return None
