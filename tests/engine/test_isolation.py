"""One request never hurts another (issue 20): a failure that belongs to one sequence (its sampling, its grammar mask,
its detokenizer) fails that request alone while the others finish with the tokens they get without it; a grammar
that compiles too long or a malformed schema is a 400 naming the part at fault; stop strings are bounded."""

from __future__ import annotations

import time

import pytest

from k2ray.engine.structured import GrammarError, StructuredOutputs
from k2ray.runtime import runner
from k2ray.runtime.guided import GuidedDecoding
from k2ray.runtime.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, ParamError, SamplingParams
from k2ray.tokenizer import KimiTokenizer
from k2ray.tokenizer.tiny import write_tokenizer_files

from .engine_helpers import run_to_completion

PROMPTS = {"a": [5, 17, 300, 41], "b": [9, 8, 7, 6, 5, 4], "c": [1000, 12, 77]}
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SEEDED_N2 = SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=10, ignore_eos=True)


def _submit(engine, which=PROMPTS, n2: bool = True) -> None:
    for rid, prompt in which.items():
        engine.add_request(prompt, PARAMS, request_id=rid)
    if n2:
        engine.add_request([3, 1, 4, 1, 5], SEEDED_N2, request_id="n2")


def _tokens(final) -> dict[str, list[list[int]]]:
    return {rid: [o.token_ids for o in out.outputs] for rid, out in final.items()}


@pytest.fixture
def baseline(make_engine):
    engine = make_engine()
    _submit(engine)
    return _tokens(run_to_completion(engine))


def _run_with_failure(engine, victim: str, inject) -> dict:
    """Three steps of everything, then ``inject(request)`` breaks ``victim``; the rest runs to the end."""
    _submit(engine)
    final = {}
    for _ in range(3):
        for out in engine.step():
            assert not out.finished
    inject(engine.get_request(victim))
    final.update(run_to_completion(engine))
    return final


def _assert_only_victim_failed(final, baseline, victim: str) -> None:
    bad = final[victim]
    assert bad.finished and bad.error and {o.finish_reason for o in bad.outputs} == {"error"}
    # what the client will read: no exception text, file paths or process ids
    assert "other requests are not affected" in bad.error
    assert "/" not in bad.error and "pid" not in bad.error.lower() and "Traceback" not in bad.error
    # What it had before the failure is kept (a sibling processed before the failing sequence keeps that step's token).
    assert all(3 <= len(toks) <= 4 for toks in _tokens({victim: bad})[victim])
    others = {rid: toks for rid, toks in _tokens(final).items() if rid != victim}
    assert others == {rid: toks for rid, toks in baseline.items() if rid != victim}
    assert all(o.finish_reason == "length" for rid, out in final.items() if rid != victim for o in out.outputs)


def _engine_still_serves(engine, baseline) -> None:
    assert engine._dead is None
    engine.add_request(PROMPTS["a"], PARAMS, request_id="again")
    assert _tokens(run_to_completion(engine))["again"] == baseline["a"]
    assert sum(engine.num_free_blocks()) == engine.num_kv_blocks  # the failed request's blocks came back


def test_sampling_failure_of_one_sequence_fails_only_its_request(make_engine, baseline):
    engine = make_engine()
    try:
        final = _run_with_failure(
            engine, "b", lambda req: runner.FAIL_SAMPLING_FOR_SEQ_IDS.update(s.seq_id for s in req.seqs))
    finally:
        runner.FAIL_SAMPLING_FOR_SEQ_IDS.clear()
    _assert_only_victim_failed(final, baseline, "b")
    assert "sampling failed" in final["b"].error
    _engine_still_serves(engine, baseline)


def test_one_failed_sequence_of_n_fails_its_whole_request(make_engine, baseline):
    engine = make_engine()
    try:
        final = _run_with_failure(engine, "n2", lambda req: runner.FAIL_SAMPLING_FOR_SEQ_IDS.add(req.seqs[1].seq_id))
    finally:
        runner.FAIL_SAMPLING_FOR_SEQ_IDS.clear()
    _assert_only_victim_failed(final, baseline, "n2")
    _engine_still_serves(engine, baseline)


