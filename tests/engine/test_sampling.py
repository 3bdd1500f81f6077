"""The sampler on small hand-computed cases, seeded reproducibility, and parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from k2ray.runtime.sampling import SampleRequest, SamplingParams, apply_penalties, derive_seed, sample


def _req(**kw):
    extra = {k: kw.pop(k) for k in ("output_index", "prompt_ids", "output_ids", "banned_ids", "allowed_mask")
             if k in kw}
    return SampleRequest(SamplingParams(**kw), **extra)


def test_greedy_token_and_logprob():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    (s,) = sample(logits, [_req(temperature=0.0, logprobs=2)])
    lse = math.log(math.e**1 + math.e**3 + math.e**2)
    assert s.token_id == 1
    assert s.logprob == pytest.approx(3.0 - lse)
    assert [t for t, _ in s.top_logprobs] == [1, 2]
    assert s.top_logprobs[1][1] == pytest.approx(2.0 - lse)


def test_repetition_penalty_hand_computed():
    row = torch.tensor([2.0, -1.0, 1.5, 0.5])
    r = _req(repetition_penalty=2.0, prompt_ids=[0], output_ids=[1])
    out = apply_penalties(row.clone(), r)
    # seen tokens: positive logits divided, negative multiplied
    assert out.tolist() == [1.0, -2.0, 1.5, 0.5]
    (s,) = sample(row[None], [_req(temperature=0.0, repetition_penalty=2.0, prompt_ids=[0], output_ids=[1])])
    assert s.token_id == 2
    # reported logprobs are the model's, not the penalized ones
    assert s.logprob == pytest.approx(float(torch.log_softmax(row, -1)[2]))


def test_frequency_and_presence_penalties_hand_computed():
    row = torch.tensor([0.0, 0.0, 3.0, 2.6])
    r = _req(frequency_penalty=0.5, presence_penalty=1.0, output_ids=[2, 2, 3], prompt_ids=[0, 1])
    out = apply_penalties(row.clone(), r).tolist()
    # token 2: 3 - 0.5*2 - 1 = 1.0; token 3: 2.6 - 0.5*1 - 1 = 1.1; prompt tokens are not penalized
    assert out == pytest.approx([0.0, 0.0, 1.0, 1.1])
    r.params = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=1.0)
    assert sample(row[None], [r])[0].token_id == 3
    r.params = SamplingParams(temperature=0.0)
    assert sample(row[None], [r])[0].token_id == 2


def test_banned_ids_and_allowed_mask():
    row = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    assert sample(row, [_req(temperature=0.0, banned_ids=[1])])[0].token_id == 2
    mask = torch.tensor([True, False, False, True])
    assert sample(row, [_req(temperature=0.0, allowed_mask=mask)])[0].token_id == 3


def test_logit_bias_adds_to_the_logits():
    row = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    # +2 on token 2 (4 -> 6) beats token 1; -100 bans; reported logprobs stay the model's
    (s,) = sample(row, [_req(temperature=0.0, logit_bias={2: 2.0})])
    assert s.token_id == 2 and s.logprob == pytest.approx(float(torch.log_softmax(row[0], -1)[2]))
    assert sample(row, [_req(temperature=0.0, logit_bias={1: -100.0, 2: -100.0})])[0].token_id == 3
    assert sample(row, [_req(temperature=0.0, logit_bias={1: 0.5})])[0].token_id == 1
    # sampled: the distribution is softmax(logits + bias)
    freq = _draws(torch.tensor([0.0, 0.0]), logit_bias={1: math.log(3.0)})
    assert freq[1].item() == pytest.approx(0.75, abs=0.04)
    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})


def _draws(logits, n=2000, **kw):
    counts = torch.zeros(logits.numel())
    for i in range(n):
        counts[sample(logits[None], [_req(seed=7, output_index=i, **kw)])[0].token_id] += 1
    return counts / n


def test_top_k_support_and_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    freq = _draws(logits, top_k=2)
    assert freq[0] == 0 and freq[1] == 0
    p2 = math.e**2 / (math.e**2 + math.e**3)  # 0.269
    assert abs(float(freq[2]) - p2) < 0.04


def test_top_p_and_min_p_hand_computed():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # top_p 0.8: 0.5 + 0.3 reaches 0.8 -> keep {0, 1}
    freq = _draws(logits, n=600, top_p=0.8)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 1}
    assert abs(float(freq[0]) - 0.5 / 0.8) < 0.08
    freq = _draws(logits, n=600, top_p=0.81)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 1, 2}
    # min_p 0.2: threshold 0.2 * 0.5 = 0.1 -> keep {0, 1, 2}; min_p 0.4: threshold 0.2 -> keep {0, 1}
    assert set(torch.nonzero(_draws(logits, n=600, min_p=0.2)).flatten().tolist()) == {0, 1, 2}
    assert set(torch.nonzero(_draws(logits, n=600, min_p=0.4)).flatten().tolist()) == {0, 1}


def test_temperature_sharpens():
    logits = torch.tensor([0.0, 1.0])
    hot = float(_draws(logits, n=800, temperature=2.0)[1])
    cold = float(_draws(logits, n=800, temperature=0.25)[1])
    assert abs(hot - 1 / (1 + math.e**-0.5)) < 0.06
    assert abs(cold - 1 / (1 + math.e**-4)) < 0.03


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    reqs = [_req(temperature=1.0, seed=100 + i, output_index=3) for i in range(6)]
    full = [s.token_id for s in sample(logits, reqs)]
    # each row alone, and the batch reversed
    alone = [sample(logits[i : i + 1], [reqs[i]])[0].token_id for i in range(6)]
    rev = [s.token_id for s in sample(logits.flip(0), reqs[::-1])][::-1]
    assert full == alone == rev
    # mixed with greedy and penalized rows
    mixed_reqs = reqs[:3] + [_req(temperature=0.0), _req(temperature=0.0, repetition_penalty=1.5, output_ids=[1])]
    mixed = sample(torch.cat([logits[:3], logits[:2]]), mixed_reqs)
    assert [s.token_id for s in mixed[:3]] == full[:3]


def test_seed_streams_differ_by_output_index_and_child():
    logits = torch.zeros(1, 1000)
    toks = {sample(logits, [_req(seed=5, output_index=i)])[0].token_id for i in range(20)}
    assert len(toks) > 15
    assert derive_seed(5, 0) == 5
    assert len({derive_seed(5, i) for i in range(100)}) == 100


def test_validation_names_the_parameter():
    for kw, name in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                     ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 50}, "logprobs"),
                     ({"min_p": 2}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
                     ({"repetition_penalty": 0}, "repetition_penalty"), ({"stop": [""]}, "stop"),
                     ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(ValidationError, match=name):
            SamplingParams(**kw)
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(temperature=1e-7).greedy
