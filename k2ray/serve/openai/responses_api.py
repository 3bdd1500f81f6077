"""OpenAI's Responses API (``POST /v1/responses``), the request side: a thin translation onto the chat planner.

A Responses request becomes an internal :class:`~k2ray.serve.openai.protocol.ChatCompletionRequest` (``instructions``
-> a system message, the input items -> chat messages, ``tools`` / ``tool_choice`` / ``text.format`` /
``max_output_tokens`` / ``reasoning.effort`` -> their chat counterparts) and goes through
:func:`k2ray.serve.openai.chat.plan_chat` unchanged; the answer is the chat accumulator's, re-shaped by
:mod:`k2ray.serve.openai.responses_events`. No Ray (the stored previous response is handed in); the only I/O is the
chat planner's loading of image URLs.

Input items understood (anything else is a 400 naming the item): ``message`` items and bare ``{role, content}``
objects (content a string or ``input_text`` / ``output_text`` / ``refusal`` parts; a user message's ``input_image``
parts become chat ``image_url`` parts, for a model that takes images; ``input_file`` and ``input_audio`` are refused:
this server has no file or audio input), ``function_call`` (its ``call_id`` becomes
the OpenAI tool-call id, unchanged), ``function_call_output``, and ``reasoning`` items (their ``content`` text, or
else their ``summary`` text, goes back to the model as the assistant turn's ``reasoning_content``). Consecutive
reasoning / assistant message / function_call items form ONE assistant turn, as the model wrote them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pydantic import ValidationError, field_validator

from k2ray.runtime.sampling import ParamError
from k2ray.serve.openai import chat
from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.errors import APIError, bad_request, from_validation
from k2ray.serve.part_origins import PartOrigins

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
NO_THINKING_EFFORTS = ("none", "minimal")  # these switch the think block off (the template pre-fills an empty one)
SUMMARY_MODES = ("auto", "concise", "detailed")
MAX_METADATA_KEYS = 16


def new_id(prefix: str) -> str:
    """OpenAI's id style: ``resp_...``, ``msg_...``, ``rs_...``, ``fc_...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(P._Request):
    """The request body. Unknown fields are ignored (as for chat); the ones listed in docs/api.md as refused are
    checked here."""

    model: Optional[str] = None
    input: Optional[Union[str, list[dict[str, Any]]]] = None
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    reasoning: Optional[dict[str, Any]] = None
    text: Optional[dict[str, Any]] = None
    store: Optional[bool] = None  # null = true, as OpenAI
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    stream: bool = False
    background: Optional[bool] = None
    conversation: Optional[Union[str, dict[str, Any]]] = None
    prompt: Optional[dict[str, Any]] = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and len(v) > MAX_METADATA_KEYS:
            raise ParamError("metadata", f"at most {MAX_METADATA_KEYS} keys (got {len(v)})")
        return v

    @property
    def stored(self) -> bool:
        return self.store is not False


