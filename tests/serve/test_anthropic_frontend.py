"""The Anthropic Messages API without Ray: the translation onto the chat request (every block type, tool choice,
thinking, sampling), the accumulator's event sequence for scripted model outputs (every event parsed with the
``anthropic`` SDK's own types and folded by the SDK's own stream accumulator into the non-streamed message), and the
HTTP rules (Anthropic's error shape on every failure of the /v1/messages paths), through FastAPI's TestClient against
the scripted model group of the OpenAI front-end tests."""

from __future__ import annotations

import asyncio
import json

import anthropic.types as AT
import httpx
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types.shared.error_response import ErrorResponse
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from k2ray.runtime.sampling import ParamError, SamplingParams
from k2ray.serve.anthropic import protocol as A
from k2ray.serve.anthropic import translate as T
from k2ray.serve.anthropic.accumulate import MessagesAccumulator, signature
from k2ray.serve.ingress import OpenAIIngress
from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.chat import ChatOptions, ChatPlan, plan_chat
from k2ray.serve.openai.errors import APIError, from_exception
from k2ray.serve.openai.limits import Limits
from k2ray.serve.wire import GenerateChunk, GenerateError, SequenceDelta
from k2ray.tokenizer import ChatTemplate, KimiTokenizer
from k2ray.tokenizer.tiny import DATA_DIR

from .test_admission import HeldGroups
from .test_openai_frontend import ANSWER, CALL, MODEL, ScriptedGroups

EVENT = TypeAdapter(AT.RawMessageStreamEvent)
MESSAGE = TypeAdapter(AT.Message)
ERROR = TypeAdapter(ErrorResponse)
LIMITS = Limits(max_model_len=512, default_max_tokens=64, max_sequences=8, max_token_bytes=16)
TOOL = {"name": "get_weather", "description": "Weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_TOOL = {"type": "function", "function": {"name": TOOL["name"], "description": TOOL["description"],
                                                "parameters": TOOL["input_schema"]}}


@pytest.fixture(scope="module")
def tokenizer():
    return KimiTokenizer.from_dir(DATA_DIR)


@pytest.fixture(scope="module")
def template(tokenizer):
    return ChatTemplate.from_dir(DATA_DIR, tokenizer)


def _req(cls=A.MessagesRequest, **kw):
    body = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}], **kw}
    if cls is A.CountTokensRequest:
        body.pop("max_tokens")
    return cls.model_validate_json(json.dumps(body), strict=True)


# -- translation -------------------------------------------------------------------------------------------------------
def test_every_block_type_becomes_chat_messages():
    req = _req(
        system=[{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Look it up.", "signature": "anything"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "22 C"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "is_error": True,
                 "content": [{"type": "text", "text": "city "}, {"type": "text", "text": "unknown"}]},
                {"type": "text", "text": "And now?"}]},
            {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_c"}]},
        ])
    assert T.to_messages(req) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Look it up.", "tool_calls": [
            {"id": "toolu_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "toolu_b", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "22 C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": T.ERROR_PREFIX + "city unknown"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "tool", "tool_call_id": "toolu_c", "content": ""},
    ]


@pytest.mark.parametrize("choice, openai_choice, parallel", [
    (None, None, None),
    ({"type": "auto"}, "auto", None),
    ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
    ({"type": "any"}, "required", None),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}, None),
    ({"type": "none"}, "none", None),
])
def test_tool_choice_mapping(choice, openai_choice, parallel):
    chat = T.to_chat_request(_req(tools=[TOOL], **({"tool_choice": choice} if choice else {})))
    got = chat.tool_choice.model_dump() if isinstance(chat.tool_choice, P.NamedToolChoice) else chat.tool_choice
    assert got == openai_choice and chat.parallel_tool_calls is parallel
    assert [t.model_dump(exclude_none=True) for t in chat.tools] == [OPENAI_TOOL]


