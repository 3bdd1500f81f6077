"""The OpenAI front end without Ray: the chat planner, the accumulators (a streamed answer equals the non-streamed
one), the error mapping and the HTTP rules, through FastAPI's TestClient against a scripted model group.

The scripted group plays the engine's part of the wire contract (k2ray.serve.wire): it answers each request with
fixed texts, tokenized by the real tiny Kimi tokenizer, a few tokens per chunk, with logprobs when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from k2ray.runtime.sampling import ParamError
from k2ray.serve.ingress import OpenAIIngress
from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.chat import ChatOptions, plan_chat
from k2ray.serve.openai.errors import APIError, from_exception
from k2ray.serve.openai.limits import Limits
from k2ray.serve.wire import GenerateChunk, GenerateError, SequenceDelta
from k2ray.tokenizer import ChatTemplate, KimiTokenizer
from k2ray.tokenizer.tiny import DATA_DIR, TOKENIZER_FILES

MODEL = "k2ray-test"
MAX_MODEL_LEN = 512
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ANSWER = "<think>Paris is the capital of France.</think>The capital of France is Paris."
CALL = ('<think>I will look it up.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')


class ScriptedGroups:
    """A model group that answers every request with ``script[i]`` for its sequence ``i`` (a few tokens a chunk)."""

    def __init__(self, tokenizer: KimiTokenizer):
        self.tok = tokenizer
        self.script = [ANSWER]
        self.requests = []
        self.fail_mid_stream: GenerateError | None = None

    async def status(self) -> dict:
        return {"state": "ready", "group": "g0"}

    async def tokenizer_files(self) -> dict[str, bytes]:
        return {n: (Path(DATA_DIR) / n).read_bytes() for n in TOKENIZER_FILES}

    async def info(self) -> dict:
        return {"max_model_len": MAX_MODEL_LEN, "vocab_size": self.tok.vocab_size}

    async def layout(self) -> dict:
        return {"group": "g0"}

    async def stats(self) -> dict:
        return {"group": "g0"}

    async def open(self, req):
        self.requests.append(req)
        return _Stream(self._chunks(req))

    def _pairs(self, tok: int, k: int | None):
        return [(tok, -0.5)] + [((tok + 1 + j) % self.tok.n_base_tokens, -1.0 - j) for j in range(k or 0)]

    def _chunks(self, req) -> list:
        p = req.sampling
        seqs = []
        for i in range(p.n):
            ids = self.tok.encode_with_specials(self.tok.split_special(self.script[i % len(self.script)]))
            cut = len(ids) > p.max_tokens
            seqs.append((ids[: p.max_tokens], "length" if cut else "stop"))
        prompt_lp = None
        if p.prompt_logprobs is not None:
            prompt_lp = [None] + [self._pairs(t, p.prompt_logprobs) for t in req.prompt_token_ids[1:]]
        chunks, step, finished = [], 0, set()
        while len(finished) < len(seqs):
            outs = []
            for i, (ids, reason) in enumerate(seqs):
                if i in finished:
                    continue
                new = ids[step * 3: step * 3 + 3]
                done = step * 3 + 3 >= len(ids)
                if done:
                    finished.add(i)
                outs.append(SequenceDelta(
                    index=i, text="".join(self.tok.decode([t]) for t in new), token_ids=new,
                    logprobs=[self._pairs(t, p.logprobs) for t in new] if p.logprobs is not None else None,
                    finish_reason=reason if done else None, stop_reason=None))
            first = step == 0
            chunks.append(GenerateChunk(
                outputs=outs, finished=False, num_prompt_tokens=len(req.prompt_token_ids) if first else None,
                num_cached_tokens=0, prompt_logprobs=prompt_lp if first else None,
                model_group="g0" if first else None))
            step += 1
        if self.fail_mid_stream is not None:
            chunks.insert(1, self.fail_mid_stream)
        return chunks


class _Stream:
    def __init__(self, chunks):
        self.first, self._chunks, self.cancelled = chunks[0], chunks, False

    async def __aiter__(self):
        for c in self._chunks:
            yield c

    def cancel(self):
        self.cancelled = True


@pytest.fixture(scope="module")
def tokenizer():
    return KimiTokenizer.from_dir(DATA_DIR)


@pytest.fixture(scope="module")
def template(tokenizer):
    return ChatTemplate.from_dir(DATA_DIR, tokenizer)


@pytest.fixture()
def app(tokenizer):
    groups = ScriptedGroups(tokenizer)
    ingress = OpenAIIngress(groups, {"model": "k2ray-tiny", "served_model_name": MODEL, "api_keys": ["sk-test"],
                                     "max_request_bytes": 64 * 1024, "default_max_tokens": 64})
    with TestClient(ingress.build_asgi_app(), headers={"Authorization": "Bearer sk-test"}) as client:
        yield client, groups


LIMITS = Limits(max_model_len=MAX_MODEL_LEN, default_max_tokens=64, max_sequences=8, max_token_bytes=16)


def _chat(**kw) -> P.ChatCompletionRequest:
    return P.ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                   **kw})


# -- the chat planner --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice, constrained, tools_parsed", [
    (None, None, True),  # tools declared: auto, free text
    ("auto", None, True),
    ("none", None, False),
    ("required", "required", True),
    ({"type": "function", "function": {"name": "get_weather"}}, {"name": "get_weather"}, True),
])
def test_plan_chat_tool_choice(tokenizer, template, choice, constrained, tools_parsed):
    kw = {"tools": TOOLS} | ({"tool_choice": choice} if choice is not None else {})
    plan = plan_chat(_chat(**kw), template, tokenizer, LIMITS, ChatOptions(), True)
    guided = plan.sampling.guided_decoding
    assert (guided.tool_choice if guided else None) == constrained
    if guided:
        assert guided.tools == [t for t in TOOLS] and guided.call_index == 0 and guided.thinking is plan.thinking
    assert plan.parse_tools is tools_parsed
    rendered = tokenizer.decode(plan.prompt_token_ids)
    assert ("get_weather" in rendered) is (choice != "none")  # "none" hides the tools from the model
    assert plan.sampling.max_tokens == 64 and plan.sampling.skip_special_tokens is False


def test_plan_chat_strict_tool_under_auto_is_constrained(tokenizer, template):
    strict = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    plan = plan_chat(_chat(tools=strict), template, tokenizer, LIMITS, ChatOptions(), True)
    assert plan.sampling.guided_decoding.tool_choice == "auto"


@pytest.mark.parametrize("kw, param, code", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"n": 0}, "n", None),
    ({"n": 9}, "n", None),  # more sequences than a group holds
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema",
     None),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hello " * MAX_MODEL_LEN}]}, "messages", "context_length_exceeded"),
    ({"temperature": 3.0}, "temperature", None),
    ({"logit_bias": {"5": 250}}, "logit_bias", None),
    ({"stop_token_ids": [10 ** 7]}, "stop_token_ids", None),  # past the vocabulary
])
def test_plan_chat_rejects_with_the_parameter_named(tokenizer, template, kw, param, code):
    with pytest.raises((APIError, ParamError)) as info:
        plan_chat(_chat(**kw), template, tokenizer, LIMITS, ChatOptions(), True)
    err = from_exception(info.value)
    assert (err.status, err.param, err.code) == (400, param, code), err.body()


def test_plan_chat_response_format_and_thinking(tokenizer, template):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    plan = plan_chat(_chat(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
                     template, tokenizer, LIMITS, ChatOptions(), True)
    assert plan.sampling.guided_decoding.json_schema == schema and plan.thinking
    plan = plan_chat(_chat(response_format={"type": "json_object"}, chat_template_kwargs={"thinking": False}),
                     template, tokenizer, LIMITS, ChatOptions(), True)
    assert plan.sampling.guided_decoding.json_object and not plan.thinking
    assert not plan.sampling.guided_decoding.thinking
    # a server with reasoning off, or a template without think blocks, never splits reasoning off
    assert not plan_chat(_chat(), template, tokenizer, LIMITS, ChatOptions(enable_reasoning=False), True).thinking
    assert not plan_chat(_chat(), template, tokenizer, LIMITS, ChatOptions(), False).thinking


@pytest.mark.parametrize("request_kwargs, default, thinks", [
    ({"thinking": False}, {}, False), ({"enable_thinking": False}, {}, False), ({"enable_thinking": "false"}, {}, False),
    ({"thinking": "true"}, {"thinking": False}, True), ({"enable_thinking": True}, {"thinking": False}, True),
    ({"enable_thinking": "true"}, {"enable_thinking": False}, True), ({}, {"enable_thinking": "false"}, False),
    ({"thinking": True, "enable_thinking": False}, {}, True),  # both given: Kimi's own name wins
])
def test_thinking_switch_by_either_name(tokenizer, template, request_kwargs, default, thinks):
    """``chat_template_kwargs`` ``thinking`` and ``enable_thinking``, booleans or strings; a request's switch overrides
    the server's default; the prompt the template renders changes with it (not only the parser's flag)."""
    options = ChatOptions(default_chat_template_kwargs=default)
    plan = plan_chat(_chat(chat_template_kwargs=request_kwargs), template, tokenizer, LIMITS, options, True)
    reference = plan_chat(_chat(chat_template_kwargs={"thinking": thinks}), template, tokenizer, LIMITS,
                          ChatOptions(), True)
    assert plan.thinking is thinks
    assert plan.prompt_token_ids == reference.prompt_token_ids


# -- stream == non-stream ----------------------------------------------------------------------------------------------
def _events(resp) -> list:
    assert resp.status_code == 200, resp.text
    lines = [ln for ln in resp.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def _assemble_chat(events: list, n: int) -> dict:
    """The streamed deltas folded into the non-streamed response's choices (as a client library does)."""
    out = [{"content": "", "reasoning_content": "", "tool_calls": {}, "logprobs": [], "finish_reason": None}
           for _ in range(n)]
    for e in events:
        for c in e["choices"]:
            o, d = out[c["index"]], c["delta"]
            o["content"] += d.get("content") or ""
            o["reasoning_content"] += d.get("reasoning_content") or ""
            for tc in d.get("tool_calls") or []:
                slot = o["tool_calls"].setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.get("id") or slot["id"]
                slot["name"] += (tc.get("function") or {}).get("name") or ""
                slot["arguments"] += (tc.get("function") or {}).get("arguments") or ""
            if c.get("logprobs"):
                o["logprobs"] += c["logprobs"]["content"]
            o["finish_reason"] = c["finish_reason"] or o["finish_reason"]
    return out


