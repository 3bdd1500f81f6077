"""The OpenAI API end to end: the official ``openai`` client against the k2ray Serve app (ingress + one K2Router model
group of 1 attention worker + 2 expert shards on the random-weight tiny model). Every token comes from the engine.

One Ray cluster and one Serve instance for the whole module; tests run in file order (the fault test is last).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest
from .serve_helpers import (assert_openai_error, descendant_pids, free_port, metric_sum, scrape, serve_app,
                           wait_until)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "sk-k2ray-test"
MODEL = "k2ray-tiny"
MAX_NUM_SEQS = 4
MAX_QUEUED = 2
NUM_KV_BLOCKS = 512
BLOCK = 16
ARGS = {
    "model": "k2ray-tiny",
    "served_model_name": MODEL,
    "engine": {"num_kv_blocks": NUM_KV_BLOCKS, "block_size": BLOCK, "max_num_seqs": MAX_NUM_SEQS,
               "max_num_batched_tokens": 512},
    "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5},
    "router_cpus": 0.5,
    "api_keys": [KEY],
    "max_queued_requests": MAX_QUEUED,
    "max_request_bytes": 3 << 20,
}
MAX_MODEL_LEN = NUM_KV_BLOCKS * BLOCK
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HI = [{"role": "user", "content": "What is the capital of France?"}]


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cache = tmp_path_factory.mktemp("k2ray-cache")
    # Per-layer expert series on, so every dashboard panel has data (test_dashboard_queries_on_the_app).
    old_flag = os.environ.get("K2RAY_METRICS_PER_LAYER_EXPERTS")
    os.environ["K2RAY_METRICS_PER_LAYER_EXPERTS"] = "1"
    metrics = {"_metrics_export_port": METRICS_PORT, "_system_config": {"metrics_report_interval_ms": 1000}}
    with serve_app(ARGS, cache, **metrics) as url:
        # first start wrote the tiny checkpoint into the (empty) cache directory
        assert any((p / "config.json").is_file() for p in (cache / "models").iterdir())
        yield url
    if old_flag is None:
        os.environ.pop("K2RAY_METRICS_PER_LAYER_EXPERTS", None)
    else:
        os.environ["K2RAY_METRICS_PER_LAYER_EXPERTS"] = old_flag


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def n_tokens(http, **body) -> int:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def stats(http) -> dict:
    r = http.get("/v1/k2ray/stats")
    assert r.status_code == 200, r.text
    return r.json()


# -- basics ------------------------------------------------------------------------------------------------------------
def test_health_models_layout(base, client, http):
    r = httpx.get(base + "/health")  # open without a key
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    layout = http.get("/v1/k2ray/layout").json()
    assert len(layout["attention_workers"]) == 1 and len(layout["expert_shards"]) == 2
    experts = sorted(e for s in layout["expert_shards"] for e in s["experts"])
    assert experts == list(range(32))
    assert layout["backend"] == "gloo"


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "Hello, Kimi! <|im_end|>"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello, Kimi! <|im_end|>"
    chat = http.post("/tokenize", json={"messages": HI}).json()
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>") and "capital of France" in text


# -- chat --------------------------------------------------------------------------------------------------------------
def test_chat_non_stream_usage_and_logprobs(client, http):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("stop", "length")
    entries = ch.logprobs.content
    # usage numbers equal token counts: the prompt as the template tokenizes it, one logprob per generated token
    assert r.usage.prompt_tokens == n_tokens(http, messages=HI)
    assert r.usage.completion_tokens == len(entries) >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if ch.finish_reason == "length":
        assert r.usage.completion_tokens == 10
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0])  # greedy: the sampled token is the most likely one
        assert e.bytes == list(e.token.encode())
    # K2-Thinking format: without </think> everything is reasoning
    visible = (ch.message.content or "") + (ch.message.model_extra.get("reasoning_content") or "")
    assert visible


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=HI, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == (full.message.content or "")
    assert reasoning == (full.message.model_extra.get("reasoning_content") or "")
    assert finish == ["length"] == [full.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_thinking_off_gives_content(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0,
                                       extra_body={"chat_template_kwargs": {"thinking": False}, "ignore_eos": True})
    msg = r.choices[0].message
    assert msg.model_extra.get("reasoning_content") is None
    assert isinstance(msg.content, str)


def test_chat_n2_seeded(client):
    kw = dict(model=MODEL, messages=HI, max_tokens=8, temperature=1.0, seed=1234, n=2, logprobs=True,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices) == 16
    toks = [[e.token for e in c.logprobs.content] for c in r.choices]
    assert toks[0] != toks[1]  # two different samples
    again = client.chat.completions.create(**kw)
    assert [[e.token for e in c.logprobs.content] for c in again.choices] == toks  # seeded: reproducible
    streamed: dict[int, list[str]] = {0: [], 1: []}
    finished = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += [e.token for e in (c.logprobs.content if c.logprobs else [])]
            if c.finish_reason:
                finished.append(c.index)
    assert [streamed[0], streamed[1]] == toks and sorted(finished) == [0, 1]


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


# -- completions -------------------------------------------------------------------------------------------------------
def test_completions_stream_equals_non_stream(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_completions_echo_logprobs_usage(client, http):
    prompt = "The quick brown fox"
    n_prompt = n_tokens(http, prompt=prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2,
                                  extra_body={"ignore_eos": True})
    ch = r.choices[0]
    assert ch.text.startswith(prompt) and len(ch.text) > len(prompt)
    lp = ch.logprobs
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # the prompt's own logprobs match what a plain completion reports for the same positions
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True}).choices[0]
    assert plain.text == ch.text[len(prompt):]
    assert plain.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[n_prompt:], abs=1e-4)


def test_completions_batch_and_token_prompts(client, http):
    ids = http.post("/tokenize", json={"prompt": "Paris is"}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=["Hello there", "Paris is"], n=2, max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == n_tokens(http, prompt="Hello there") + len(ids)
    assert r.usage.completion_tokens == 12
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    by_text = {c.index: c.text for c in r.choices}
    assert by_ids.choices[0].text == by_text[2] == by_text[3]  # greedy: both samples agree


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(max_tokens=24, **kw).choices[0].text
    assert len(text) >= 12, text
    stop = text[6:9]
    expected = text[: text.find(stop)]
    r = client.completions.create(max_tokens=24, stop=[stop, "never-appears"], **kw).choices[0]
    assert r.text == expected and r.finish_reason == "stop"
    assert r.model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(max_tokens=24, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_logit_bias(client, http):
    """+100 on one token makes greedy decoding repeat it; -100 on the unbiased greedy first token removes it."""
    (word,) = http.post("/tokenize", json={"model": MODEL, "prompt": " the"}).json()["tokens"]
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=4, logprobs=1)
    r = client.completions.create(logit_bias={str(word): 100}, **kw).choices[0]
    assert r.text == " the" * 4
    free = client.completions.create(**kw).choices[0].logprobs
    first = http.post("/tokenize", json={"model": MODEL, "prompt": free.tokens[0]}).json()["tokens"]
    banned = client.completions.create(logit_bias={str(first[0]): -100}, **kw).choices[0].logprobs
    assert banned.tokens[0] != free.tokens[0]
    chat = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=3,
                                          logit_bias={str(word): 100},
                                          extra_body={"chat_template_kwargs": {"thinking": False}})
    assert chat.choices[0].message.content == " the" * 3


# -- tools -------------------------------------------------------------------------------------------------------------
def test_tools_choices(client, http):
    tools = [WEATHER_TOOL]
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    with_tools = n_tokens(http, messages=msgs, tools=tools)
    assert with_tools > n_tokens(http, messages=msgs) + 10  # the declaration is in the prompt
    base_kw = dict(model=MODEL, messages=msgs, tools=tools, max_tokens=12, temperature=0)
    r = client.chat.completions.create(tool_choice="auto", **base_kw)
    assert r.usage.prompt_tokens == with_tools
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = client.chat.completions.create(tool_choice="none", **base_kw)
    assert not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens < with_tools  # "none": tools are not offered to the model
    # Forced calls are grammar-constrained: even the random model returns a well-formed call to the declared tool
    # with schema-valid arguments (thinking off so the budget goes to the call; short strings keep it brief).
    short = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}}}
    forced_kw = dict(model=MODEL, messages=msgs, tools=[short], max_tokens=120, temperature=0,
                     parallel_tool_calls=False, extra_body={"chat_template_kwargs": {"thinking": False}})
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(tool_choice=choice, **forced_kw)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", m
        assert [c.function.name for c in m.tool_calls] == ["get_weather"]
        assert m.tool_calls[0].id == "functions.get_weather:0"
        args = json.loads(m.tool_calls[0].function.arguments)
        assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 8
    # streamed forced call == non-streamed
    named = {"type": "function", "function": {"name": "get_weather"}}
    full = client.chat.completions.create(tool_choice=named, **forced_kw).choices[0].message
    chunks = list(client.chat.completions.create(tool_choice=named, stream=True, **forced_kw))
    streamed = "".join(tc.function.arguments or "" for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or [])
    assert streamed == full.tool_calls[0].function.arguments


def test_tool_result_round_trip_plumbing(client, http):
    """Send back an assistant tool call and its result (the second half of the loop): the template renders both."""
    msgs = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "22 degrees and sunny"},
    ]
    ids = http.post("/tokenize", json={"messages": msgs, "tools": [WEATHER_TOOL]}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in text
    assert "## Return of functions.get_weather:0\n22 degrees and sunny" in text
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER_TOOL], max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# -- bad input ---------------------------------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": HI, "max_tokens": 2}
TWO_MB = "hello world " * (2 * 1024 * 1024 // 12)

BAD_INPUTS = [
    # id, path, body (dict or raw bytes), headers override, status, code, param
    ("malformed-json", CHAT, b'{"model": "k2ray-tiny", "messages": [', None, 400, "invalid_json", None),
    ("not-an-object", CHAT, b"[1, 2, 3]", None, 400, "invalid_json", None),
    ("empty-body", CHAT, b"", None, 400, "invalid_json", None),
    ("messages-wrong-type", CHAT, {**OK_CHAT, "messages": "hello"}, None, 400, None, "messages"),
    ("max_tokens-wrong-type", CHAT, {**OK_CHAT, "max_tokens": "ten"}, None, 400, None, "max_tokens"),
    ("temperature-wrong-type", CHAT, {**OK_CHAT, "temperature": "hot"}, None, 400, None, "temperature"),
    ("stop-wrong-type", CMPL, {"model": MODEL, "prompt": "x", "stop": 5}, None, 400, None, "stop"),
    ("negative-max_tokens", CHAT, {**OK_CHAT, "max_tokens": -5}, None, 400, None, "max_tokens"),
    ("zero-max_tokens", CMPL, {"model": MODEL, "prompt": "x", "max_tokens": 0}, None, 400, None, "max_tokens"),
    ("temperature-out-of-range", CHAT, {**OK_CHAT, "temperature": 3.5}, None, 400, None, "temperature"),
    ("top_p-out-of-range", CHAT, {**OK_CHAT, "top_p": 0}, None, 400, None, "top_p"),
    ("n-zero", CHAT, {**OK_CHAT, "n": 0}, None, 400, None, "n"),
    # more sequences than a model group ever holds: 400 at once (a 503 would invite useless retries)
    ("n-over-group-capacity", CHAT, {**OK_CHAT, "n": MAX_NUM_SEQS + MAX_QUEUED + 1}, None, 400, None, "n"),
    ("prompts-x-n-over-group-capacity", CMPL, {"model": MODEL, "prompt": ["a", "b", "c", "d"], "n": 2}, None, 400,
     None, "prompt"),
    ("top_logprobs-without-logprobs", CHAT, {**OK_CHAT, "top_logprobs": 2}, None, 400, None, "top_logprobs"),
    ("logprobs-too-many", CMPL, {"model": MODEL, "prompt": "x", "logprobs": 50}, None, 400, None, "logprobs"),
    ("response-format-unsupported", CHAT, {**OK_CHAT, "response_format": {"type": "yaml"}}, None, 400, None,
     "response_format"),
    ("unknown-role", CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, None, 400, None,
     "messages[0]"),
    ("missing-messages", CHAT, {"model": MODEL}, None, 400, None, "messages"),
    ("token-out-of-vocab", CMPL, {"model": MODEL, "prompt": [1, 2, 10**9]}, None, 400, None, "prompt"),
    ("logit_bias-not-a-token-id", CHAT, {**OK_CHAT, "logit_bias": {"hello": 5}}, None, 400, None, "logit_bias"),
    ("logit_bias-out-of-vocab", CMPL, {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 5}}, None, 400,
     None, "logit_bias"),
    ("logit_bias-out-of-range", CHAT, {**OK_CHAT, "logit_bias": {"5": 250}}, None, 400, None, "logit_bias"),
    ("tool-name-with-space", CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
     None, 400, None, "tools[0].function.name"),
    ("tool-schema-does-not-compile", CHAT, {**OK_CHAT, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]}, None, 400, None, "tools"),
    # issue 20: token ids past the vocabulary, malformed schema values, too many stop strings - never a 500
    ("stop_token_ids-out-of-vocab", CHAT, {**OK_CHAT, "min_tokens": 1, "stop_token_ids": [10**6]}, None, 400, None,
     "stop_token_ids"),
    ("stop_token_ids-out-of-vocab-completions", CMPL, {"model": MODEL, "prompt": "x", "min_tokens": 1,
                                                       "stop_token_ids": [10**6]}, None, 400, None, "stop_token_ids"),
    ("tool-schema-minLength-null", CHAT, {**OK_CHAT, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "minLength": None}}}}}]}, None, 400, None,
     "tools"),
    ("response-schema-minLength-text", CHAT, {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "properties": {"a": {"type": "string", "minLength": "abc"}}}}}},
     None, 400, None, "json_schema"),
    ("too-many-stop-strings", CMPL, {"model": MODEL, "prompt": "x", "stop": [f"s{i}" for i in range(65)]}, None, 400,
     None, "stop"),
    ("unknown-tool-choice", CHAT, {**OK_CHAT, "tools": [WEATHER_TOOL],
                                   "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     None, 400, None, "tool_choice"),
    ("prompt-2MB-chat", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": TWO_MB}]}, None, 400,
     "context_length_exceeded", "messages"),
    ("prompt-2MB-completions", CMPL, {"model": MODEL, "prompt": TWO_MB}, None, 400, "context_length_exceeded",
     "prompt"),
    ("prompt-tokens-over-context", CMPL, {"model": MODEL, "prompt": [5] * MAX_MODEL_LEN}, None, 400,
     "context_length_exceeded", "prompt"),
    ("max_tokens-over-context", CMPL, {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN}, None, 400,
     "context_length_exceeded", "max_tokens"),
    ("body-over-limit", CMPL, {"model": MODEL, "prompt": "a" * (3 << 20)}, None, 413, "request_too_large", None),
    ("bad-api-key", CHAT, OK_CHAT, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key", None),
    ("missing-api-key", CHAT, OK_CHAT, {"Authorization": ""}, 401, "invalid_api_key", None),
    ("unknown-model", CHAT, {**OK_CHAT, "model": "gpt-17"}, None, 404, "model_not_found", "model"),
    ("unknown-route", "/v1/nope", OK_CHAT, None, 404, "not_found", None),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(http, case):
    _, path, body, headers, status, code, param = case
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = http.post(path, headers=headers, **kwargs)
    err = assert_openai_error(r, status, code, param)
    if status == 400 and param:
        assert param.split("[")[0].split(".")[0] in err["message"]


def test_server_keeps_serving_after_bad_input(base, client):
    assert httpx.get(base + "/health").status_code == 200
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0,
                                       response_format={"type": "text"})
    assert r.choices[0].finish_reason in ("stop", "length")
    r = httpx.get(base + "/v1/models", headers={"x-api-key": KEY})  # the other way to send the key
    assert r.status_code == 200


def test_openai_client_raises_typed_errors(base, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI, max_tokens=2)
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -- disconnects and overload ------------------------------------------------------------------------------------------
def _wait_idle(http, aborted_before: int) -> dict:
    def idle():
        s = stats(http)
        return s if (s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_cache_usage"] == 0
                     and s["num_aborted"] > aborted_before) else None

    return wait_until(idle, 30, 0.3, "the aborted request to free its cache")


LONG = {"model": MODEL, "messages": HI, "max_tokens": 4000, "ignore_eos": True}


def test_stream_disconnect_aborts(http):
    before = stats(http)["num_aborted"]
    with http.stream("POST", CHAT, json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or line == "" for line in got)
    _wait_idle(http, before)


def test_non_stream_disconnect_aborts(base, http):
    before = stats(http)["num_aborted"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + CHAT, json=LONG, headers={"Authorization": f"Bearer {KEY}"}, timeout=3)
    _wait_idle(http, before)


def test_overload_answers_503_at_once(base, http):
    n = 16

    async def one(c: httpx.AsyncClient, i: int):
        t0 = time.monotonic()
        r = await c.post(CMPL, json={"model": MODEL, "prompt": f"request {i}", "max_tokens": 24, "ignore_eos": True})
        return r, time.monotonic() - t0

    async def burst():
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    results = asyncio.run(burst())
    ok = [(r, t) for r, t in results if r.status_code == 200]
    rejected = [(r, t) for r, t in results if r.status_code != 200]
    assert len(ok) >= MAX_NUM_SEQS, [r.status_code for r, _ in results]
    assert len(ok) <= MAX_NUM_SEQS + MAX_QUEUED + 2  # +2: requests finishing while the burst arrives
    assert rejected, "expected some requests to be rejected"
    for r, _ in rejected:
        assert_openai_error(r, 503, "overloaded")
        assert r.headers.get("retry-after")
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r, _ in ok)
    assert max(t for _, t in rejected) < max(t for _, t in ok)  # rejected at once, not after waiting
    assert httpx.get(base + "/health").status_code == 200
    assert stats(http)["num_running"] == 0


# -- metrics -----------------------------------------------------------------------------------------------------------
def test_metrics_recorded(client, http):
    """Ingress and router record through k2ray.metrics; values reach Ray's node metrics endpoint."""
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    m = {"model": MODEL}

    def settled():  # earlier tests' values arrive up to a report interval late
        a = metric_sum(scrape(url), "ray_k2ray_generation_tokens_total", **m)
        time.sleep(1.5)
        s = scrape(url)
        return s if metric_sum(s, "ray_k2ray_generation_tokens_total", **m) == a else None

    s0 = wait_until(settled, 30, 0, "metrics to settle")
    gen0 = metric_sum(s0, "ray_k2ray_generation_tokens_total", **m)
    done0 = metric_sum(s0, "ray_k2ray_requests_total", finish_reason="length", **m)
    e404 = metric_sum(s0, "ray_k2ray_request_errors_total", status="404", **m)
    client.completions.create(model=MODEL, prompt="count the tokens", max_tokens=7, temperature=0,
                              extra_body={"ignore_eos": True})
    assert http.post(CHAT, json={**OK_CHAT, "model": "nope"}).status_code == 404

    def updated():
        s = scrape(url)
        ok = (metric_sum(s, "ray_k2ray_generation_tokens_total", **m) == gen0 + 7
              and metric_sum(s, "ray_k2ray_requests_total", finish_reason="length", **m) == done0 + 1
              and metric_sum(s, "ray_k2ray_request_errors_total", status="404", **m) == e404 + 1)
        return s if ok else None

    s = wait_until(updated, 30, 0.5, "metrics to reach the node's endpoint")
    names = {n for n, _, _ in s}
    for name in ("ray_k2ray_prompt_tokens_total", "ray_k2ray_time_to_first_token_seconds_count",
                 "ray_k2ray_inter_token_latency_seconds_count", "ray_k2ray_e2e_request_latency_seconds_count",
                 "ray_k2ray_step_seconds_count", "ray_k2ray_all_to_all_seconds_count", "ray_k2ray_requests_running",
                 "ray_k2ray_requests_waiting", "ray_k2ray_kv_cache_usage_ratio", "ray_k2ray_expert_tokens_total",
                 "ray_k2ray_expert_shard_imbalance_ratio", "ray_k2ray_queue_time_seconds_count",
                 "ray_k2ray_constrained_requests_total", "ray_k2ray_grammar_mask_seconds_count"):
        assert name in names, name  # (constrained requests come from test_tools_choices)
    assert metric_sum(s, "ray_k2ray_step_seconds_count", phase="decode", **m) > 0
    assert metric_sum(s, "ray_k2ray_all_to_all_seconds_count", op="combine", **m) > 0