@pytest.mark.parametrize("thinking, kwargs", [
    (None, None), ({"type": "enabled", "budget_tokens": 2048}, {"thinking": True}),
    ({"type": "disabled"}, {"thinking": False}), ({"type": "adaptive"}, None),
])
def test_thinking_and_sampling_fields(thinking, kwargs):
    chat = T.to_chat_request(_req(temperature=0, top_p=0.5, top_k=3, stop_sequences=["END"], stream=True,
                                  metadata={"user_id": "u"}, **({"thinking": thinking} if thinking else {})))
    assert chat.chat_template_kwargs == kwargs
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.top_k, chat.stop, chat.stream) == (
        32, 0, 0.5, 3, ["END"], True)


def test_output_format_becomes_a_json_schema_response_format():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    chat = T.to_chat_request(_req(output_config={"format": {"type": "json_schema", "schema": schema}}))
    assert chat.response_format.type == "json_schema" and chat.response_format.json_schema["schema"] == schema


def test_the_prompt_is_the_chat_endpoints_prompt(tokenizer, template):
    """The same conversation through both APIs is the same prompt (one template rendering, one planner)."""
    req = _req(system="Be brief.", tools=[TOOL], thinking={"type": "disabled"}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0",
                                      "content": "22"}]}])
    chat = P.ChatCompletionRequest.model_validate({
        "model": MODEL, "max_tokens": 32, "tools": [OPENAI_TOOL], "chat_template_kwargs": {"thinking": False},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_weather:0",
                      "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "22"}]})
    ours = T.plan_messages(req, template, tokenizer, LIMITS, ChatOptions(), True)
    theirs = plan_chat(chat, template, tokenizer, LIMITS, ChatOptions(), True)
    assert ours.prompt_token_ids == theirs.prompt_token_ids and ours.sampling == theirs.sampling
    assert not ours.thinking and ours.parse_tools
    counted = T.plan_messages(_req(A.CountTokensRequest, system="Be brief.", tools=[TOOL],
                                   thinking={"type": "disabled"}, messages=req.model_dump()["messages"]),
                              template, tokenizer, LIMITS, ChatOptions(), True)
    assert counted.prompt_token_ids == ours.prompt_token_ids


@pytest.mark.parametrize("kw, where", [
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "messages[0].content[1]: image input is not supported by this model"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0]: content block type 'document' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, "messages[0].content[0].content[0]: image blocks are taken in a user "
                                               "turn's content only"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]}]},
     "messages[0].content[0]: a 'tool_use' block is not allowed in a user message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]},
     "messages[1]: a final assistant message (prefill) is not supported"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content: at least one content block"),
    ({"stop_sequences": ["x"] * 65}, "stop_sequences: at most 64 stop strings"),
    ({"max_tokens": 10_000}, "max_tokens: 10000 completion tokens"),
    ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [TOOL]}, "tool_choice: function 'nope'"),
])
def test_refusals_name_the_field(tokenizer, template, kw, where):
    with pytest.raises((ParamError, APIError)) as info:
        T.plan_messages(_req(**kw), template, tokenizer, LIMITS, ChatOptions(), True)
    err = from_exception(info.value)
    assert err.status == 400 and err.message.startswith(where), err.message


# -- the accumulator: scripted model output -> Anthropic's events ------------------------------------------------------
CALL_TEXT = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
             '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')


def _run(texts: list[str], finish="stop", stop_reason=None, thinking=True, stop_sequences=None, cached=2):
    plan = ChatPlan([1] * 10, SamplingParams(), thinking, True, 0, None, ())
    acc = MessagesAccumulator(plan, "msg_x", MODEL, None, stop_sequences)
    sse = [acc.encode(e) for e in acc.start()]
    for i, t in enumerate(texts):
        last = i == len(texts) - 1
        chunk = GenerateChunk([SequenceDelta(0, t, [7, 7], None, finish if last else None,
                                             stop_reason if last else None)], last,
                              num_prompt_tokens=10 if i == 0 else None, num_cached_tokens=cached if i == 0 else 0)
        sse += [acc.encode(e) for e in acc.add(0, chunk)]
    sse += acc.close()
    return acc, sse