@pytest.mark.parametrize("kw", [
    {"n": 2, "logprobs": True, "top_logprobs": 2},
    {"tools": TOOLS, "n": 2},
    {"tools": TOOLS, "tool_choice": "none", "logprobs": True},
    {"chat_template_kwargs": {"thinking": False}},
])
def test_chat_stream_equals_non_stream(app, kw):
    client, groups = app
    groups.script = [ANSWER, CALL]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France? Weather?"}], **kw}
    full = client.post("/v1/chat/completions", json=body).json()
    events = _events(client.post("/v1/chat/completions", json={**body, "stream": True,
                                                               "stream_options": {"include_usage": True}}))
    assert events[-1]["usage"] == full["usage"] and events[-1]["choices"] == []
    assert all(e["usage"] is None for e in events[:-1])
    streamed = _assemble_chat(events[:-1], len(full["choices"]))
    for ch, st in zip(full["choices"], streamed):
        msg = ch["message"]
        calls = [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in msg["tool_calls"]]
        assert (msg["content"] or "") == st["content"]
        assert (msg["reasoning_content"] or "") == st["reasoning_content"]
        assert calls == list(st["tool_calls"].values())
        assert ch["finish_reason"] == st["finish_reason"]
        assert (ch["logprobs"]["content"] if ch["logprobs"] else []) == st["logprobs"]
    first = full["choices"][0]["message"]
    tok = groups.tok
    n_think = {s: len(tok.encode_with_specials(tok.split_special(s.split("</think>")[0] + "</think>")))
               for s in (ANSWER, CALL)}  # the script's reasoning block, <think> ... </think>, in tokens
    reasoning = full["usage"]["completion_tokens_details"]["reasoning_tokens"]
    if kw.get("chat_template_kwargs"):
        assert first["reasoning_content"] is None and "Paris" in first["content"]
        assert reasoning == 0  # thinking off: the same text is content, not reasoning
    else:
        n = len(full["choices"])
        assert reasoning == sum(n_think[[ANSWER, CALL][i % 2]] for i in range(n)) > 0
        assert first["reasoning_content"] == "Paris is the capital of France."
        assert first["content"] == "The capital of France is Paris."
    if kw.get("tools") and kw.get("tool_choice") != "none":
        second = full["choices"][1]
        assert second["finish_reason"] == "tool_calls"
        assert second["message"]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}
        assert second["message"]["tool_calls"][0]["id"] == "functions.get_weather:0"
    if kw.get("logprobs"):
        lp = full["choices"][0]["logprobs"]["content"]
        assert len(lp) == len(groups.tok.encode_with_specials(groups.tok.split_special(ANSWER)))
        assert lp[0]["logprob"] == -0.5 and len(lp[0]["top_logprobs"]) == kw.get("top_logprobs", 0)


