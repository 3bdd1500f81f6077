"""Grammar masks (xgrammar) over the tiny Kimi vocabulary: random walks through the allowed tokens always yield
outputs that the k2ray parsers accept and that validate against the declared JSON schemas."""

import json

import jsonschema
import pytest
import torch

from k2ray.engine.structured import GrammarError, GuidedDecoding, StructuredOutputs
from k2ray.tokenizer import KimiTokenizer
from k2ray.tokenizer.parsers import parse_output
from k2ray.tokenizer.tiny import write_tokenizer_files

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
           "additionalProperties": False}
CALC = {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 10},
                                         "precision": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["expression"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "calculator", "parameters": CALC}}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return KimiTokenizer.from_dir(d)


@pytest.fixture(scope="module")
def so(tok):
    return StructuredOutputs(tok, tok.vocab_size, tok.stop_token_ids)


def random_walk(so, tok, guided, seed, max_tokens=160, bias=None):
    """Sample uniformly-random logits (a random model) through the grammar mask until a stop token."""
    g = torch.Generator().manual_seed(seed)
    m = so.matcher(guided)
    out = []
    for _ in range(max_tokens):
        allowed = so.allowed_masks([m])[0]
        logits = torch.randn(so.vocab_size, generator=g) * 3
        if bias is not None:
            logits = logits + bias
        logits[~allowed] = float("-inf")
        t = int(torch.argmax(logits))
        assert m.accept(t)
        if t in tok.stop_token_ids:
            return out, True
        out.append(t)
    return out, False


def _stop_bias(tok, vocab):
    # A random model rarely picks the stop token or closes its reasoning; nudge both so walks end within budget.
    b = torch.zeros(vocab)
    b[tok.stop_token_ids] = 4.0
    b[tok.token_to_id("</think>")] = 5.0
    return b


@pytest.mark.parametrize("seed", range(12))
def test_required_tool_call_always_valid(so, tok, seed):
    guided = GuidedDecoding(tools=TOOLS, tool_choice="required", thinking=seed % 2 == 0)
    ids, stopped = random_walk(so, tok, guided, seed, max_tokens=300, bias=_stop_bias(tok, so.vocab_size))
    assert stopped
    text = tok.decode(ids)
    parsed = parse_output(text, thinking=guided.thinking, tools=True)
    msg = parsed.to_message()
    calls = msg.get("tool_calls") or []
    assert calls, text
    for c in calls:
        name = c["function"]["name"]
        schema = {"get_weather": WEATHER, "calculator": CALC}[name]
        jsonschema.validate(json.loads(c["function"]["arguments"]), schema)
    assert not (msg.get("content") or "").strip(), text


def test_named_tool_choice_forces_that_function(so, tok):
    guided = GuidedDecoding(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "calculator"}})
    for seed in range(4):
        ids, _ = random_walk(so, tok, guided, seed, bias=_stop_bias(tok, so.vocab_size))
        calls = parse_output(tok.decode(ids), thinking=False, tools=True).to_message()["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["calculator"]


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_always_validates(so, tok, seed):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["name", "age"], "additionalProperties": False}
    ids, stopped = random_walk(so, tok, GuidedDecoding(json_schema=schema), seed, bias=_stop_bias(tok, so.vocab_size))
    assert stopped
    jsonschema.validate(json.loads(tok.decode(ids)), schema)


def test_choice_regex_and_json_object(so, tok):
    for seed in range(4):
        ids, _ = random_walk(so, tok, GuidedDecoding(choice=["yes", "no", "maybe"]), seed)
        assert tok.decode(ids) in {"yes", "no", "maybe"}
        ids, _ = random_walk(so, tok, GuidedDecoding(regex=r"[0-9]{3}-[a-z]{2}"), seed)
        text = tok.decode(ids)
        assert len(text) == 6 and text[:3].isdigit() and text[3] == "-"
    bias = _stop_bias(tok, so.vocab_size)
    bias[tok.encode("}")] = 3.0  # keep the random object shallow
    ids, stopped = random_walk(so, tok, GuidedDecoding(json_object=True), 0, max_tokens=2000, bias=bias)
    assert stopped
    assert isinstance(json.loads(tok.decode(ids)), dict)


def test_markers_never_allowed_inside_json_strings(so, tok):
    m = so.matcher(GuidedDecoding(tools=TOOLS, tool_choice="required"))
    prefix = '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Pa'
    for t in tok.encode(prefix, allow_special=True):
        assert m.accept(t)
    allowed = so.allowed_masks([m])[0]
    specials = [i for i in range(tok.vocab_size) if tok.is_special(i)]
    assert not allowed[specials].any()
    assert allowed[tok.encode("ris")].all()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"json_schema": '{"type": "object", '}, "json_schema: not valid JSON"),
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "json_schema: cannot compile"),
        ({"regex": "([a-z"}, "regex: cannot compile"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope' is not among"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
    ],
)
def test_invalid_constraints_name_the_problem(so, kwargs, needle):
    with pytest.raises(GrammarError) as e:
        so.compile(GuidedDecoding(**kwargs))
    assert needle in str(e.value)
    assert ".cc:" not in str(e.value) and ".h:" not in str(e.value)  # no C++ source locations for API clients


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one constraint"):
        GuidedDecoding(regex="a", choice=["b"])


@pytest.mark.parametrize("guided", [
    GuidedDecoding(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}, thinking=True),
    GuidedDecoding(tools=TOOLS, tool_choice="required", thinking=True),
], ids=["json_schema", "tools"])
def test_reasoning_may_open_with_think_once(so, tok, guided):
    """K2-Thinking writes its own leading <think> (K2.5's template pre-fills it): both are accepted, a second <think>
    is not, and the constraint starts after </think>."""
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    for opener in ([think], []):
        m = so.matcher(guided)
        assert so.allowed_masks([m])[0][think]
        for t in opener + tok.encode("Let me see."):
            assert m.accept(t)
        allowed = so.allowed_masks([m])[0]
        assert not allowed[think] and allowed[end]
        assert m.accept(end)
        allowed = so.allowed_masks([m])[0]
        assert not allowed[think] and not allowed[end]
        first = "{" if guided.json_schema is not None else "<|tool_calls_section_begin|>"
        assert allowed[tok.encode(first, allow_special=True)[0]]
        assert not allowed[tok.encode("Let")[0]]


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_after_reasoning_validates(so, tok, seed):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    ids, stopped = random_walk(so, tok, GuidedDecoding(json_schema=schema, thinking=True), seed, max_tokens=300,
                               bias=_stop_bias(tok, so.vocab_size))
    assert stopped
    parsed = parse_output(tok.decode(ids), thinking=True, tools=False).to_message()
    jsonschema.validate(json.loads(parsed["content"]), schema)
