"""An Anthropic Messages request -> the internal :class:`~k2ray.serve.openai.protocol.ChatCompletionRequest`, which
the chat planner (:func:`~k2ray.serve.openai.chat.plan_chat`) plans like any chat request: one template rendering,
one context-length, tool-choice and grammar policy for both APIs.

The conversation becomes OpenAI messages: ``system`` a system message; a user turn's text blocks a user message and
each ``tool_result`` a tool message (``tool_call_id`` = the ``tool_use_id``, an error result prefixed with
:data:`ERROR_PREFIX`); an assistant turn's text blocks its ``content``, its ``thinking`` blocks its
``reasoning_content`` and its ``tool_use`` blocks its ``tool_calls`` (``id`` passed through: the planner renumbers
ids that are not Kimi's). A user turn's ``image`` blocks (base64 or url sources) become chat ``image_url`` parts
between its text, for a model that takes images. ``redacted_thinking`` is opaque to this model and dropped.
Documents, images inside tool results and other block types are refused with a 400 naming the block.
"""

from __future__ import annotations

import json
from typing import Optional, Union

from k2ray.runtime.sampling import ParamError
from k2ray.serve.anthropic import protocol as A
from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.chat import ChatOptions, ChatPlan, plan_chat
from k2ray.serve.openai.errors import APIError
from k2ray.serve.openai.limits import Limits
from k2ray.serve.part_origins import PartOrigins

ERROR_PREFIX = "Error: "  # a tool_result with is_error: the model sees that the call failed

# The planner names OpenAI's parameters; an Anthropic client sent these.
_PARAM_NAMES = {
    "stop": "stop_sequences",
    "max_completion_tokens": "max_tokens",
    "response_format": "output_config.format",
    "response_format.json_schema.schema": "output_config.format.schema",
    "json_schema": "output_config.format.schema",
}


def _unsupported(block, where: str) -> ParamError:
    if block.type == "image":
        return ParamError(where, "image blocks are taken in a user turn's content only (not in tool results or "
                                 "assistant turns)")
    return ParamError(where, f"content block type {block.type!r} is not supported here")


def _image_url(block: A.ImageBlockParam, where: str) -> str:
    """The URL of an image block's ``source``: base64 data as a ``data:`` URL, or the ``url`` source's URL."""
    src = block.source
    if not isinstance(src, dict):
        raise ParamError(f"{where}.source", "required: {\"type\": \"base64\", \"media_type\", \"data\"} or "
                                            "{\"type\": \"url\", \"url\"}")
    kind = src.get("type")
    if kind == "base64":
        media, data = src.get("media_type"), src.get("data")
        if not isinstance(media, str) or not media.startswith("image/"):
            raise ParamError(f"{where}.source.media_type", f"expected an image media type such as image/png "
                                                           f"(got {media!r})")
        if not isinstance(data, str) or not data:
            raise ParamError(f"{where}.source.data", "expected the base64-encoded image")
        return f"data:{media};base64,{data}"
    if kind == "url":
        url = src.get("url")
        if not isinstance(url, str) or not url:
            raise ParamError(f"{where}.source.url", "expected an http(s) URL string")
        return url
    raise ParamError(f"{where}.source.type", f"expected 'base64' or 'url' (got {kind!r}; file sources need the "
                                             f"Files API, which this server does not have)")


def _misplaced(block, where: str, role: str) -> ParamError:
    return ParamError(where, f"a {block.type!r} block is not allowed in a {role} message")


def _tool_result_text(block: A.ToolResultBlockParam, where: str) -> str:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, A.TextBlockParam):
                raise _unsupported(part, f"{where}.content[{k}]")
            parts.append(part.text)
        text = "".join(parts)
    return ERROR_PREFIX + text if block.is_error else text


def _user_turn(blocks: list, where: str, origins: PartOrigins) -> list[dict]:
    """A user turn: its text and images (consecutive text and image blocks together: a string, or a list of chat
    parts when it holds images) and one tool message per ``tool_result``."""
    out: list[dict] = []
    parts: list[dict] = []

    def flush():
        if any(p["type"] == "image_url" for p in parts):
            out.append({"role": "user", "content": list(parts)})
        elif parts:
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
        parts.clear()

    for j, b in enumerate(blocks):
        w = f"{where}.content[{j}]"
        if isinstance(b, A.TextBlockParam):
            parts.append({"type": "text", "text": b.text})
        elif isinstance(b, A.ImageBlockParam):
            parts.append(origins.note({"type": "image_url", "image_url": {"url": _image_url(b, w)}}, w))
        elif isinstance(b, A.ToolResultBlockParam):
            flush()
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _tool_result_text(b, w)})
        elif isinstance(b, (A.ToolUseBlockParam, A.ThinkingBlockParam, A.RedactedThinkingBlockParam)):
            raise _misplaced(b, w, "user")
        else:
            raise _unsupported(b, w)
    flush()
    return out