def _events(sse: list[str]) -> list[dict]:
    out = []
    for text in sse:
        name, data = text.split("\n")[:2]
        assert name.startswith("event: ") and data.startswith("data: ") and text.endswith("\n\n")
        body = json.loads(data[6:])
        assert body["type"] == name[7:]
        out.append(body)
    return out


def _check_sequence(events: list[dict]) -> list:
    """Anthropic's order: message_start, ping, blocks (start, deltas, stop; in index order), message_delta,
    message_stop; each event valid for the SDK."""
    assert [e["type"] for e in events[:2]] == ["message_start", "ping"]
    assert [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"]
    parsed, open_index, next_index = [], None, 0
    for e in events[2:-2]:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == next_index
            open_index, kind = e["index"], e["content_block"]["type"]
            next_index += 1
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
            assert e["delta"]["type"] == {"thinking": "thinking_delta", "text": "text_delta",
                                          "tool_use": "input_json_delta"}[kind] or (
                kind == "thinking" and e["delta"]["type"] == "signature_delta")
        else:
            assert e["type"] == "content_block_stop" and e["index"] == open_index
            open_index = None
    assert open_index is None
    for e in events:
        if e["type"] != "ping":
            parsed.append(EVENT.validate_python(e))
    return parsed


def _folded(parsed: list) -> dict:
    """What the SDK's own stream accumulator makes of the events (as ``messages.stream().get_final_message()``)."""
    snap, bufs = None, {}
    for ev in parsed:
        snap = accumulate_event(event=ev, current_snapshot=snap, json_bufs=bufs)
    return snap.model_dump(exclude_none=True)


@pytest.mark.parametrize("texts, finish, stop_reason, blocks, reason, seq", [
    (["<think>Paris is", " the capital.</think>", "The capital", " is Paris."], "stop", None,
     [("thinking", "Paris is the capital."), ("text", "The capital is Paris.")], "end_turn", None),
    (["<think>I will look it up.</think>", "\n\n ", CALL_TEXT[:40], CALL_TEXT[40:]], "stop", None,
     [("thinking", "I will look it up."), ("tool_use", {"city": "Paris"})], "tool_use", None),
    (["<think>t</think>Let me ", "check.", CALL_TEXT, "\n", "Done."], "stop", None,
     [("thinking", "t"), ("text", "Let me check."), ("tool_use", {"city": "Paris"}), ("text", "\nDone.")],
     "tool_use", None),
    (["<think>long thought"], "length", None, [("thinking", "long thought")], "max_tokens", None),
    (["<think>x</think>Count: 1, 2"], "stop", "END", [("thinking", "x"), ("text", "Count: 1, 2")], "stop_sequence",
     "END"),
    (["<think>x</think>  \n"], "stop", 163586, [("thinking", "x")], "end_turn", None),  # whitespace only: no text
])
def test_event_sequence_folds_to_the_message(texts, finish, stop_reason, blocks, reason, seq):
    acc, sse = _run(texts, finish, stop_reason, stop_sequences=["END"])
    parsed = _check_sequence(_events(sse))
    message = acc.response().model_dump()
    MESSAGE.validate_python(message)
    got = [(b["type"], b.get("thinking", b.get("text", b.get("input")))) for b in message["content"]]
    assert got == blocks
    assert (message["stop_reason"], message["stop_sequence"]) == (reason, seq)
    assert message["usage"] == {"input_tokens": 8, "output_tokens": 2 * len(texts), "cache_read_input_tokens": 2,
                                "cache_creation_input_tokens": 0}
    for b in message["content"]:
        if b["type"] == "thinking":
            assert b["signature"] == signature(b["thinking"])
        if b["type"] == "tool_use":
            assert b["id"].startswith("toolu_") and b["name"] == "get_weather"
    assert _folded(parsed) == MESSAGE.validate_python(message).model_dump(exclude_none=True)


def test_every_chunking_gives_the_same_message():
    text = "<think>I will look it up.</think>" + CALL_TEXT
    whole, _ = _run([text])
    for size in (1, 3, 7):
        acc, sse = _run([text[i:i + size] for i in range(0, len(text), size)])
        _check_sequence(_events(sse))
        a, b = acc.response().model_dump(), whole.response().model_dump()
        for m in (a, b):
            m["content"][1]["id"] = "toolu_"
            m["usage"]["output_tokens"] = 0
        assert a == b


def test_tool_use_ids_are_fresh_per_call():
    acc, _ = _run([CALL_TEXT + CALL_TEXT.replace(":0", ":1")], thinking=False)
    ids = [b["id"] for b in acc.response().model_dump()["content"]]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.startswith("toolu_") for i in ids)