# -- input items -> chat messages ---------------------------------------------------------------------------------------
def _text_of_parts(parts: Any, where: str, allowed: tuple[str, ...]) -> str:
    """A message's ``content``: a string, or a list of text parts (joined). Image / file / audio parts are refused."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise bad_request(f"{where}: expected a string or a list of content parts", where)
    out = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            what = "images are taken in user messages only" if kind == "input_image" else \
                "this server takes text and image input (no file or audio input)"
            raise bad_request(f"{here}: {kind} content is not supported here: {what}", here, "unsupported_content")
        if kind not in allowed:
            raise bad_request(f"{here}.type: expected one of {list(allowed)} (got {kind!r})", f"{here}.type")
        key = "refusal" if kind == "refusal" else "text"
        text = part.get(key)
        if not isinstance(text, str):
            raise bad_request(f"{here}.{key}: expected a string", f"{here}.{key}")
        out.append(text)
    return "".join(out)


def _image_part(part: dict, where: str) -> dict[str, Any]:
    """An ``input_image`` part -> the chat ``image_url`` part (``detail`` is accepted and ignored: the image
    processor decides the resolution)."""
    url = part.get("image_url")
    if part.get("file_id") is not None and url is None:
        raise bad_request(f"{where}.file_id: file ids are not supported (no Files API): send image_url, an http(s) "
                          f"or data: URL", f"{where}.file_id", "unsupported_content")
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.image_url: expected an http(s) or data: URL string", f"{where}.image_url")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_content(parts: Any, where: str, origins: PartOrigins) -> Union[str, list[dict[str, Any]]]:
    """A user message's ``content``: text parts joined into a string, or, when it holds ``input_image`` parts, the
    chat content list (text and ``image_url`` parts in their order) that the chat planner takes images from."""
    if not isinstance(parts, list) or not any(isinstance(p, dict) and p.get("type") == "input_image"
                                              for p in parts):
        return _text_of_parts(parts, where, ("input_text",))
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        if isinstance(part, dict) and part.get("type") == "input_image":
            out.append(origins.note(_image_part(part, here), here))
        else:
            out.append({"type": "text", "text": _text_of_parts([part], where, ("input_text",))})
    return out


def _function_output(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    return _text_of_parts(value, where, ("input_text", "output_text"))


def _str_field(item: dict, key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or (key != "arguments" and not v):
        raise bad_request(f"{where}.{key}: expected a non-empty string", f"{where}.{key}")
    return v


class _Turns:
    """Builds chat messages, folding consecutive assistant-side items into one assistant message."""

    def __init__(self):
        self.messages: list[dict[str, Any]] = []
        self._assistant: Optional[dict[str, Any]] = None

    def _open(self, new_turn: bool) -> dict[str, Any]:
        if self._assistant is None or new_turn:
            self.flush()
            self._assistant = {"role": "assistant", "content": ""}
        return self._assistant

    def flush(self) -> None:
        if self._assistant is not None:
            a = self._assistant
            if a.get("tool_calls") and not a["content"]:
                a["content"] = None
            self.messages.append(a)
            self._assistant = None

    def reasoning(self, text: str) -> None:
        a = self._assistant
        # reasoning comes first in a turn: after text or calls it starts the next one
        a = self._open(new_turn=a is not None and bool(a["content"] or a.get("tool_calls")))
        a["reasoning_content"] = a.get("reasoning_content", "") + text

    def assistant_text(self, text: str) -> None:
        a = self._assistant
        a = self._open(new_turn=a is not None and bool(a.get("tool_calls")))
        a["content"] += text

    def call(self, call_id: str, name: str, arguments: str) -> None:
        a = self._open(new_turn=False)
        a.setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})

    def other(self, message: dict[str, Any]) -> None:
        self.flush()
        self.messages.append(message)


def normalize_input(value: Union[str, list, None]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def items_to_messages(items: list[dict[str, Any]], param: str = "input",
                      origins: Optional[PartOrigins] = None) -> list[dict[str, Any]]:
    """Responses input items -> chat messages. ``param`` prefixes the field named in errors; ``origins`` notes the
    image parts."""
    origins = origins if origins is not None else PartOrigins()
    turns = _Turns()
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where}: expected an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            content = item.get("content")
            if role == "assistant":
                turns.assistant_text(_text_of_parts(content, f"{where}.content", ("output_text", "input_text",
                                                                                  "refusal")))
            elif role == "user":
                turns.other({"role": role, "content": _user_content(content, f"{where}.content", origins)})
            elif role in ("system", "developer"):
                text = _text_of_parts(content, f"{where}.content", ("input_text",))
                turns.other({"role": role, "content": text})
            else:
                raise bad_request(f"{where}.role: expected user, assistant, system or developer (got {role!r})",
                                  f"{where}.role")
        elif kind == "function_call":
            turns.call(_str_field(item, "call_id", where), _str_field(item, "name", where),
                       _str_field(item, "arguments", where))
        elif kind == "function_call_output":
            if "output" not in item:
                raise bad_request(f"{where}.output: required", f"{where}.output")
            turns.other({"role": "tool", "tool_call_id": _str_field(item, "call_id", where),
                         "content": _function_output(item["output"], f"{where}.output")})
        elif kind == "reasoning":
            content = item.get("content") or []
            summary = item.get("summary") or []
            parts = content if content else summary
            kinds = ("reasoning_text",) if content else ("summary_text",)
            text = _text_of_parts(parts, f"{where}.{'content' if content else 'summary'}", kinds) if parts else ""
            turns.reasoning(text)
        else:
            raise bad_request(f"{where}.type: input items of type {kind!r} are not supported (message, "
                              f"function_call, function_call_output and reasoning are)", f"{where}.type")
    turns.flush()
    return turns.messages


# -- the other fields -> their chat counterparts ---------------------------------------------------------------------
def _tools(tools: Optional[list[dict[str, Any]]]) -> tuple[Optional[list[dict]], list[dict]]:
    """``(chat tools, the tools as the response echoes them)``. A Responses function tool is flat:
    ``{type, name, description, parameters, strict}``. An absent ``strict`` means not strict, as in chat (OpenAI's
    Responses API defaults it to true): the chat template shows the declaration to the model as given, so a default
    added here would change the prompt of every tool request; send ``strict: true`` for constrained arguments."""
    if not tools:
        return None, []
    chat_tools, echo = [], []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if t.get("type") != "function":
            raise bad_request(f"{where}.type: only function tools are supported (got {t.get('type')!r})",
                              f"{where}.type")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        try:
            P.FunctionDefinition.model_validate(fn, strict=True)
        except ValidationError as e:
            err = from_validation(e)
            param = f"{where}.{err.param}" if err.param else where
            raise bad_request(f"{param}: {err.message.removeprefix(f'{err.param}: ')}", param) from None
        chat_tools.append({"type": "function", "function": fn})
        echo.append({"type": "function", "name": fn["name"], "description": fn.get("description"),
                     "parameters": fn.get("parameters"), "strict": bool(fn.get("strict"))})
    return chat_tools, echo


def _tool_choice(choice: Union[str, dict, None]) -> tuple[Any, Any]:
    """``(chat tool_choice, echoed tool_choice)``."""
    if choice is None:
        return None, "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(f"tool_choice: expected auto, none, required or a function (got {choice!r})",
                              "tool_choice")
        return choice, choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise bad_request("tool_choice: only {\"type\": \"function\", \"name\": ...} is supported besides auto, none "
                          "and required", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}, {"type": "function", "name": choice["name"]}


def _text_format(text: Optional[dict[str, Any]]) -> tuple[Optional[dict], dict]:
    """``text.format`` -> ``(chat response_format, echoed text config)``."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(fmt, dict):
        raise bad_request("text.format: expected an object", "text.format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}, {"format": {"type": kind}}
    if kind != "json_schema":
        raise bad_request(f"text.format.type: expected text, json_object or json_schema (got {kind!r})",
                          "text.format.type")
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request("text.format.schema: expected a JSON schema object", "text.format.schema")
    name = fmt.get("name") or "response"
    spec = {"name": name, "schema": fmt["schema"], "strict": fmt.get("strict")}
    echo = {"type": "json_schema", "name": name, "schema": fmt["schema"], "strict": fmt.get("strict"),
            "description": fmt.get("description")}
    return {"type": "json_schema", "json_schema": spec}, {"format": echo}


def _reasoning(reasoning: Optional[dict[str, Any]]) -> tuple[Optional[bool], Optional[str], dict]:
    """``(thinking switch or None for the server's default, summary mode, echoed reasoning)``."""
    r = reasoning or {}
    effort, summary = r.get("effort"), r.get("summary", r.get("generate_summary"))
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"reasoning.effort: expected one of {list(REASONING_EFFORTS)} (got {effort!r})",
                          "reasoning.effort")
    if summary is not None and summary not in SUMMARY_MODES:
        raise bad_request(f"reasoning.summary: expected one of {list(SUMMARY_MODES)} (got {summary!r})",
                          "reasoning.summary")
    thinking = False if effort in NO_THINKING_EFFORTS else None
    return thinking, summary, {"effort": effort, "summary": summary}


