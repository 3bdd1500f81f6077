"""Grammar-constrained decoding through the engine (xgrammar masks from ``k2ray.engine.structured``)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from k2ray.runtime.sampling import SamplingParams
from k2ray.engine.structured import GrammarError, GuidedDecoding

from .engine_helpers import run_to_completion

pytest.importorskip("xgrammar")


def _run(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    return run_to_completion(engine)[rid].outputs


def test_choice_regex_and_json_schema(make_engine):
    engine = make_engine()
    prompt = engine.tokenizer.encode("answer:")
    outs = _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=16,
                                               guided_decoding=GuidedDecoding(choice=["yes", "no", "maybe"])))
    assert outs[0].text in ("yes", "no", "maybe") and outs[0].finish_reason == "stop"
    outs = _run(engine, prompt, SamplingParams(temperature=0.9, seed=3, max_tokens=16, n=3,
                                               guided_decoding=GuidedDecoding(regex=r"[0-9]{3}-[a-c]")))
    for o in outs:
        assert re.fullmatch(r"[0-9]{3}-[a-c]", o.text), o.text
        assert o.finish_reason == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    # Compact JSON through an EBNF grammar (with a json_schema constraint a random-weight model wanders through
    # the whitespace that JSON allows between tokens until max_tokens).
    ebnf = 'root ::= "{\\"n\\":" [0-9] ",\\"ok\\":" ("true" | "false") "}"'
    outs = _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=48,
                                               guided_decoding=GuidedDecoding(grammar=ebnf)))
    jsonschema.validate(json.loads(outs[0].text), schema)
    assert outs[0].finish_reason == "stop"
    # unconstrained greedy output of the same prompt is not of that form
    free = _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=8))[0].text
    assert free not in ("yes", "no", "maybe")


def test_guided_mixed_with_free_requests_and_preemption(make_engine):
    engine = make_engine(num_kv_blocks=12, max_num_batched_tokens=16)
    g = SamplingParams(temperature=0.0, max_tokens=12, guided_decoding=GuidedDecoding(regex=r"(ab|cd){1,3}"))
    free = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ids = []
    for i in range(6):
        ids.append(engine.add_request([5 + i] * (3 + i), g if i % 2 == 0 else free))
    final = run_to_completion(engine)
    for i, rid in enumerate(ids):
        out = final[rid].outputs[0]
        if i % 2 == 0:
            assert re.fullmatch(r"(ab|cd){1,3}", out.text), out.text
        else:
            assert len(out.token_ids) == 20
    assert engine.kv_cache_usage() == 0.0


def test_bad_grammar_is_a_request_error(make_engine):
    engine = make_engine()
    with pytest.raises(GrammarError, match="json_schema"):
        engine.add_request([1, 2], SamplingParams(guided_decoding=GuidedDecoding(json_schema="{not json")))
    with pytest.raises(ValueError, match="constraint"):
        SamplingParams(guided_decoding={"regex": "a", "choice": ["b"]})
    assert not engine.has_unfinished_requests()


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city"], "additionalProperties": False}
CALC = {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 16}},
        "required": ["expression"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "calculator", "parameters": CALC}}]


def test_required_tool_calls_always_valid_and_free_requests_unaffected(make_engine):
    """The tiny random model: every constrained output is a well-formed call to a declared tool with
    schema-valid arguments; free greedy requests in the same batches are token-identical to running alone."""
    from k2ray.tokenizer.parsers import parse_output

    engine = make_engine()
    prompt = engine.tokenizer.encode("What's the weather in Paris?")
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = _run(engine, prompt, free)[0].token_ids
    # One call per response (a random model would otherwise chain parallel calls up to max_tokens).
    guided = GuidedDecoding(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    schema = {"get_weather": WEATHER, "calculator": CALC}
    ids, frees = [], []
    for seed in range(16):
        p = SamplingParams(temperature=1.0, seed=seed, max_tokens=160, guided_decoding=guided,
                           skip_special_tokens=False)
        ids.append(engine.add_request(prompt, p))
        if seed % 4 == 0:
            frees.append(engine.add_request(prompt, free))
    final = run_to_completion(engine)
    for rid in ids:
        out = final[rid].outputs[0]
        assert out.finish_reason == "stop", out.text
        msg = parse_output(out.text, thinking=False, tools=True).to_message()
        assert msg.get("tool_calls"), out.text
        for call in msg["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema[call["function"]["name"]])
    for rid in frees:
        assert final[rid].outputs[0].token_ids == alone
    assert engine.num_constrained_requests == 16 and engine.grammar_mask_time_s > 0


def test_json_schema_outputs_always_validate(make_engine):
    engine = make_engine()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    prompt = engine.tokenizer.encode("Give me a person as JSON.")
    ids = [engine.add_request(prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=64,
                                                     guided_decoding=GuidedDecoding(json_schema=schema)))
           for s in range(10)]
    final = run_to_completion(engine)
    for rid in ids:
        out = final[rid].outputs[0]
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