class _Boom:
    """Stands in for a detokenizer or grammar matcher that raises (with a message that must not reach a client)."""

    def __init__(self, real=None):
        self.real = real

    def feed(self, tok):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "at /secret/path/tokenizer.py")

    def fill_bitmask(self, bitmask, row=0):
        raise RuntimeError("matcher state lost in /secret/path")


def test_detokenizer_failure_fails_only_its_request(make_engine, baseline):
    engine = make_engine()

    def inject(req):
        req.seqs[0].detok = _Boom()

    final = _run_with_failure(engine, "c", inject)
    _assert_only_victim_failed(final, baseline, "c")
    assert "UnicodeDecodeError" in final["c"].error and "secret" not in final["c"].error
    _engine_still_serves(engine, baseline)


def test_grammar_mask_failure_fails_only_its_request(make_engine, baseline):
    engine = make_engine()

    def inject(req):
        engine.input_processor.grammars()  # built as for a constrained request
        req.seqs[0].matcher = _Boom()

    final = _run_with_failure(engine, "a", inject)
    _assert_only_victim_failed(final, baseline, "a")
    assert "grammar mask" in final["a"].error
    _engine_still_serves(engine, baseline)


def test_streams_survive_a_failed_request(make_engine, baseline):
    """Through the background loop (what the router uses): the failed stream ends with the error, the loop runs on."""
    import asyncio

    engine = make_engine()

    async def collect(rid, prompt, params):
        last = None
        async for out in engine.stream(prompt, params, rid):
            last = out
            if rid == "b" and len(out.outputs[0].token_ids) == 2 and not out.finished:
                runner.FAIL_SAMPLING_FOR_SEQ_IDS.update(s.seq_id for s in engine.get_request("b").seqs)
        return rid, last

    async def main():
        jobs = [collect(rid, p, PARAMS) for rid, p in PROMPTS.items()] + [collect("n2", [3, 1, 4, 1, 5], SEEDED_N2)]
        return dict(await asyncio.gather(*jobs))

    try:
        final = asyncio.run(main())
    finally:
        runner.FAIL_SAMPLING_FOR_SEQ_IDS.clear()
    assert final["b"].error and final["b"].outputs[0].finish_reason == "error"
    assert {rid: t for rid, t in _tokens(final).items() if rid != "b"} == {
        rid: t for rid, t in baseline.items() if rid != "b"}
    assert asyncio.run(engine.generate(PROMPTS["c"], PARAMS, "c2")).outputs[0].token_ids == baseline["c"][0]


# -- grammars ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return KimiTokenizer.from_dir(d)


def _wide_schema(n: int, tag: str) -> dict:
    props = {f"{tag}{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 5 + 1}}}[0-9]+$"} for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props)}


def test_grammar_over_its_compile_budget_is_a_400_and_the_cache_still_serves(tok):
    so = StructuredOutputs(tok, tok.vocab_size, tok.stop_token_ids, compile_timeout_s=0.002)
    heavy = GuidedDecoding(json_schema=_wide_schema(300, "slow"))
    t0 = time.perf_counter()
    with pytest.raises(GrammarError) as e:
        so.compile(heavy)
    assert time.perf_counter() - t0 < 1.0  # the caller is answered at the budget, not when the compile ends
    assert e.value.param == "json_schema" and "too complex" in str(e.value)
    tool = {"type": "function", "function": {"name": "f", "parameters": _wide_schema(300, "t")}}
    tools = GuidedDecoding(tools=[tool], tool_choice="required")
    with pytest.raises(GrammarError) as e:
        so.compile(tools)
    assert e.value.param == "tools"
    # The abandoned compile finished into xgrammar's cache: the same schema is now served within a generous budget.
    so.compile_timeout_s = 30.0
    assert so.compile(heavy) is not None