# Parameters the chat planner names, as the Responses API calls them.
_PARAM_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format.json_schema.schema": "text.format.schema", "response_format": "text.format",
                "json_schema": "text.format.schema"}


def _renamed(e: APIError, origins: PartOrigins) -> APIError:
    name = _PARAM_NAMES.get(e.param or "")
    if name is None:
        if origins.rename(e.param) == e.param:
            return e
        return APIError(e.status, origins.rename(e.message), e.type, origins.rename(e.param), e.code)
    msg = e.message.replace(f"{e.param}:", f"{name}:", 1) if e.message.startswith(f"{e.param}:") else e.message
    return APIError(e.status, msg, e.type, name, e.code)


@dataclass
class ResponsesTurn:
    """A planned request: the chat plan, the conversation's items (stored with the response) and the request's fields
    the response object echoes."""

    plan: chat.ChatPlan
    items: list[dict[str, Any]]
    echo: dict[str, Any]
    summary: Optional[str] = None
    created_at: int = field(default_factory=lambda: int(time.time()))


def check_request(req: ResponsesRequest) -> None:
    """The fields this server refuses outright (before anything is looked up)."""
    if req.background:
        raise bad_request("background: background responses are not supported", "background")
    if req.conversation is not None:
        raise bad_request("conversation: conversations are not supported; use previous_response_id", "conversation")
    if req.prompt is not None:
        raise bad_request("prompt: prompt templates are not supported", "prompt")
    if req.input is None and req.previous_response_id is None:
        raise bad_request("input: required (a string or a list of input items)", "input")
    if isinstance(req.input, list) and not req.input and req.previous_response_id is None:
        raise bad_request("input: must not be empty", "input")


