"""Output parsers: every failure mode other engines shipped for Kimi K2, and streaming == one-shot."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2ray.tokenizer import IncrementalDetokenizer, KimiTokenizer
from k2ray.tokenizer.chat import thinking_enabled
from k2ray.tokenizer.parsers import (
    MARKERS,
    ParsedOutput,
    StreamingOutputParser,
    parse_output,
    parse_reasoning,
    parse_tool_calls,
)
from k2ray.tokenizer.kimi_format import split_call_id
from k2ray.tokenizer.tiny import DATA_DIR

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(cid, args):
    return f"{CB}{cid}{AB}{args}{CE}"


def stream(text, chunks=None, **kw):
    """Feed ``text`` in the given chunk sizes (default: one character at a time)."""
    p = StreamingOutputParser(**kw)
    deltas = []
    if chunks is None:
        pieces = list(text)
    else:
        pieces, i = [], 0
        for n in chunks:
            pieces.append(text[i : i + n])
            i += n
        pieces.append(text[i:])
    for piece in pieces:
        deltas.extend(p.feed(piece))
    deltas.extend(p.finish())
    res = ParsedOutput.from_deltas(deltas)
    assert res == p.result
    return res, deltas


def no_marker_leak(res):
    for m in MARKERS:
        assert m not in res.content and m not in res.reasoning_content, m
        for c in res.tool_calls:
            assert m not in c["id"] and m not in c["function"]["name"]


def check_deltas(deltas):
    """First delta of a call carries index/id/type/name; later ones only argument text."""
    seen = set()
    for d in deltas:
        for tc in d.get("tool_calls", ()):
            if tc["index"] not in seen:
                assert set(tc) == {"index", "id", "type", "function"} and tc["type"] == "function"
                assert tc["function"]["name"] and tc["function"]["arguments"] == ""
                seen.add(tc["index"])
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
    assert seen == set(range(len(seen)))


def calls(res):
    return [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in res.tool_calls]


# ------------------------------------------------------------------------------- tool calls


def test_basic_tool_call_one_shot_and_streaming():
    text = "Checking." + SB + call("functions.get_weather:0", '{"city": "Paris"}') + SE
    content, tcs = parse_tool_calls(text)
    assert content == "Checking."
    assert tcs == [{"id": "functions.get_weather:0", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    res, deltas = stream(text, thinking=False)
    assert res.content == "Checking." and res.tool_calls == tcs
    check_deltas(deltas)
    assert res.to_message() == {"role": "assistant", "content": "Checking.", "tool_calls": tcs}


def test_parallel_calls_without_whitespace_and_markup_in_arguments():
    a1 = '{"html": "<div class=\\"x\\">a < b && c > d</div>", "re": "<[^>]+>"}'
    a2 = '{"xml": "<tool_call>not a marker</tool_call>", "pipe": "<|x|>"}'
    a3 = '{"n": 3}'
    text = SB + call("functions.render:0", a1) + call("functions.parse:1", a2) + call("functions.n:2", a3) + SE
    for res in (parse_output(text, thinking=False), stream(text, thinking=False)[0]):
        assert calls(res) == [("functions.render:0", "render", a1), ("functions.parse:1", "parse", a2),
                              ("functions.n:2", "n", a3)]
        assert res.content == ""


def test_several_markers_in_one_delta_and_split_markers():
    text = ("<think>plan</think>Before " + SB + call("functions.f:0", '{"a": 1}') + " \n "
            + call("functions.g:1", '{"b": [1, 2]}') + SE + " between " + SB + call("functions.h:2", "{}") + SE + " after")
    expected = parse_output(text)
    assert expected.reasoning_content == "plan"
    assert expected.content == "Before  between  after"
    assert [c[0] for c in calls(expected)] == ["functions.f:0", "functions.g:1", "functions.h:2"]
    # whole output in one delta (speculative decoding), every single split point, and byte-by-byte
    assert stream(text, [len(text)])[0] == expected
    for cut in range(1, len(text)):
        res, deltas = stream(text, [cut])
        assert res == expected, cut
        no_marker_leak(res)
    res, deltas = stream(text)
    assert res == expected
    check_deltas(deltas)
    # no delta ever carries a fragment of a marker
    for d in deltas:
        for key in ("content", "reasoning_content"):
            if key in d:
                assert "<|" not in d[key] and "<think" not in d[key] and "</" not in d[key]


def test_large_arguments_arrive_whole():
    value = ("line one\nzweite Zeile ünïcödé 你好 😀 <b>\"quoted\"</b>\n" * 1200)[: 64 * 1024]
    args = json.dumps({"text": value, "n": list(range(50))}, ensure_ascii=False, indent=2)
    assert len(args.encode()) > 64 * 1024 and "\n" in args
    text = SB + call("functions.write_file:0", args) + SE
    for kw in ({}, {"stream_arguments": True}):
        res, deltas = stream(text, [997] * (len(text) // 997), thinking=False, **kw)
        assert calls(res) == [("functions.write_file:0", "write_file", args)]
        assert json.loads(res.tool_calls[0]["function"]["arguments"])["text"] == value
        check_deltas(deltas)
    res, deltas = stream(text, thinking=False, stream_arguments=True)  # byte by byte: many increments
    assert calls(res)[0][2] == args
    assert sum(1 for d in deltas if "tool_calls" in d) > 1000


@pytest.mark.parametrize(
    "raw, name, cid",
    [
        ("functions.a.b-c:3", "a.b-c", "functions.a.b-c:3"),
        ("a:3", "a", "functions.a:3"),
        ("call_x", "call_x", "functions.call_x:7"),
        ("\nfunctions.get_weather:0\n", "get_weather", "functions.get_weather:0"),
        ("  functions.mcp:server:tool:12 ", "mcp:server:tool", "functions.mcp:server:tool:12"),
        ("functions.search", "search", "functions.search:7"),
    ],
)
def test_id_variants(raw, name, cid):
    text = SB + call(raw, '{"q": 1}') + SE
    res = parse_output(text, thinking=False, tool_call_offset=7)
    assert calls(res) == [(cid, name, '{"q": 1}')]
    assert stream(text, thinking=False, tool_call_offset=7)[0] == res


def test_index_without_model_idx_counts_across_conversation():
    text = SB + call("f", "{}") + call("functions.g", "{}") + call("h:9", "{}") + SE
    res = parse_output(text, thinking=False, tool_call_offset=4)
    assert [c[0] for c in calls(res)] == ["functions.f:4", "functions.g:5", "functions.h:9"]


def test_split_call_id():
    assert split_call_id("functions.a.b-c:3") == ("a.b-c", 3)
    assert split_call_id(" x ") == ("x", None)
    assert split_call_id("") is None and split_call_id("two words:1") is None


def test_singular_section_spelling():
    text = "<|tool_call_section_begin|>" + call("functions.f:0", '{"a": 1}') + "<|tool_call_section_end|>done"
    res = parse_output(text, thinking=False)
    assert calls(res) == [("functions.f:0", "f", '{"a": 1}')] and res.content == "done"
    assert stream(text, thinking=False)[0] == res


# ------------------------------------------------------------------------------- degradation


@pytest.mark.parametrize(
    "text, content",
    [
        ("x" + SB + call("functions.f:0", '{"a": ') + SE + "y", 'xfunctions.f:0{"a": y'),  # invalid JSON
        ("x" + SB + call("functions.f:0", "[1, 2]") + SE, "xfunctions.f:0[1, 2]"),  # not an object
        ("x" + SB + call("functions.f:0", "not json at all") + SE, "xfunctions.f:0not json at all"),
        ("x" + SB + CB + "functions.f:0" + AB + '{"a": 1', 'xfunctions.f:0{"a": 1'),  # cut by max_tokens
        ("x" + SB + CB + "functions.f:0" + AB + '{"a": 1}', 'xfunctions.f:0{"a": 1}'),  # no call end
        ("x" + SB + CB + "functions.f", "xfunctions.f"),  # cut inside the id
        ("x" + SB + CB + "functions.f:0" + CE + SE, "xfunctions.f:0"),  # no argument marker
        ("x" + SB + CB + AB + "{}" + CE + SE, "x{}"),  # no id
        ("x" + SB, "x"),  # empty unterminated section
        ("x" + SB + " junk " + SE, "x junk "),  # stray text in a section
        ("x<|tool_call", "x<|tool_call"),  # a cut-off marker prefix at the very end is literal text
    ],
)
def test_invalid_or_truncated_calls_degrade_to_content(text, content):
    res = parse_output(text, thinking=False)
    assert res.tool_calls == [] and res.content == content
    for chunks in (None, [1] * 3 + [5] * 40):
        assert stream(text, chunks, thinking=False)[0] == res


def test_valid_calls_survive_next_to_broken_ones():
    text = SB + call("functions.a:0", "{bad") + call("functions.b:1", '{"ok": true}') + SE
    res = parse_output(text, thinking=False)
    assert calls(res) == [("functions.b:1", "b", '{"ok": true}')]
    assert res.content == "functions.a:0{bad"


def test_never_raises_on_garbage():
    junk = "".join(MARKERS) * 3 + "<|<|>|" + CB * 2 + AB * 2 + "{" + CE * 2 + "</think><think>"
    for thinking in (True, False):
        for kw in ({}, {"stream_arguments": True}):
            res = parse_output(junk, thinking=thinking)
            assert stream(junk, thinking=thinking, **kw)[0].content == res.content
            visible = res.content + res.reasoning_content
            assert not any(m in visible for m in MARKERS if thinking or "think" not in m)


# ------------------------------------------------------------------------------- reasoning


def test_tool_section_right_after_reasoning_without_think_end():
    text = "<think>I should look it up" + SB + call("functions.get_weather:0", '{"city": "Oslo"}') + SE
    res = parse_output(text)
    assert res.reasoning_content == "I should look it up" and res.content == ""
    assert calls(res) == [("functions.get_weather:0", "get_weather", '{"city": "Oslo"}')]
    assert stream(text)[0] == res
    assert res.to_message()["content"] is None
    assert parse_reasoning(text) == ("I should look it up", text[len("<think>I should look it up"):])


@pytest.mark.parametrize("prefix", ["<think>", ""])  # output starting with <think> / inside a pre-filled one
def test_reasoning_with_or_without_leading_think(prefix):
    text = prefix + "Let me think.\nStep 2.</think>\n\nThe answer is 84."
    res = parse_output(text)
    assert res.reasoning_content == "Let me think.\nStep 2."
    assert res.content == "\n\nThe answer is 84."
    assert stream(text)[0] == res
    assert parse_reasoning(text) == (res.reasoning_content, res.content)


def test_max_tokens_cutting_reasoning_keeps_it_reasoning():
    for text in ("<think>still thinking about", "<think>still thinking about</thi", "still thinking"):
        res = parse_output(text)
        assert res.content == "" and res.reasoning_content == text.replace("<think>", "")
        assert stream(text)[0] == res
        assert parse_reasoning(text) == (res.reasoning_content, "")


@pytest.mark.parametrize("switch", [False, "false", "False", "0"])
def test_thinking_switch_turns_reasoning_parsing_off(switch):
    text = "The answer is 84." + SB + call("functions.f:0", "{}") + SE
    res = parse_output(text, thinking=thinking_enabled({"thinking": switch}))
    assert res.reasoning_content == "" and res.content == "The answer is 84."
    assert calls(res) == [("functions.f:0", "f", "{}")]
    assert parse_reasoning(text, thinking=False) == ("", text)
    assert parse_output("<think>x</think>y", thinking=False).content == "<think>x</think>y"


def test_reasoning_then_content_then_tools_then_content():
    text = "<think>r1</think>c1" + SB + call("functions.f:0", "{}") + SE + "c2"
    res = parse_output(text)
    assert (res.reasoning_content, res.content) == ("r1", "c1c2")


# ------------------------------------------------------------------------------- with the tokenizer


def test_parsers_see_specials_even_when_client_skips_them():
    tok = KimiTokenizer.from_dir(DATA_DIR)
    output = ("<think>Need weather.</think>Sure." + SB + call("functions.get_weather:0", '{"city": "Paris"}') + SE
              + "<|im_end|>")
    ids = tok.encode(output, allow_special=True)
    assert tok.special_tokens["<|tool_call_begin|>"] in ids
    # the client asked for skip_special_tokens=True: the visible text would lose every marker ...
    assert "get_weather" in tok.decode(ids, skip_special_tokens=True)
    # ... so the parser reads the text WITH specials and hides the remaining specials itself
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    p = StreamingOutputParser(thinking=True, tools=True, hidden_tokens=tok.special_tokens)
    deltas = []
    for i in ids:
        deltas += p.feed(detok.feed(i))
    deltas += p.feed(detok.flush()) + p.finish()
    res = ParsedOutput.from_deltas(deltas)
    assert res.reasoning_content == "Need weather." and res.content == "Sure."
    assert calls(res) == [("functions.get_weather:0", "get_weather", '{"city": "Paris"}')]
    check_deltas(deltas)


def test_hidden_tokens_inside_arguments_are_kept():
    args = '{"s": "[EOS] and <|im_end|> and <think>"}'
    text = "a[EOS]b" + SB + call("functions.f:0", args) + SE
    res = parse_output(text, thinking=False, hidden_tokens=["[EOS]", "<|im_end|>"])
    assert res.content == "ab" and calls(res)[0][2] == args


# ------------------------------------------------------------------------------- properties

SAFE_ALPHABET = "ab Z9.,:;\n\t<>|/_{}[]\"'éß中😀"
safe_text = st.text(alphabet=SAFE_ALPHABET, max_size=12).filter(lambda s: not any(m in s for m in MARKERS))
NAMES = ["get_weather", "a.b-c", "calc", "ns:tool", "x1"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | safe_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=6,
)
WS = st.sampled_from(["", " ", "\n", " \n "])


@st.composite
def model_outputs(draw, allow_invalid=True):
    """A random model output and the result it must parse to."""
    thinking = draw(st.booleans())
    offset = draw(st.integers(0, 5))
    parts, reasoning, content, tool_calls = [], "", "", []
    ending = "end"
    if thinking:
        if draw(st.booleans()):
            parts.append("<think>")
        r = draw(safe_text)
        parts.append(r)
        reasoning = r
        ending = draw(st.sampled_from(["end", "section", "none"]))
        if ending == "end":
            parts.append("</think>")
    if ending != "none":
        kinds = draw(st.lists(st.sampled_from(["text", "section"]), max_size=4))
        if ending == "section":
            kinds = ["section"] + kinds
        prev = None
        for i, kind in enumerate(kinds):
            if kind == "text" and prev != "text":
                t = draw(safe_text)
                parts.append(t)
                content += t
            elif kind == "section":
                parts.append(draw(st.sampled_from(["<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"])))
                for _ in range(draw(st.integers(0, 3))):
                    parts.append(draw(st.sampled_from(["", "", " ", "\n"])))  # between calls: dropped
                    name = draw(st.sampled_from(NAMES))
                    idx = draw(st.one_of(st.none(), st.integers(0, 20)))
                    prefix = draw(st.sampled_from(["functions.", ""]))
                    raw_id = draw(WS) + prefix + name + ("" if idx is None else f":{idx}") + draw(WS)
                    valid = not allow_invalid or draw(st.integers(0, 4)) > 0
                    if valid:
                        args = json.dumps(
                            draw(st.dictionaries(safe_text, json_values, max_size=3)),
                            ensure_ascii=draw(st.booleans()),
                            indent=draw(st.sampled_from([None, 2])),
                            separators=draw(st.sampled_from([None, (",", ":")])),
                        )
                    else:
                        args = draw(st.sampled_from(["{", "[1]", "nope", '{"a": }', '{"a": 1']))
                    ws_a, ws_b = draw(WS), draw(WS)
                    parts.append(CB + raw_id + AB + ws_a + args + ws_b + CE)
                    if valid:
                        n = len(tool_calls)
                        cid = f"functions.{name}:{offset + n if idx is None else idx}"
                        tool_calls.append({"id": cid, "type": "function", "function": {"name": name, "arguments": args}})
                    else:
                        content += raw_id + ws_a + args + ws_b
                last = i == len(kinds) - 1
                if not (last and draw(st.booleans())):  # a missing section end at the very end is tolerated
                    parts.append(draw(st.sampled_from(["", " "])))
                    parts.append(draw(st.sampled_from([SE, "<|tool_call_section_end|>"])))
            prev = kind
    expected = ParsedOutput(reasoning, content, tool_calls)
    return "".join(parts), thinking, offset, expected


def _chunks(text, cuts):
    cuts = sorted(set(c % (len(text) + 1) for c in cuts))
    sizes, prev = [], 0
    for c in cuts:
        sizes.append(c - prev)
        prev = c
    return sizes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_outputs(), st.lists(st.integers(0, 10**6), max_size=25))
def test_streaming_equals_one_shot_for_any_chunking(case, cuts):
    text, thinking, offset, expected = case
    one_shot = parse_output(text, thinking=thinking, tool_call_offset=offset)
    assert one_shot == expected
    no_marker_leak(one_shot)
    for chunks in (_chunks(text, cuts), None, [len(text)]):
        res, deltas = stream(text, chunks, thinking=thinking, tool_call_offset=offset)
        assert res == one_shot  # names, ids and byte-identical arguments
        check_deltas(deltas)
        for d in deltas:
            for key in ("content", "reasoning_content"):
                assert not any(m in d.get(key, "") for m in MARKERS)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_outputs(allow_invalid=False), st.lists(st.integers(0, 10**6), max_size=25))
def test_argument_streaming_mode_agrees_on_valid_output(case, cuts):
    text, thinking, offset, expected = case
    for chunks in (_chunks(text, cuts), None):
        res, deltas = stream(text, chunks, thinking=thinking, tool_call_offset=offset, stream_arguments=True)
        assert res == expected
        check_deltas(deltas)
