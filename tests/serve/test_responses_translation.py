"""The Responses API without Ray: input items -> chat messages, the request's fields -> the chat plan, the event
sequence (every event validated with the openai SDK's own ``ResponseStreamEvent`` type, the final object with its
``Response``), the store (TTL, bound, delete), and the endpoints through FastAPI's TestClient driven by the official
``openai`` client, against the scripted model group of test_openai_frontend."""

from __future__ import annotations

import json
import typing

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from k2ray.serve.ingress import OpenAIIngress
from k2ray.serve.openai.accumulate import ChatAccumulator
from k2ray.serve.openai.chat import ChatOptions
from k2ray.serve.openai.errors import APIError
from k2ray.serve.openai.responses_api import ResponsesRequest, items_to_messages, plan_response
from k2ray.serve.openai.responses_events import ResponsesAccumulator
from k2ray.serve.response_store import ResponseStore
from k2ray.serve.wire import GenerateChunk, GenerateError, SequenceDelta

from .test_openai_frontend import ANSWER, CALL, LIMITS, MODEL, ScriptedGroups, template, tokenizer  # noqa: F401

EVENT = TypeAdapter(ResponseStreamEvent)
# The union's discriminator (``type``) is the SDK's own annotation, which pydantic does not read: each event is also
# validated by its own class, so that a failure names the one event type that did not fit.
EVENT_CLASSES = {typing.get_args(c.model_fields["type"].annotation)[0]: c
                 for c in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": False}


def _plan(tokenizer, template, previous=None, **body):
    req = ResponsesRequest.model_validate({"model": MODEL, **body})
    return plan_response(req, previous, template, tokenizer, LIMITS, ChatOptions(), True)


def _bad(fn, *args, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **kw)
    assert e.value.status == 400, e.value.body()
    return e.value


# -- input items -> chat messages --------------------------------------------------------------------------------------
def test_items_become_chat_messages():
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                        {"type": "input_text", "text": "Paris?"}]},
        # one assistant turn, as a Responses client sends a previous output back
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "short"}],
         "content": [{"type": "reasoning_text", "text": "I should call the tool."}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_abc", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_abc", "output": '{"temperature_c": 22}'},
        # a reasoning item with only a summary: its summary text is the reasoning
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "Answer now."}]},
        {"type": "message", "role": "assistant", "content": "It is 22 C."},
        {"role": "user", "content": "Thanks"},
    ]
    assert items_to_messages(items) == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "call_abc", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature_c": 22}'},
        {"role": "assistant", "content": "It is 22 C.", "reasoning_content": "Answer now."},
        {"role": "user", "content": "Thanks"},
    ]
    # calls alone: content null, as chat has it
    only_call = items_to_messages([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}])
    assert only_call == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