def test_thinking_off_gives_no_thinking_block():
    acc, sse = _run(["Paris."], thinking=False)
    _check_sequence(_events(sse))
    assert acc.response().model_dump()["content"] == [{"type": "text", "text": "Paris."}]


def test_error_mid_stream_is_one_error_event():
    plan = ChatPlan([1, 2], SamplingParams(), True, True, 0, None, ())
    acc = MessagesAccumulator(plan, "msg_x", MODEL, None)
    (text,) = acc.close(False, APIError(503, "model group g0 failed", "service_unavailable", None, "x"))
    assert text.startswith("event: error\n")
    body = ERROR.validate_python(json.loads(text.split("\n")[1][6:]))
    assert body.error.type == "overloaded_error" and body.error.message == "model group g0 failed"


# -- HTTP: the endpoints against a scripted model group ---------------------------------------------------------------
@pytest.fixture()
def app(tokenizer):
    groups = ScriptedGroups(tokenizer)
    ingress = OpenAIIngress(groups, {"model": "k2ray-tiny", "served_model_name": MODEL, "api_keys": ["sk-test"],
                                     "max_request_bytes": 64 * 1024, "default_max_tokens": 64})
    with TestClient(ingress.build_asgi_app(), headers={"x-api-key": "sk-test", "anthropic-version": "2023-06-01",
                                                       "anthropic-beta": "whatever"}) as client:
        yield client, groups


BODY = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "Capital of France?"}]}


def _anthropic_error(resp: httpx.Response, status: int, type_: str, needle: str = "") -> str:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}, body
    if type_ != "request_too_large":  # Anthropic's documented 413 type, which the SDK's error union lacks
        ERROR.validate_python(body)
    err = body["error"]
    assert err["type"] == type_ and needle in err["message"], body
    assert "Traceback" not in resp.text
    return err["message"]


