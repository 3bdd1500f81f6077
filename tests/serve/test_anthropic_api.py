"""The Anthropic Messages API through the whole Serve stack, driven by the official ``anthropic`` client against the
trained demo model (built-in ``k2ray-demo``, greedy): answers equal the chat-completions answers for the same
conversation (the independent cross-check), a stream folds to the non-streamed message, the get_weather tool loop
runs to its final answer, count_tokens is the prompt that generation uses, and bad requests raise the SDK's own
exception classes with Anthropic's error types. One Ray + Serve app for the module (the server has an API key)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from k2ray.checkpoint.builtin import builtin_available

from .serve_helpers import serve_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "k2ray-demo"
KEY = "sk-anthropic-test"
ARGS = {
    "model": MODEL,
    "api_keys": [KEY],
    "engine": {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 4},
    "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5},
    "router_cpus": 0.5,
}
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
# This SDK's create() has no sampling arguments (newer Claude models take none); the API field is still honoured.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    assert builtin_available(MODEL), "k2ray/assets/k2ray-demo is missing from the installation"
    with serve_app(ARGS, tmp_path_factory.mktemp("k2ray-cache")) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oai(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tools(train_demo):
    """The demo's tools in Anthropic's form."""
    return [{"name": t["function"]["name"], "description": t["function"]["description"],
             "input_schema": t["function"]["parameters"]} for t in train_demo.TOOLS]


def _blocks(message) -> dict:
    return {b.type: b for b in message.content}


def test_text_answer_equals_the_chat_completions_answer(client, oai):
    c = oai.chat.completions.create(model=MODEL, max_tokens=96, temperature=0, messages=CAPITAL)
    r = client.messages.create(model=MODEL, max_tokens=96, **GREEDY, messages=CAPITAL)
    ch = c.choices[0]
    assert r.stop_reason == "end_turn" and ch.finish_reason == "stop"
    assert r.id.startswith("msg_") and r.model == MODEL and r.role == "assistant"
    assert [b.type for b in r.content] == ["thinking", "text"]
    blocks = _blocks(r)
    assert blocks["text"].text == ch.message.content and "Paris" in blocks["text"].text
    assert blocks["thinking"].thinking == ch.message.model_extra["reasoning_content"]
    assert blocks["thinking"].signature
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == c.usage.prompt_tokens
    assert r.usage.output_tokens == c.usage.completion_tokens and r.usage.cache_creation_input_tokens == 0
    assert r.usage.cache_read_input_tokens > 0  # the same prompt a moment later: served from the prefix cache


def test_stream_with_thinking_folds_to_the_non_streamed_message(client):
    kw = dict(model=MODEL, max_tokens=96, messages=CAPITAL, **GREEDY,
              thinking={"type": "enabled", "budget_tokens": 1024})
    with client.messages.stream(**kw) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert "thinking" in types and "signature" in types and "text" in types  # the SDK's derived events
    r = client.messages.create(**kw)
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in r.content]
    assert (final.stop_reason, final.stop_sequence) == (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    assert final.usage.output_tokens == r.usage.output_tokens
    assert (final.usage.input_tokens + final.usage.cache_read_input_tokens
            == r.usage.input_tokens + r.usage.cache_read_input_tokens)
    # thinking off: no thinking block, only text
    off = client.messages.create(**{**kw, "thinking": {"type": "disabled"}})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text


@pytest.mark.xfail(strict=True, reason="#24: the demo was not trained with thinking disabled (an empty think block "
                   "in the prompt) and answers noise there")
def test_answer_with_thinking_disabled(client):
    off = client.messages.create(model=MODEL, max_tokens=96, messages=CAPITAL, **GREEDY,
                                 thinking={"type": "disabled"})
    assert "Paris" in off.content[0].text, off.content[0].text


def test_tool_loop_to_the_final_answer(client, tools):
    r = client.messages.create(model=MODEL, max_tokens=160, **GREEDY, messages=WEATHER, tools=tools)
    assert r.stop_reason == "tool_use", r
    assert [b.type for b in r.content] == ["thinking", "tool_use"]
    call = r.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    # the streamed turn is the same, tool input included
    with client.messages.stream(model=MODEL, max_tokens=160, **GREEDY, messages=WEATHER, tools=tools) as s:
        streamed = s.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [("thinking", None),
                                                                               ("tool_use", {"city": "Paris"})]
    assert streamed.content[1].id != call.id  # a fresh id per call
    # the result goes back; the answer uses it
    result = json.dumps({"city": "Paris", "temperature_c": 22, "condition": "sunny"})
    messages = WEATHER + [{"role": "assistant", "content": r.content},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                        "content": result}]}]
    final = client.messages.create(model=MODEL, max_tokens=160, **GREEDY, messages=messages, tools=tools)
    assert final.stop_reason == "end_turn", final
    text = "".join(b.text for b in final.content if b.type == "text")
    assert "22" in text, final


def test_count_tokens_is_the_prompt_of_the_same_request(client, tools):
    kw = dict(model=MODEL, messages=WEATHER, tools=tools, system="You are Kimi, an AI assistant.")
    n = client.messages.count_tokens(**kw).input_tokens
    r = client.messages.create(max_tokens=8, **GREEDY, **kw)
    assert n == r.usage.input_tokens + r.usage.cache_read_input_tokens > 20
    assert r.stop_reason == "max_tokens"
    assert client.messages.count_tokens(**{**kw, "tool_choice": {"type": "none"}}).input_tokens < n  # tools hidden


def test_bad_requests_raise_the_sdks_exceptions(client, base):
    def raised(exc_class, call):
        with pytest.raises(exc_class) as info:
            call()
        body = info.value.body
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]

    no_max = {"model": MODEL, "messages": CAPITAL}  # the SDK itself insists on max_tokens: post the body as is
    err = raised(anthropic.BadRequestError, lambda: client.post("/v1/messages", body=no_max, cast_to=object))
    assert err["type"] == "invalid_request_error" and "max_tokens" in err["message"]
    err = raised(anthropic.BadRequestError, lambda: client.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "system", "content": "hi"}]))
    assert "messages[0].role" in err["message"]
    err = raised(anthropic.NotFoundError, lambda: client.messages.create(
        model="claude-sonnet-4-5", max_tokens=8, messages=CAPITAL))
    assert err["type"] == "not_found_error" and "claude-sonnet-4-5" in err["message"]
    err = raised(anthropic.BadRequestError, lambda: client.messages.create(model=MODEL, max_tokens=8, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "text", "text": "What is this?"}]}]))
    assert err["type"] == "invalid_request_error" and err["message"].startswith("messages[0].content[0]: cannot "
                                                                                "identify the image"), err
    stranger = anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0)
    err = raised(anthropic.AuthenticationError, lambda: stranger.messages.count_tokens(model=MODEL, messages=CAPITAL))
    assert err["type"] == "authentication_error"