def plan_response(req: ResponsesRequest, previous: Optional[dict], template, tokenizer, limits, options, thinks,
                  image_config=None) -> ResponsesTurn:
    """The chat plan of a Responses request. ``previous``: the stored record of ``previous_response_id`` (its items
    and response), whose conversation this request continues; its ``instructions`` are not carried over (OpenAI's
    rule: each request gives its own)."""
    check_request(req)
    history = (previous["items"] + previous["response"]["output"]) if previous else []
    new_items = normalize_input(req.input)
    origins = PartOrigins()
    messages = items_to_messages(history, "previous_response_id", origins) if history else []
    messages += items_to_messages(new_items, "input", origins)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    origins.index(messages)
    tools, tools_echo = _tools(req.tools)
    choice, choice_echo = _tool_choice(req.tool_choice)
    response_format, text_echo = _text_format(req.text)
    thinking, summary, reasoning_echo = _reasoning(req.reasoning)
    body: dict[str, Any] = {"messages": messages, "temperature": req.temperature, "top_p": req.top_p,
                            "max_completion_tokens": req.max_output_tokens,
                            "parallel_tool_calls": req.parallel_tool_calls}
    if tools:
        body["tools"] = tools
    if choice is not None:
        body["tool_choice"] = choice
    if response_format is not None:
        body["response_format"] = response_format
    if thinking is not None:
        body["chat_template_kwargs"] = {"thinking": thinking}
    try:
        chat_req = P.ChatCompletionRequest.model_validate(body)
        plan = chat.plan_chat(chat_req, template, tokenizer, limits, options, thinks, image_config)
    except APIError as e:
        raise _renamed(e, origins) from None
    except ParamError as e:
        raise _renamed(bad_request(str(e), e.param), origins) from None
    except ValidationError as e:
        raise _renamed(from_validation(e), origins) from None
    echo = {
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": req.previous_response_id,
        "reasoning": reasoning_echo, "store": req.stored, "temperature": req.temperature, "text": text_echo,
        "tool_choice": choice_echo, "tools": tools_echo, "top_p": req.top_p, "truncation": "disabled",
        "user": req.user,
    }
    return ResponsesTurn(plan=plan, items=history + new_items, echo=echo, summary=summary)
