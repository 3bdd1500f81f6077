"""The agentic loop against the trained demo model (built-in ``k2ray-demo``) through the whole Serve stack and the
official openai client: declare tools, receive the parsed ``tool_calls`` (with ``reasoning_content``), send the tool
result back, receive the final answer. Greedy decoding; a model group of 1 attention worker + 2 expert shards.
Also the Kimi conformance rules every agent client relies on (foreign tool-call ids, reasoning-token usage, streamed
tool calls under load) and two more clients: LangChain's ChatOpenAI and LiteLLM.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from .serve_helpers import serve_app

from k2ray.checkpoint.builtin import builtin_available

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "k2ray-demo"
ARGS = {
    "model": MODEL,
    "engine": {"num_kv_blocks": 1024, "block_size": 16, "max_num_seqs": 16},
    "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5},
    "router_cpus": 0.5,
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    assert builtin_available(MODEL), "k2ray/assets/k2ray-demo is missing from the installation"
    with serve_app(ARGS, tmp_path_factory.mktemp("k2ray-cache")) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def _first_turn(client, tools, stream: bool):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=tools,
              temperature=0, max_tokens=160)
    if not stream:
        r = client.chat.completions.create(**kw)
        ch = r.choices[0]
        return ch.message.model_dump(exclude_none=True), ch.finish_reason
    calls: dict[int, dict] = {}
    msg = {"role": "assistant", "content": "", "reasoning_content": ""}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        msg["content"] += d.content or ""
        msg["reasoning_content"] += (d.model_extra or {}).get("reasoning_content") or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if tc.id:
                c["id"] = tc.id
            if tc.function and tc.function.name:
                c["function"]["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                c["function"]["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg, finish


def test_tool_call_round_trip(client, train_demo):
    tools = train_demo.TOOLS
    msg, finish = _first_turn(client, tools, stream=False)
    assert finish == "tool_calls", msg
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert call["id"] == "functions.get_weather:0"
    assert msg.get("reasoning_content"), "the think block is returned as reasoning_content"
    # streaming gives the same assistant turn
    smsg, sfinish = _first_turn(client, tools, stream=True)
    assert sfinish == "tool_calls"
    assert smsg["tool_calls"] == msg["tool_calls"] and smsg["reasoning_content"] == msg["reasoning_content"]
    # send the tool result back: the final answer uses it
    result = json.dumps({"city": "Paris", "temperature_c": 22, "condition": "sunny"})
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": msg.get("content") or "", "reasoning_content": msg["reasoning_content"],
         "tool_calls": msg["tool_calls"]},
        {"role": "tool", "tool_call_id": call["id"], "content": result},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0, max_tokens=160)
    final = r.choices[0]
    assert final.finish_reason == "stop", final
    assert not final.message.tool_calls
    assert "22" in (final.message.content or ""), final.message


def _model_card_tool_loop(client, seed: int) -> tuple[str, list]:
    """The Kimi K2 model card's tool-calling loop: its system prompt, question and get_weather tool (which answers
    ``{"weather": "Sunny"}``), ``tool_choice="auto"``, the assistant message appended as the client returned it and the
    tool result with its ``name``, repeated until the model stops calling tools. Sampled at temperature 1.0, the
    K2-Thinking card's recommendation; ``seed`` only makes a rerun draw the same tokens."""
    from k2ray.demo.corpus import CARD_WEATHER_TOOL

    tool_map = {"get_weather": lambda city: {"weather": "Sunny"}}
    messages = [
        {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
        {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."},
    ]
    calls = []
    finish_reason = None
    for _ in range(4):  # the card loops until finish_reason is not tool_calls; a bound keeps a bad model from hanging
        completion = client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0,
                                                    tools=[CARD_WEATHER_TOOL], tool_choice="auto", seed=seed,
                                                    max_tokens=160)
        choice = completion.choices[0]
        finish_reason = choice.finish_reason
        if finish_reason != "tool_calls":
            break
        messages.append(choice.message)
        for tool_call in choice.message.tool_calls:
            arguments = json.loads(tool_call.function.arguments)
            calls.append((tool_call.function.name, arguments))
            result = tool_map[tool_call.function.name](**arguments)
            messages.append({"role": "tool", "tool_call_id": tool_call.id, "name": tool_call.function.name,
                             "content": json.dumps(result)})
    return choice.message.content or "", calls


def test_model_card_tool_loop_at_temperature_1(client):
    """The model card's loop, ten times at temperature 1.0: at least nine final answers state the tool's result."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(10) as pool:
        runs = list(pool.map(lambda seed: _model_card_tool_loop(client, seed), range(10)))
    good = [answer for answer, calls in runs
            if ("get_weather", {"city": "Beijing"}) in calls and "sunny" in answer.lower()]
    assert len(good) >= 9, runs


def test_constrained_outputs_keep_the_models_reasoning(client, train_demo):
    """With a grammar (tool_choice required, a JSON schema), the thinking model still opens its own <think> block
    and reasons as it does unconstrained; the constraint applies after </think>."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}], temperature=0,
              max_tokens=160)
    free, _ = _first_turn(client, train_demo.TOOLS, stream=False)
    r = client.chat.completions.create(tools=train_demo.TOOLS, tool_choice="required", **kw)
    forced = r.choices[0].message.model_dump(exclude_none=True)
    assert forced["reasoning_content"] == free["reasoning_content"]
    assert forced["tool_calls"] == free["tool_calls"]

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}, **kw)
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch
    assert ch.message.model_extra.get("reasoning_content") == free["reasoning_content"]
    assert json.loads(ch.message.content) == {"city": "Paris"}