def _assistant_turn(blocks: list, where: str) -> dict:
    """An assistant turn: text -> ``content``, thinking -> ``reasoning_content``, tool uses -> ``tool_calls``."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    for j, b in enumerate(blocks):
        w = f"{where}.content[{j}]"
        if isinstance(b, A.TextBlockParam):
            texts.append(b.text)
        elif isinstance(b, A.ThinkingBlockParam):
            reasoning.append(b.thinking)
        elif isinstance(b, A.RedactedThinkingBlockParam):
            continue  # opaque data of another model: nothing to render
        elif isinstance(b, A.ToolUseBlockParam):
            calls.append({"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
        elif isinstance(b, A.ToolResultBlockParam):
            raise _misplaced(b, w, "assistant")
        else:
            raise _unsupported(b, w)
    msg: dict = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        msg["reasoning_content"] = "".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def to_messages(req: A.CountTokensRequest, origins: Optional[PartOrigins] = None) -> list[dict]:
    """The conversation as OpenAI chat messages (``origins`` learns where their image parts came from)."""
    origins = origins if origins is not None else PartOrigins()
    out: list[dict] = []
    if req.system is not None:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif not m.content:
            raise ParamError(f"{where}.content", "at least one content block is required")
        elif m.role == "user":
            out += _user_turn(m.content, where, origins)
        else:
            out.append(_assistant_turn(m.content, where))
    if req.messages[-1].role == "assistant":
        raise ParamError(f"messages[{len(req.messages) - 1}]",
                         "a final assistant message (prefill) is not supported: end with a user message")
    origins.index(out)
    return out


def _tool_choice(tc) -> tuple[Union[str, P.NamedToolChoice, None], Optional[bool]]:
    """``(OpenAI tool_choice, parallel_tool_calls)``."""
    if tc is None:
        return None, None
    parallel = False if getattr(tc, "disable_parallel_tool_use", False) else None
    if isinstance(tc, A.ToolChoiceAuto):
        return "auto", parallel
    if isinstance(tc, A.ToolChoiceAny):
        return "required", parallel
    if isinstance(tc, A.ToolChoiceTool):
        return P.NamedToolChoice(function=P.NamedFunction(name=tc.name)), parallel
    return "none", None


def _thinking(cfg) -> Optional[dict]:
    if isinstance(cfg, A.ThinkingEnabled):
        return {"thinking": True}
    if isinstance(cfg, A.ThinkingDisabled):
        return {"thinking": False}
    return None  # absent or adaptive: the server's default


def to_chat_request(req: A.CountTokensRequest, origins: Optional[PartOrigins] = None) -> P.ChatCompletionRequest:
    """The chat request the Messages request means (``count_tokens`` requests too: no sampling fields then)."""
    tools = [P.Tool(function=P.FunctionDefinition(name=t.name, description=t.description, parameters=t.input_schema,
                                                  strict=t.strict))
             for t in req.tools] if req.tools else None
    choice, parallel = _tool_choice(req.tool_choice)
    fmt = req.output_config.format if req.output_config is not None else None
    fields: dict = dict(
        messages=to_messages(req, origins), tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
        chat_template_kwargs=_thinking(req.thinking),
        response_format=(P.ResponseFormat(type="json_schema", json_schema={"name": "output", "schema": fmt.schema_})
                         if fmt is not None else None),
    )
    if isinstance(req, A.MessagesRequest):
        fields.update(max_tokens=req.max_tokens, stop=req.stop_sequences, stream=req.stream,
                      temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    return P.ChatCompletionRequest(**fields)


def _renamed(param: Optional[str], origins: PartOrigins) -> Optional[str]:
    return _PARAM_NAMES.get(param, origins.rename(param)) if param else param


def plan_messages(req: A.CountTokensRequest, template, tokenizer, limits: Limits, options: ChatOptions,
                  thinking_template: bool, image_config=None) -> ChatPlan:
    """Translate and plan (errors name the Anthropic parameter where the planner named OpenAI's). ``image_config``:
    the model's image processor config when it takes images."""
    origins = PartOrigins()
    chat_req = to_chat_request(req, origins)
    try:
        return plan_chat(chat_req, template, tokenizer, limits, options, thinking_template, image_config)
    except ParamError as e:
        new = _renamed(e.param, origins)
        if new == e.param:
            raise
        raise ParamError(new, str(e).removeprefix(f"{e.param}: ")) from None
    except APIError as e:
        new = _renamed(e.param, origins)
        if new == e.param:
            raise
        msg = f"{new}: {e.message.removeprefix(f'{e.param}: ')}" if e.message.startswith(f"{e.param}:") else e.message
        raise APIError(e.status, msg, e.type, new, e.code) from None