BAD_VALUES = [None, "abc", -1, 2.5, True, [1], {"x": 1}]


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("key", ["minLength", "maxLength"])
def test_malformed_length_bounds_are_a_400_naming_the_part(make_engine, key, value):
    engine = make_engine()
    prop = {"type": "string", key: value}
    schema = {"type": "object", "properties": {"city": prop}, "required": ["city"]}
    tool = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    for guided, param in ((GuidedDecoding(json_schema=schema), "json_schema"),
                          (GuidedDecoding(tools=tool, tool_choice="auto"), "tools")):
        with pytest.raises(ParamError) as e:
            engine.prepare_request([1, 2, 3], SamplingParams(guided_decoding=guided))
        assert e.value.param == param and key in str(e.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": []}, {"type": 5}, {"type": "object", "required": "city"},
    {"type": "string", "pattern": 5}, {"enum": "x"}, {"type": "array", "items": 3},
    {"type": "integer", "minimum": "a"}, {"minLength": None}, {"type": ["string"], "maxLength": "3"},
])
def test_schema_values_of_the_wrong_type_are_a_400(make_engine, schema):
    engine = make_engine()
    for guided, param in ((GuidedDecoding(json_schema=schema), "json_schema"),
                          (GuidedDecoding(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}],
                                          tool_choice="required"), "tools")):
        try:
            engine.prepare_request([1, 2, 3], SamplingParams(guided_decoding=guided))
        except ParamError as e:
            assert e.param == param
        # (a schema xgrammar accepts as it is is not an error: only a ParamError may come out, never a 500)


# -- stop strings -----------------------------------------------------------------------------------------------------
def test_stop_string_limits():
    SamplingParams.validated(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)
    with pytest.raises(ParamError) as e:
        SamplingParams.validated(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    assert e.value.param == "stop" and str(MAX_STOP_STRINGS) in str(e.value)
    with pytest.raises(ParamError) as e:
        SamplingParams.validated(stop=["ok", "y" * (MAX_STOP_STRING_CHARS + 1)])
    assert e.value.param == "stop" and str(MAX_STOP_STRING_CHARS) in str(e.value)
    assert len(str(e.value)) < 200  # the message does not echo the strings back


def _seq_with_text(text: str, checked: int, stops: list[str]):
    from k2ray.engine.request import Request, Sequence

    params = SamplingParams(stop=stops)
    seq = Sequence(0, Request("r", [1], params), 0, params)
    seq.text, seq.stop_checked = text, checked
    return seq


def test_stop_strings_are_searched_in_the_new_text_plus_a_tail():
    """Each token's search covers only the new text and the last (longest stop - 1) characters before it: a stop
    string wholly inside the text searched before is not looked at again, one straddling the boundary is found."""
    from k2ray.engine.output_processor import _find_stop_string

    stops = ["STOP", "ab"]
    old = "xxSTOPxx" + "." * 10_000  # (a stop string there would have ended the sequence already)
    seq = _seq_with_text(old + "new", len(old), stops)
    assert _find_stop_string(seq) is None and seq.stop_checked == len(old) + 3
    seq = _seq_with_text(old + "STnew", len(old) + 2, stops)  # "ST" | "new" ... no
    assert _find_stop_string(seq) is None
    seq = _seq_with_text(old + "STOPab", len(old) + 3, stops)  # "STO" searched, "Pab" new: straddles
    d = _find_stop_string(seq)
    assert d is not None and d.stop_reason == "STOP" and seq.text == old  # the earliest match, cut before it
    inc = SamplingParams(stop=stops, include_stop_str_in_output=True)
    seq = _seq_with_text(old + "abSTOP", len(old), stops)
    seq.params = inc
    assert _find_stop_string(seq).stop_reason == "ab" and seq.text == old + "ab"