@pytest.mark.parametrize("script, tools", [([ANSWER], None), ([CALL], [TOOL])])
def test_stream_equals_non_stream(app, script, tools):
    client, groups = app
    groups.script = script
    body = {**BODY, **({"tools": tools} if tools else {})}
    r = client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    message = MESSAGE.validate_python(r.json()).model_dump(exclude_none=True)
    with client.stream("POST", "/v1/messages", json={**body, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        text = "".join(s.iter_text())
    folded = _folded(_check_sequence(_events([e + "\n\n" for e in text.split("\n\n") if e])))
    for m in (message, folded):
        m["id"] = "msg_"
        for b in m["content"]:
            if b["type"] == "tool_use":
                b["id"] = "toolu_"
    assert folded == message
    assert message["stop_reason"] == ("tool_use" if tools else "end_turn")
    assert message["content"][0]["type"] == "thinking"


def test_count_tokens_is_the_planned_prompt(app):
    client, groups = app
    body = {**BODY, "tools": [TOOL], "system": "Be brief."}
    n = client.post("/v1/messages/count_tokens", json={k: v for k, v in body.items() if k != "max_tokens"})
    assert n.status_code == 200 and set(n.json()) == {"input_tokens"}
    r = client.post("/v1/messages", json=body).json()
    assert n.json()["input_tokens"] == len(groups.requests[-1].prompt_token_ids) == (
        r["usage"]["input_tokens"] + r["usage"]["cache_read_input_tokens"])


def test_every_error_has_anthropics_shape(app):
    client, groups = app
    _anthropic_error(client.post("/v1/messages", json={k: v for k, v in BODY.items() if k != "max_tokens"}), 400,
                     "invalid_request_error", "max_tokens: Field required")
    _anthropic_error(client.post("/v1/messages", json={**BODY, "max_tokens": "64"}), 400, "invalid_request_error",
                     "max_tokens")
    _anthropic_error(client.post("/v1/messages", json={**BODY, "messages": [{"role": "system", "content": "x"}]}),
                     400, "invalid_request_error", "messages[0].role")
    _anthropic_error(client.post("/v1/messages", json={**BODY, "tools": [{"type": "web_search_20250305",
                                                                          "name": "web_search"}]}),
                     400, "invalid_request_error", "tools[0]: tool type 'web_search_20250305' is not supported")
    _anthropic_error(client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"}),
                     400, "invalid_request_error", "not valid JSON")
    _anthropic_error(client.post("/v1/messages", json={**BODY, "pad": "x" * 70_000}), 413, "request_too_large")
    _anthropic_error(client.post("/v1/messages", json={**BODY, "model": "claude-x"}), 404, "not_found_error",
                     "claude-x")
    _anthropic_error(client.post("/v1/messages", json=BODY, headers={"x-api-key": "wrong"}), 401,
                     "authentication_error")
    _anthropic_error(client.post("/v1/messages/count_tokens", json=BODY, headers={"x-api-key": ""}), 401,
                     "authentication_error")
    _anthropic_error(client.post("/v1/messages/nope", json=BODY), 404, "not_found_error")
    _anthropic_error(client.get("/v1/messages"), 405, "invalid_request_error")
    assert not groups.requests  # none of these reached the model group
    # a bearer key works as well; the OpenAI paths keep OpenAI's shape
    assert client.post("/v1/messages", json=BODY, headers={"x-api-key": "", "authorization": "Bearer sk-test"}
                       ).status_code == 200
    assert set(client.post("/v1/chat/completions", json={"messages": []}, headers={"x-api-key": "no"}).json()) == {
        "error"}


def test_error_from_the_group(app):
    client, groups = app
    groups.fail_mid_stream = GenerateError(503, "model group g0 failed; the request was aborted",
                                           "service_unavailable", "model_group_failed")
    with client.stream("POST", "/v1/messages", json={**BODY, "stream": True}) as s:
        events = [e for e in "".join(s.iter_text()).split("\n\n") if e]
    assert events[0].startswith("event: message_start") and events[-1].startswith("event: error\n")
    assert ERROR.validate_python(json.loads(events[-1].split("data: ", 1)[1])).error.type == "overloaded_error"
    r = client.post("/v1/messages", json=BODY)
    _anthropic_error(r, 529, "overloaded_error", "model group g0 failed")
    assert r.headers["retry-after"] == "1"


def test_admission_refuses_in_anthropics_shape(tokenizer):
    groups = HeldGroups(tokenizer)
    ingress = OpenAIIngress(groups, {"model": "k2ray-tiny", "served_model_name": MODEL,
                                     "engine": {"max_num_seqs": 1}, "max_queued_requests": 1})
    app = ingress.build_asgi_app()

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            async def held():
                async with client.stream("POST", "/v1/messages", json={**BODY, "stream": True}) as r:
                    return r.status_code, "".join([c async for c in r.aiter_text()])

            tasks = [asyncio.create_task(held()) for _ in range(2)]  # the group holds two
            while len(groups.requests) < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/messages", json=BODY)
            chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            groups.release.set()
            return refused, chat, await asyncio.gather(*tasks)

    refused, chat, done = asyncio.run(scenario())
    _anthropic_error(refused, 529, "overloaded_error", "overloaded")
    assert refused.headers["retry-after"] == "1"
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "overloaded"  # OpenAI's shape there
    assert all(status == 200 and text.rstrip().endswith('data: {"type":"message_stop"}') for status, text in done)