def test_dashboard_queries_on_the_app(client, http):
    """A real Prometheus scrapes the app's Ray metrics port; every PromQL expression of dashboards/*.json returns
    data for this app's traffic (earlier tests sent chat, completions, errors and constrained tool calls)."""
    from .. import prometheus_util as pu

    for _ in range(3):  # fresh samples inside Prometheus' rate windows
        client.completions.create(model=MODEL, prompt="dashboard traffic", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    with pu.PrometheusServer({"ray": [f"127.0.0.1:{METRICS_PORT}"]}, scrape_interval="1s") as prom:
        prom.wait_for_targets(30)

        def queries_answered():
            for _ in range(2):
                client.completions.create(model=MODEL, prompt="more traffic", max_tokens=4, temperature=0)
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0,  # constrained
                                           response_format={"type": "json_object"})
            missing = []
            for file, title, ref, expr in pu.dashboard_exprs():
                q = pu.substitute(expr, {"model": MODEL, "application": "k2ray"}, interval="1m")
                res = prom.query(q)
                # (a series whose rate is 0 in the window, e.g. an idle phase, gives NaN: one finite series suffices)
                if not any(pu.is_finite_number(r["value"][1]) for r in res):
                    missing.append(f"{title} / {ref}: {q}")
            return missing

        deadline = time.monotonic() + 90
        missing = queries_answered()
        while missing and time.monotonic() < deadline:
            time.sleep(3)
            missing = queries_answered()
        assert not missing, "\n".join(missing)
        # Values match what was sent: tokens generated == tokens the clients received in this window.
        gen = prom.value(f'sum(ray_k2ray_generation_tokens_total{{model="{MODEL}"}})')
        assert gen and gen > 0


