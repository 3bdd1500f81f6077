"""check_stop against hand-written expectations: EOS, ignore_eos, stop token ids, min_tokens, max_tokens, context."""

from __future__ import annotations

import pytest

from k2ray.engine.request import FinishReason
from k2ray.engine.stop import StopDecision, check_stop
from k2ray.runtime.sampling import SamplingParams

EOS = frozenset({2})
STOP, LENGTH = FinishReason.STOP, FinishReason.LENGTH


def _check(output_ids, prompt_len=3, eos=EOS, max_model_len=100, **params):
    return check_stop(output_ids, prompt_len, SamplingParams(**params), eos, max_model_len)


def test_ordinary_token_goes_on():
    assert _check([5]) is None
    assert _check([5, 6, 7], max_tokens=4) is None


def test_eos_stops_without_stop_reason():
    assert _check([5, 2]) == StopDecision(STOP, None)
    assert _check([2]) == (STOP, None)  # a NamedTuple: compares as (finish_reason, stop_reason)
    assert _check([5, 2], eos=frozenset({2, 9})) == (STOP, None)
    assert _check([5, 9], eos=frozenset({2, 9})) == (STOP, None)
    assert _check([5, 2], eos=frozenset()) is None  # a model without that EOS


def test_ignore_eos():
    assert _check([5, 2], ignore_eos=True) is None
    # ignore_eos leaves explicit stop tokens alone, even one that is also an EOS
    assert _check([5, 2], ignore_eos=True, stop_token_ids=[2]) == (STOP, 2)
    assert _check([5, 7], ignore_eos=True, stop_token_ids=[7]) == (STOP, 7)


def test_stop_token_ids_report_the_token():
    assert _check([5, 7], stop_token_ids=[7, 8]) == (STOP, 7)
    assert _check([5, 8], stop_token_ids=[7, 8]) == (STOP, 8)
    assert _check([7, 5], stop_token_ids=[7]) is None  # only the last token counts
    assert _check([5, 2], stop_token_ids=[2]) == (STOP, 2)  # named explicitly: reported even though it is an EOS


def test_min_tokens_holds_stop_tokens_back():
    # min_tokens=2: the first two tokens are never stop tokens (the sampler bans them), the third may be.
    p = dict(min_tokens=2, stop_token_ids=[7])
    assert _check([7], **p) is None
    assert _check([5, 7], **p) is None
    assert _check([5, 6, 7], **p) == (STOP, 7)
    assert _check([2], min_tokens=2) is None
    assert _check([5, 2], min_tokens=2) is None
    assert _check([5, 6, 2], min_tokens=2) == (STOP, None)
    # a held-back stop token still counts toward max_tokens
    assert _check([5, 7], min_tokens=2, max_tokens=2, stop_token_ids=[7]) == (LENGTH, None)


def test_max_tokens():
    assert _check([5, 6], max_tokens=3) is None
    assert _check([5, 6, 7], max_tokens=3) == (LENGTH, None)
    assert _check([5], max_tokens=1) == (LENGTH, None)
    assert _check([5] * 50, max_tokens=None) is None  # no limit but the context


def test_stop_token_wins_over_max_tokens():
    assert _check([5, 6, 2], max_tokens=3) == (STOP, None)
    assert _check([5, 6, 7], max_tokens=3, stop_token_ids=[7]) == (STOP, 7)


@pytest.mark.parametrize("prompt_len, n_out, expected", [
    (3, 6, None),  # 9 tokens of 10
    (3, 7, (LENGTH, None)),  # the context is full
    (9, 1, (LENGTH, None)),  # one token fits after a long prompt
])
def test_context_limit(prompt_len, n_out, expected):
    assert _check([5] * n_out, prompt_len=prompt_len, max_model_len=10, max_tokens=None) == expected
    # max_tokens beyond the context does not matter
    assert _check([5] * n_out, prompt_len=prompt_len, max_model_len=10, max_tokens=100) == expected


def test_stop_token_wins_over_context_limit():
    assert _check([5, 2], prompt_len=8, max_model_len=10) == (STOP, None)


def test_no_side_effects():
    out = [5, 6, 7]
    params = SamplingParams(max_tokens=3, stop_token_ids=[7], min_tokens=1)
    before = params.model_dump()
    assert check_stop(out, 3, params, EOS, 100) == (STOP, 7)
    assert check_stop(out, 3, params, EOS, 100) == (STOP, 7)
    assert out == [5, 6, 7] and params.model_dump() == before


def test_token_ids_past_the_vocabulary_are_refused_before_any_step(model_dir):
    """A stop token id or logit bias beyond the model's vocabulary is a ParamError naming the parameter (it would
    index past the logits inside the model step and fail every request in the batch)."""
    from k2ray import LLM
    from k2ray.runtime.sampling import ParamError, SamplingParams

    with LLM(model=model_dir, num_kv_blocks=16) as llm:
        vocab = llm.engine.args.vocab_size
        for kw, param in (({"stop_token_ids": [vocab]}, "stop_token_ids"), ({"logit_bias": {vocab + 5: 1.0}},
                                                                             "logit_bias")):
            with pytest.raises(ParamError) as info:
                llm.generate("hi", SamplingParams(max_tokens=2, min_tokens=1, **kw))
            assert info.value.param == param and f"outside the vocabulary [0, {vocab})" in str(info.value)
        assert llm.engine.num_waiting == 0 and not llm.engine.has_unfinished_requests()