def test_completions_stream_equals_non_stream_with_echo_and_logprobs(app):
    client, groups = app
    groups.script = ["Once upon a time", "There was a king"]
    body = {"model": MODEL, "prompt": ["Hello there", "General"], "n": 2, "echo": True, "logprobs": 1,
            "max_tokens": 3}
    full = client.post("/v1/completions", json=body).json()
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    texts, lps, reasons = {}, {}, {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["logprobs"]:
                acc = lps.setdefault(c["index"], {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                  "text_offset": []})
                for key in acc:
                    acc[key] += c["logprobs"][key]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    assert [c["index"] for c in full["choices"]] == [0, 1, 2, 3]
    for ch in full["choices"]:
        assert ch["text"] == texts[ch["index"]] and ch["finish_reason"] == reasons[ch["index"]] == "length"
        assert ch["logprobs"] == lps[ch["index"]]
        prompt = body["prompt"][ch["index"] // 2]
        assert ch["text"].startswith(prompt) and ch["logprobs"]["token_logprobs"][0] is None  # echo: prompt first
        assert ch["logprobs"]["text_offset"][-1] < len(ch["text"])
    assert full["usage"]["completion_tokens"] == 4 * 3


# -- errors ------------------------------------------------------------------------------------------------------------
def test_http_errors_have_the_openai_shape(app):
    client, groups = app
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    cases = [
        (client.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"}), 401,
         "invalid_api_key", None),
        (client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
         400, "invalid_json", None),
        (client.post("/v1/chat/completions", json={**chat, "temperature": "hot"}), 400, None, "temperature"),
        (client.post("/v1/chat/completions", json={**chat, "model": "other"}), 404, "model_not_found", "model"),
        (client.post("/v1/chat/completions", json={**chat, "pad": "x" * 70_000}), 413, "request_too_large", None),
        (client.post("/v1/completions", json={"model": MODEL, "prompt": [[10 ** 7]]}), 400, None, "prompt"),
        (client.get("/v1/nowhere"), 404, "not_found", None),
    ]
    for r, status, code, param in cases:
        err = r.json()["error"]
        assert (r.status_code, err["code"], err["param"]) == (status, code, param), r.text
        assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    assert client.get("/health", headers={"Authorization": ""}).json() == {"status": "ok", "group": "g0"}


def test_error_from_the_group_mid_stream_is_one_error_event(app):
    client, groups = app
    groups.fail_mid_stream = GenerateError(503, "model group g0 failed; the request was aborted",
                                           "service_unavailable", "model_group_failed")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    events = _events(client.post("/v1/chat/completions", json=body))
    assert events[-1] == {"error": {"message": "model group g0 failed; the request was aborted",
                                    "type": "service_unavailable", "param": None, "code": "model_group_failed"}}
    full = client.post("/v1/chat/completions", json={**body, "stream": False})
    assert full.status_code == 503 and full.json()["error"]["code"] == "model_group_failed"
    assert full.headers["retry-after"] == "1"


def test_error_mapping_of_exceptions():
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    assert from_exception(ParamError("top_p", "must be in (0, 1]")).body()["error"] == {
        "message": "top_p: must be in (0, 1]", "type": "invalid_request_error", "param": "top_p", "code": None}
    assert (from_exception(BackPressureError(num_queued_requests=9, max_queued_requests=8)).status,
            from_exception(BackPressureError(num_queued_requests=9, max_queued_requests=8)).code) == (503, "overloaded")
    assert from_exception(RayActorError()).code == "model_group_failed"
    secret = from_exception(RuntimeError("actor pid=123 at 10.0.0.7 exploded"))
    assert secret.status == 500 and "10.0.0.7" not in secret.message and secret.code == "internal_error"