# -- failure and recovery (last: it replaces the model group's workers) ------------------------------------------------
def _my_expert_shards() -> list[int]:
    """Pids of the ExpertShard actor processes of THIS test's Ray cluster (descendants of this process)."""
    mine = descendant_pids()
    out = []
    for pid in sorted(mine):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"ExpertShard" in fh.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def test_group_failure_fails_fast_and_recovers(base, client, http):
    kw = dict(model=MODEL, prompt="Recovery check", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    before = client.completions.create(**kw).choices[0].text
    shards = _my_expert_shards()
    assert len(shards) == 2, shards
    os.kill(shards[0], signal.SIGKILL)
    t0 = time.monotonic()
    r = http.post(CMPL, json={**kw, "extra_body": None, "ignore_eos": True, "max_tokens": 50})
    assert time.monotonic() - t0 < 90
    if r.status_code != 200:  # the step that hit the dead shard fails the request cleanly
        assert_openai_error(r, 503)
    # the group is rebuilt in place; health comes back and the same greedy answer follows
    wait_until(lambda: httpx.get(base + "/health").status_code == 200
               and http.get("/v1/k2ray/stats").json()["state"] == "ready", 120, 1.0, "the group to recover")
    assert client.completions.create(**kw).choices[0].text == before
    assert len(_my_expert_shards()) == 2