def _history(call_id: str, result_id: str, msg: dict) -> list[dict]:
    result = json.dumps({"city": "Paris", "temperature_c": 22, "condition": "sunny"})
    return [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": msg["reasoning_content"],
         "tool_calls": [{**msg["tool_calls"][0], "id": call_id}]},
        {"role": "tool", "tool_call_id": result_id, "content": result},
    ]


def test_foreign_tool_call_ids_and_reasoning_usage(client, train_demo):
    """History whose tool-call ids come from another provider (OpenAI ``call_...``, Anthropic ``toolu_...``) is
    renumbered to Kimi's ``functions.NAME:IDX`` before rendering: the prompt and the greedy answer are those of the
    same history with Kimi ids. Usage counts the reasoning block's tokens."""
    tools = train_demo.TOOLS
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What's the weather in "
                                       "Paris?"}], tools=tools, temperature=0, max_tokens=160)
    msg = r.choices[0].message.model_dump(exclude_none=True)
    details = r.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < r.usage.completion_tokens  # the think block, then the call

    answers = {}
    for cid in ("functions.get_weather:0", "call_9f2b1c0d8e", "toolu_01A09q90qw90lq917835lq9"):
        rr = client.chat.completions.create(model=MODEL, messages=_history(cid, cid, msg), tools=tools,
                                            temperature=0, max_tokens=160)
        answers[cid] = (rr.usage.prompt_tokens, rr.choices[0].message.content)
    kimi = answers.pop("functions.get_weather:0")
    assert "22" in (kimi[1] or "")
    assert all(a == kimi for a in answers.values()), answers


def _reassemble(events) -> dict:
    msg = {"content": "", "reasoning_content": "", "tool_calls": {}, "finish_reason": None}
    for chunk in events:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        d = c.delta
        msg["content"] += d.content or ""
        msg["reasoning_content"] += (d.model_extra or {}).get("reasoning_content") or ""
        for tc in d.tool_calls or []:
            slot = msg["tool_calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        msg["finish_reason"] = c.finish_reason or msg["finish_reason"]
    msg["tool_calls"] = [msg["tool_calls"][i] for i in sorted(msg["tool_calls"])]
    return msg


def test_64_concurrent_streamed_tool_calls_reassemble_exactly(client, train_demo):
    """64 concurrent streaming requests, each answered with a tool call (the load at which other engines' users see
    streamed calls lost or garbled): every stream reassembles to exactly the non-streamed answer of its question."""
    cities = ["Paris", "Tokyo", "Berlin", "Cairo"]
    kw = dict(model=MODEL, tools=train_demo.TOOLS, temperature=0, max_tokens=160)

    def ask(city):
        return [{"role": "user", "content": f"What's the weather in {city}?"}]

    expected = {}
    for city in cities:
        m = client.chat.completions.create(messages=ask(city), **kw).choices[0]
        expected[city] = {"content": m.message.content or "", "reasoning_content": m.message.reasoning_content,
                          "tool_calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                                         for c in m.message.tool_calls or []],
                          "finish_reason": m.finish_reason}
        assert expected[city]["finish_reason"] == "tool_calls", expected[city]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0, timeout=300)

        async def one(city):
            stream = await aclient.chat.completions.create(messages=ask(city), stream=True, **kw)
            return city, _reassemble([c async for c in stream])

        try:
            return await asyncio.gather(*(one(cities[i % len(cities)]) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    wrong = [(city, got) for city, got in results if got != expected[city]]
    assert not wrong, f"{len(wrong)} of 64 streams differ; first: {wrong[0]} expected {expected[wrong[0][0]]}"


def test_langchain_chat_openai_bind_tools(client, train_demo):
    """LangChain's ChatOpenAI with bound tools: invoke and stream give the same parsed tool call."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=str(client.base_url), api_key="unused", temperature=0, max_tokens=160,
                     max_retries=0).bind_tools(train_demo.TOOLS)
    msg = llm.invoke("What's the weather in Paris?")
    assert [(c["name"], c["args"], c["id"]) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris"}, "functions.get_weather:0")]
    total = None
    for chunk in llm.stream("What's the weather in Paris?"):
        total = chunk if total is None else total + chunk
    assert [(c["name"], c["args"], c["id"]) for c in total.tool_calls] == [
        (c["name"], c["args"], c["id"]) for c in msg.tool_calls]


def test_litellm_completion_with_tools_streamed(client, train_demo, monkeypatch):
    """LiteLLM's ``completion(model="openai/<served name>")`` with tools, streamed, rebuilt by its own chunk
    builder."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: its bundled price map, not a download
    import litellm

    kw = dict(model=f"openai/{MODEL}", api_base=str(client.base_url), api_key="unused", temperature=0,
              max_tokens=160, tools=train_demo.TOOLS, messages=[{"role": "user", "content": "What's the weather in "
                                                                 "Paris?"}])
    whole = litellm.completion(**kw)
    chunks = list(litellm.completion(stream=True, **kw))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=kw["messages"])
    for r in (whole, rebuilt):
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert r.choices[0].finish_reason == "tool_calls"