@pytest.mark.parametrize("items, param", [
    ([{"role": "assistant", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}],
     "input[0].content[0]"),
    ([{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}], "input[0].content[0].file_id"),
    ([{"role": "user", "content": [{"type": "input_image"}]}], "input[0].content[0].image_url"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
    ([{"type": "message", "role": "tool", "content": "x"}], "input[0].role"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
    ([{"type": "function_call_output", "call_id": "c"}], "input[0].output"),
    (["just a string"], "input[0]"),
])
def test_bad_items_name_the_field(items, param):
    err = _bad(items_to_messages, items)
    assert err.param == param, err.body()
    if "image" in json.dumps(items):
        assert "input_image" in err.message or "image_url" in err.message or "file ids" in err.message


# -- the request's fields -> the chat plan -----------------------------------------------------------------------------
def test_fields_map_onto_the_chat_plan(tokenizer, template):
    t = _plan(tokenizer, template, input="Hi", instructions="You are terse.", tools=[WEATHER],
              tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=20, temperature=0,
              top_p=0.5, metadata={"k": "v"}, user="u1", parallel_tool_calls=False)
    p = t.plan
    assert p.sampling.max_tokens == 20 and p.sampling.temperature == 0 and p.sampling.top_p == 0.5
    assert p.sampling.guided_decoding.tool_choice == {"name": "get_weather"}
    assert not p.sampling.guided_decoding.parallel_tool_calls
    text = tokenizer.decode(p.prompt_token_ids)
    assert "You are terse." in text and "get_weather" in text
    assert t.echo["tools"] == [WEATHER] and t.echo["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert t.items == [{"type": "message", "role": "user", "content": "Hi"}]
    # the same conversation through the chat planner gives the same prompt
    from k2ray.serve.openai import protocol as P
    from k2ray.serve.openai.chat import plan_chat
    chat_plan = plan_chat(P.ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        "tools": [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]}),
        template, tokenizer, LIMITS, ChatOptions(), True)
    assert chat_plan.prompt_token_ids == p.prompt_token_ids

    # an absent strict is not strict (as in chat; the declaration reaches the model as given); strict: a grammar
    t = _plan(tokenizer, template, input="Hi", tools=[{k: v for k, v in WEATHER.items() if k != "strict"}])
    assert t.echo["tools"][0]["strict"] is False and t.plan.sampling.guided_decoding is None
    assert '"strict"' not in tokenizer.decode(t.plan.prompt_token_ids)
    t = _plan(tokenizer, template, input="Hi", tools=[{**WEATHER, "strict": True}])
    assert t.echo["tools"][0]["strict"] is True and t.plan.sampling.guided_decoding is not None
    # reasoning effort none / minimal switch thinking off; text.format -> structured output
    assert not _plan(tokenizer, template, input="Hi", reasoning={"effort": "minimal"}).plan.thinking
    assert _plan(tokenizer, template, input="Hi", reasoning={"effort": "high"}).plan.thinking
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    t = _plan(tokenizer, template, input="Hi", text={"format": {"type": "json_schema", "name": "c", "schema": schema,
                                                                "strict": True}})
    assert t.plan.sampling.guided_decoding.json_schema == schema
    assert t.echo["text"]["format"]["name"] == "c"
    assert _plan(tokenizer, template, input="Hi", text={"format": {"type": "json_object"}}
                 ).plan.sampling.guided_decoding.json_object


def test_previous_response_continues_the_conversation(tokenizer, template):
    first = _plan(tokenizer, template, input="Weather in Paris?", instructions="Old instructions.")
    output = [{"type": "function_call", "id": "fc_1", "call_id": "functions.get_weather:0", "name": "get_weather",
               "arguments": '{"city": "Paris"}', "status": "completed"}]
    record = {"items": first.items, "response": {"output": output}}
    t = _plan(tokenizer, template, previous=record, previous_response_id="resp_1", tools=[WEATHER],
              input=[{"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "22 C"}])
    assert t.items == first.items + output + [
        {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "22 C"}]
    text = tokenizer.decode(t.plan.prompt_token_ids)
    assert "Weather in Paris?" in text and "22 C" in text
    assert "Old instructions." not in text  # instructions are not carried over
    assert t.plan.tool_call_offset == 1


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": []}]}, "tools[1].type"),
    ({"tools": [{**WEATHER, "name": "bad name"}]}, "tools[0].name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"reasoning": {"effort": "maximal"}}, "reasoning.effort"),
    ({"max_output_tokens": 10_000}, "max_output_tokens"),
    ({"temperature": 9.0}, "temperature"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": None}, "input"),
])
def test_bad_requests_name_the_field(tokenizer, template, body, param):
    err = _bad(_plan, tokenizer, template, **{"input": "Hi", **body})
    assert err.param == param, err.body()
    assert err.message.startswith(param) or param in err.message, err.message


# -- the event sequence --------------------------------------------------------------------------------------------------
def _accumulator(tokenizer, template, **body) -> ResponsesAccumulator:
    turn = _plan(tokenizer, template, **{"input": "Hi", **body})
    chat = ChatAccumulator(turn.plan, 1, "resp_test", MODEL, turn.created_at, tokenizer)
    return ResponsesAccumulator(chat, turn, "resp_test", MODEL)


def _chunks(tokenizer, text: str, finish: str = "stop", per: int = 2) -> list[GenerateChunk]:
    ids = tokenizer.encode_with_specials(tokenizer.split_special(text))
    out = []
    for k in range(0, len(ids), per):
        new = ids[k:k + per]
        last = k + per >= len(ids)
        out.append(GenerateChunk(outputs=[SequenceDelta(0, tokenizer.decode(new), new, None,
                                                        finish if last else None)],
                                 finished=last, num_prompt_tokens=7 if k == 0 else None, num_cached_tokens=3))
    return out


def _run(acc: ResponsesAccumulator, chunks, error=None) -> list[dict]:
    """The stream as a client sees it: every event decoded from its SSE text and validated with the SDK's types."""
    texts = [acc.encode(e) for e in acc.start()]
    for c in chunks:
        texts += [acc.encode(e) for e in acc.add(0, c)]
    texts += acc.close(False, error)
    events = []
    for t in texts:
        head, data = t.rstrip("\n").split("\n")
        ev = json.loads(data.removeprefix("data: "))
        assert head == f"event: {ev['type']}"
        EVENT_CLASSES[ev["type"]].model_validate(ev)
        EVENT.validate_python(ev)
        events.append(ev)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _reassemble(events: list[dict]) -> list[dict]:
    """The output items rebuilt from the deltas alone (as a streaming client does)."""
    items: dict[int, dict] = {}
    for e in events:
        t = e["type"]
        if t == "response.output_item.added":
            items[e["output_index"]] = {**e["item"], "_text": ""}
        elif t in ("response.reasoning_text.delta", "response.output_text.delta",
                   "response.function_call_arguments.delta"):
            items[e["output_index"]]["_text"] += e["delta"]
        elif t == "response.reasoning_summary_text.delta":
            items[e["output_index"]].setdefault("_summary", "")
            items[e["output_index"]]["_summary"] += e["delta"]
        elif t == "response.output_item.done":
            done = e["item"]
            it = items[e["output_index"]]
            text = {"message": lambda d: d["content"][0]["text"], "function_call": lambda d: d["arguments"],
                    "reasoning": lambda d: d["content"][0]["text"]}[done["type"]](done)
            assert it.pop("_text") == text and it["id"] == done["id"]
            if "_summary" in it:
                assert [{"type": "summary_text", "text": it.pop("_summary")}] == done["summary"]
            items[e["output_index"]] = done
    return [items[i] for i in sorted(items)]


def _types(events):
    return [e["type"].removeprefix("response.") for e in events]


def test_event_sequence_of_a_thinking_answer(tokenizer, template):
    acc = _accumulator(tokenizer, template)
    events = _run(acc, _chunks(tokenizer, ANSWER))
    kinds = _types(events)
    assert kinds[:3] == ["created", "in_progress", "output_item.added"]
    assert kinds[-1] == "completed"
    r = [k for k in kinds if not k.endswith("delta")]
    assert r == ["created", "in_progress", "output_item.added", "reasoning_text.done", "output_item.done",
                 "output_item.added", "content_part.added", "output_text.done", "content_part.done",
                 "output_item.done", "completed"]
    final = events[-1]["response"]
    Response.model_validate(final)
    assert final == acc.response().model_dump()
    assert _reassemble(events) == final["output"]
    reasoning, message = final["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Paris is the capital of France."}]
    assert reasoning["summary"] == [] and reasoning["id"].startswith("rs_")
    assert message["content"][0]["text"] == "The capital of France is Paris." and message["role"] == "assistant"
    assert message["status"] == "completed" and message["id"].startswith("msg_")
    assert final["status"] == "completed" and final["usage"]["input_tokens"] == 7
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 3, "cache_write_tokens": 0}
    think = ANSWER.split("</think>")[0] + "</think>"  # reasoning tokens: the block, by token id, </think> included
    n_think = len(tokenizer.encode_with_specials(tokenizer.split_special(think)))
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": n_think} and n_think > 2
    assert final["usage"]["total_tokens"] == 7 + final["usage"]["output_tokens"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []


def test_event_sequence_of_a_tool_call_with_a_summary(tokenizer, template):
    acc = _accumulator(tokenizer, template, tools=[WEATHER], reasoning={"effort": "high", "summary": "auto"})
    events = _run(acc, _chunks(tokenizer, CALL, per=3))
    r = [k for k in _types(events) if not k.endswith("text.delta")]
    assert r == ["created", "in_progress", "output_item.added", "reasoning_text.done",
                 "reasoning_summary_part.added", "reasoning_summary_text.done", "reasoning_summary_part.done",
                 "output_item.done",
                 "output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
                 "output_item.done", "completed"]
    final = events[-1]["response"]
    Response.model_validate(final)
    assert _reassemble(events) == final["output"]
    reasoning, call = final["output"]
    assert reasoning["summary"] == [{"type": "summary_text", "text": "I will look it up."}]
    assert call == {"type": "function_call", "id": call["id"], "call_id": "functions.get_weather:0",
                    "name": "get_weather", "arguments": '{"city": "Paris"}', "status": "completed"}
    assert acc.finish_reason == "tool_calls"


def test_length_is_incomplete_and_errors_fail(tokenizer, template):
    acc = _accumulator(tokenizer, template, max_output_tokens=6)
    text = tokenizer.decode(tokenizer.encode_with_specials(tokenizer.split_special(ANSWER))[:6])
    events = _run(acc, _chunks(tokenizer, text, finish="length"))
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][-1]["status"] == "incomplete"
    Response.model_validate(final["response"])

    acc = _accumulator(tokenizer, template)
    chunks = _chunks(tokenizer, ANSWER)
    events = _run(acc, chunks[:2], error=APIError(503, "model group g0 failed", "service_unavailable", None,
                                                   "model_group_failed"))
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "model group g0 failed"}
    assert all(i["status"] == "incomplete" for i in events[-1]["response"]["output"])


def test_whitespace_before_a_call_opens_no_message(tokenizer, template):
    acc = _accumulator(tokenizer, template, tools=[WEATHER])
    text = CALL.replace("</think>", "</think>\n\n")
    final = _run(acc, _chunks(tokenizer, text, per=1))[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "function_call"]


# -- the store --------------------------------------------------------------------------------------------------------
def test_store_ttl_bound_and_delete():
    now = [0.0]
    s = ResponseStore(max_entries=3, ttl_s=10, clock=lambda: now[0])
    for k in "abcd":
        s.put(k, {"v": k})
        now[0] += 1
    assert s.get("a") is None and len(s) == 3  # bounded: the oldest went
    assert s.get("b") == {"v": "b"}
    assert s.delete("b") and not s.delete("b") and s.get("b") is None
    now[0] = 12.5  # c was stored at 2, d at 3
    assert s.get("c") is None and s.get("d") == {"v": "d"}
    now[0] = 13.0
    assert s.get("d") is None and len(s) == 0
    s.put("e", 1)
    s.configure(max_entries=1, ttl_s=1)
    s.put("f", 2)
    assert s.get("e") is None and s.get("f") == 2
    with pytest.raises(ValueError):
        s.configure(0, 1)


# -- the endpoints, through the openai client --------------------------------------------------------------------------
@pytest.fixture()
def sdk(tokenizer):  # noqa: F811
    groups = ScriptedGroups(tokenizer)
    ingress = OpenAIIngress(groups, {"model": "k2ray-tiny", "served_model_name": MODEL, "default_max_tokens": 64,
                                     "responses_store_max": 2})
    with TestClient(ingress.build_asgi_app()) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), \
            groups, http


