"""The Responses API through the whole Serve stack, the demo model (``k2ray-demo``, greedy) and real clients: the
official ``openai`` SDK (``responses.create`` / ``retrieve`` / ``delete``, streamed and not) and the OpenAI Agents SDK
(its default Responses model and its chat-completions model), against TWO ingress replicas that share one response
store: a ``previous_response_id`` turn is answered by another replica than the turn it continues (the
``x-k2ray-replica`` header says which replica answered).
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import ray

from k2ray.checkpoint.builtin import builtin_available
from k2ray.serve.response_store import actor_name

from .serve_helpers import serve_app, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "k2ray-demo"
ARGS = {
    "model": MODEL,
    "engine": {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 4},
    "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5},
    "router_cpus": 0.5,
}
REPLICA = "x-k2ray-replica"
PARIS = "What's the weather in Paris?"
WEATHER_RESULT = json.dumps({"city": "Paris", "temperature_c": 22, "condition": "sunny"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert builtin_available(MODEL), "k2ray/assets/k2ray-demo is missing from the installation"
    with serve_app(ARGS, tmp_path_factory.mktemp("k2ray-cache"), ingress_options={"num_replicas": 2}) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def weather_tool(train_demo):
    """The demo's get_weather tool (as it was trained), in the Responses API's flat shape."""
    fn = train_demo.TOOLS[0]["function"]
    return {"type": "function", "name": fn["name"], "description": fn["description"], "parameters": fn["parameters"]}


def _create(client, **kw):
    """``responses.create`` and the replica that answered."""
    raw = client.responses.with_raw_response.create(model=MODEL, temperature=0, **kw)
    return raw.parse(), raw.headers[REPLICA]


def _items(output) -> list[tuple]:
    """Output items without their ids: what the model said."""
    out = []
    for o in output:
        if o.type == "reasoning":
            out.append(("reasoning", "".join(c.text for c in o.content or [])))
        elif o.type == "message":
            out.append(("message", "".join(c.text for c in o.content)))
        else:
            out.append(("function_call", o.call_id, o.name, o.arguments))
    return out


def test_stream_equals_non_stream_and_chat_completions(client):
    """Greedy: the streamed events reassemble to the non-streamed response, and both say what /v1/chat/completions
    says for the same conversation."""
    question = "What is the capital of France?"
    r, _ = _create(client, input=question, max_output_tokens=120)
    assert r.status == "completed" and r.id.startswith("resp_")
    kinds = [o.type for o in r.output]
    assert kinds == ["reasoning", "message"], r.output
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    events = list(client.responses.create(model=MODEL, input=question, max_output_tokens=120, temperature=0,
                                          stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[-1].type == "response.completed"
    texts: dict[int, str] = {}
    for e in events:
        if e.type in ("response.reasoning_text.delta", "response.output_text.delta"):
            texts[e.output_index] = texts.get(e.output_index, "") + e.delta
    final = events[-1].response
    assert _items(final.output) == _items(r.output)
    assert [texts[i] for i in sorted(texts)] == [t for _, t in _items(r.output)]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (r.usage.input_tokens, r.usage.output_tokens)

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=120).choices[0].message
    assert _items(r.output) == [("reasoning", chat.model_extra["reasoning_content"]), ("message", chat.content)]
    assert "Paris" in r.output_text


def test_tool_loop_continued_by_the_other_replica(client, weather_tool):
    """get_weather -> function_call_output -> the final answer; the second turn by ``previous_response_id`` is
    answered by the other ingress replica (the store is shared), and equals the same turn sent in full."""
    first, replica = _create(client, input=PARIS, tools=[weather_tool], max_output_tokens=160)
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert (call.name, json.loads(call.arguments), call.call_id) == ("get_weather", {"city": "Paris"},
                                                                      "functions.get_weather:0")
    assert call.id.startswith("fc_") and first.output[0].type == "reasoning"
    result = [{"type": "function_call_output", "call_id": call.call_id, "output": WEATHER_RESULT}]
    for _ in range(12):  # the proxy picks a replica per request: ask until the other one answers
        second, other = _create(client, previous_response_id=first.id, input=result, tools=[weather_tool],
                                max_output_tokens=160)
        if other != replica:
            break
    assert other != replica, "every try was answered by the first replica"
    assert second.status == "completed" and second.previous_response_id == first.id
    assert "22" in second.output_text and not [o for o in second.output if o.type == "function_call"]
    assert second.usage.input_tokens > first.usage.input_tokens
    # stateless: the whole conversation as input items (the first output sent back as the Agents SDK does)
    full, _ = _create(client, input=[{"role": "user", "content": PARIS},
                                     *[o.model_dump(exclude_none=True) for o in first.output], *result],
                      tools=[weather_tool], max_output_tokens=160, store=False)
    assert _items(full.output) == _items(second.output)


def test_retrieve_and_delete_from_either_replica(client, server):
    import httpx

    r, _ = _create(client, input="What is the capital of Japan?", max_output_tokens=80, metadata={"run": "t"})
    seen = set()
    for _ in range(30):  # GET is cheap: both replicas find it
        got = httpx.get(f"{server}/v1/responses/{r.id}", timeout=30)
        assert got.status_code == 200 and got.json()["id"] == r.id
        seen.add(got.headers[REPLICA])
        if len(seen) == 2:
            break
    assert len(seen) == 2
    got = client.responses.retrieve(r.id)
    assert _items(got.output) == _items(r.output) and got.metadata == {"run": "t"} and got.usage == r.usage
    deleted = httpx.delete(f"{server}/v1/responses/{r.id}", timeout=30)
    assert deleted.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_unknown")
    assert e.value.body["code"] == "previous_response_not_found"


def test_bad_requests(client, weather_tool):
    cases = [
        (dict(input=[{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                  {"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]),
         "input[0].content[1]"),
        (dict(input="Hi", tools=[{"type": "web_search"}]), "tools[0].type"),
        (dict(input="Hi", tools=[weather_tool], tool_choice={"type": "function", "name": "calculator"}),
         "tool_choice"),
        (dict(input="Hi", text={"format": {"type": "json_schema", "name": "x"}}), "text.format.schema"),
        (dict(input="Hi", max_output_tokens=10 ** 6), "max_output_tokens"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, **kw)
        assert e.value.body["param"] == param, e.value.body


@pytest.mark.parametrize("kind", ["responses", pytest.param("chat_completions", marks=pytest.mark.xfail(
    strict=True, reason="#24: the SDK's chat-completions model sends the tool-call turn back without its "
    "reasoning_content; the demo never saw that in training and calls the tool again until max_turns"))])
def test_agents_sdk_weather_agent(server, kind):
    """The OpenAI Agents SDK's get_weather agent as its documentation writes one (a ``function_tool`` from a typed
    function and its docstring, a plain-string result) runs to a final output that states the tool's values: with
    the SDK's default Responses model and with its chat-completions model."""
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                        set_tracing_disabled)

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        calls.append(city)
        return f"The weather in {city} is sunny."

    async def run():
        api = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = (OpenAIResponsesModel(model=MODEL, openai_client=api) if kind == "responses"
                 else OpenAIChatCompletionsModel(model=MODEL, openai_client=api))
        agent = Agent(name="Hello world", instructions="You are a helpful agent.", model=model, tools=[get_weather],
                      model_settings=ModelSettings(temperature=0, max_tokens=160))
        return await Runner.run(agent, "What's the weather in Tokyo?", max_turns=4)

    result = asyncio.run(run())
    assert calls == ["Tokyo"]
    assert "sunny" in result.final_output.lower() and "Tokyo" in result.final_output, result.final_output


def test_the_store_leaves_with_the_application(server):
    """One store actor, named and detached (it outlives whichever replica created it), in the replicas' namespace;
    deleting the application ends it."""
    from ray import serve
    from ray._private import state  # the GCS actor table (ray.util.state needs the dashboard, off in these tests)

    name = actor_name("k2ray")
    (entry,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
    (info,) = [a for a in state.actors().values() if a["Name"] == name and a["State"] == "ALIVE"]
    assert info["IsDetached"], info
    serve.delete("k2ray")

    def gone():
        try:
            ray.get_actor(name, namespace=entry["namespace"])
            return False
        except ValueError:
            return True

    wait_until(gone, 60, 1.0, "the response store actor to exit")
