"""The agentic loop against the trained demo model (built-in ``k2ray-demo``) through the whole Serve stack and the
official openai client: declare tools, receive the parsed ``tool_calls`` (with ``reasoning_content``), send the tool
result back, receive the final answer. Greedy decoding; a model group of 1 attention worker + 2 expert shards.
"""

from __future__ import annotations

import json

import openai
import pytest
from .serve_helpers import serve_app

from k2ray.checkpoint.builtin import builtin_available

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "k2ray-demo"
ARGS = {
    "model": MODEL,
    "engine": {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 4},
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