def test_endpoints_with_the_openai_client(sdk):
    client, groups, http = sdk
    groups.script = [CALL]
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], metadata={"k": "v"})
    assert r.status == "completed" and r.id.startswith("resp_") and r.metadata == {"k": "v"}
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.call_id == "functions.get_weather:0"
    # stream: the events reassemble to a response equal to the stored one
    groups.script = [ANSWER]
    with client.responses.stream(model=MODEL, previous_response_id=r.id, tools=[WEATHER],
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": "22 C"}]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "The capital of France is Paris."
    prompt = groups.tok.decode(groups.requests[-1].prompt_token_ids)
    assert "Weather in Paris?" in prompt and "22 C" in prompt
    stored = client.responses.retrieve(final.id)
    assert [(o.id, o.type) for o in stored.output] == [(o.id, o.type) for o in final.output]
    assert (stored.output_text, stored.usage, stored.status) == (final.output_text, final.usage, "completed")
    assert client.responses.retrieve(r.id).id == r.id
    # delete; unknown ids are 404s
    http_del = http.delete(f"/v1/responses/{r.id}")
    assert http_del.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert e.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="Hi", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"
    # store: false keeps nothing
    r3 = client.responses.create(model=MODEL, input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r3.id)
    # bad requests
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    assert e.value.body["param"] == "input[0].content[0]"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools[0].type"


def test_mid_stream_failure_is_response_failed(sdk):
    client, groups, http = sdk
    groups.fail_mid_stream = GenerateError(503, "model group g0 failed", "service_unavailable", "model_group_failed")
    events = list(client.responses.create(model=MODEL, input="Hi", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "server_error"
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=MODEL, input="Hi")


@pytest.mark.parametrize("field, bad", [("responses_store_max", 0), ("responses_store_ttl_s", 0),
                                        ("responses_store_ttl_s", -5.0)])
def test_store_settings_are_validated(field, bad):
    from pydantic import ValidationError

    from k2ray.serve.config import ServeArgs

    assert ServeArgs().responses_store_max >= 1 and ServeArgs().responses_store_ttl_s > 0
    with pytest.raises(ValidationError) as e:
        ServeArgs.model_validate({field: bad})
    assert field in str(e.value)
