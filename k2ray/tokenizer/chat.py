"""Chat templates: render OpenAI-style messages to a Kimi K2 prompt, and encode it safely.

Rendering follows transformers' ``apply_chat_template``: a sandboxed Jinja environment with
``trim_blocks``, ``lstrip_blocks`` and ``loopcontrols``, a ``tojson`` filter that is
``json.dumps(ensure_ascii=False)`` (with ``indent`` / ``separators`` / ``sort_keys``), and the
``raise_exception`` / ``strftime_now`` globals.

Before rendering, messages are validated and normalised (``normalize_messages``):

* content given as ``""``, a string or a list of text parts becomes one string; a list with image parts
  (``image_url``) stays a list of parts, handed to the template as transformers does (``{"type": "text", "text"}``
  and ``{"type": "image_url", "image_url": {"url"}}``), and the images are listed in the prompt
  (:attr:`ChatPrompt.images`) in the order the template renders them;
* tool-call arguments given as an object become ``json.dumps(obj, ensure_ascii=False)``; a
  string must be valid JSON and is kept verbatim (so what the model wrote round-trips exactly);
* tool-call ids that are not ``functions.NAME:IDX`` (e.g. ``call_abc`` from another provider)
  become ``functions.NAME:IDX`` with IDX counting tool calls across the conversation, and the
  ``tool_call_id`` of the tool message answering it is rewritten the same way.

Encoding never lets text supplied by a client become control tokens: only the markers the
template itself writes are special.  Every client string is escaped before rendering (a
noncharacter is inserted into any special-token spelling it contains), the rendered prompt is
split on special-token spellings, and the escaped text pieces are restored and encoded as
ordinary text.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .kimi_format import THINK_MARKERS, parse_tool_call_id, tool_call_id
from .tokenizer import KimiTokenizer

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "ChatPrompt",
    "normalize_messages",
    "thinking_enabled",
    "count_tool_calls",
    "DEFAULT_SYSTEM_PROMPT",
]

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "developer", "user", "assistant", "tool")

# Escaping of client text (see module docstring).  U+FDD0..U+FDD2 are Unicode noncharacters,
# reserved for exactly this kind of internal use.
_ESC = "\ufdd0"
_ESC_LITERAL = _ESC + "\ufdd1"  # a U+FDD0 that was in the client text
_ESC_BREAK = _ESC + "\ufdd2"  # inserted after the first character of a special-token spelling
_UNESCAPE_RE = re.compile(_ESC + "[\ufdd1\ufdd2]")


class ChatTemplateError(ValueError):
    """A malformed conversation (or a template that refuses it)."""


@dataclass
class ChatPrompt:
    """What the ingress needs from one chat request."""

    text: str
    token_ids: list[int]
    thinking: bool = True
    tool_call_offset: int = 0  # tool calls already in the history: the next IDX the model should use
    messages: list[dict] = field(default_factory=list)  # the normalised messages that were rendered
    images: list["ImagePart"] = field(default_factory=list)  # the image parts, in message and part order


@dataclass(frozen=True)
class ImagePart:
    """An image content part: its URL and where it was (``messages[i].content[j]``)."""

    url: str
    where: str
    detail: str | None = None


IMAGE_PART_TYPES = ("image_url", "image")


def _image_part(part: Mapping, where: str) -> ImagePart:
    ref = part.get(part.get("type"))
    detail = None
    if isinstance(ref, Mapping):
        detail = ref.get("detail")
        ref = ref.get("url")
    if not isinstance(ref, str) or not ref:
        raise ChatTemplateError(f"{where}.image_url.url: expected a URL string")
    return ImagePart(ref, where, detail if isinstance(detail, str) else None)


def collect_images(messages: list[dict]) -> list[ImagePart]:
    """The image parts of normalised messages, in order."""
    out = []
    for i, m in enumerate(messages):
        c = m.get("content")
        if isinstance(c, list):
            for j, part in enumerate(c):
                if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES:
                    out.append(_image_part(part, f"messages[{i}].content[{j}]"))
    return out


def thinking_enabled(value: Any = None, default: bool = True) -> bool:
    """Interpret a ``thinking`` switch: ``None`` -> default; bools; strings like ``"false"``/``"0"``/``"off"``.

    ``value`` may also be a whole ``chat_template_kwargs`` mapping.
    """
    if isinstance(value, Mapping):
        value = value.get("thinking")
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "none", "")
    return bool(value)


def _plain(obj: Any) -> Any:
    """Deep copy into plain dicts/lists (accepts pydantic models)."""
    if hasattr(obj, "model_dump") and callable(obj.model_dump):
        obj = obj.model_dump(exclude_none=True)
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return copy.copy(obj)


def _content_parts(content: list, where: str) -> list[dict]:
    """A content list with images: text and image parts as transformers hands them to the template."""
    parts: list[dict] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, Mapping):
            raise ChatTemplateError(f"{where}[{j}]: expected a content part object, got {type(part).__name__}")
        ptype = part.get("type", "text")
        if ptype in IMAGE_PART_TYPES:
            img = _image_part(part, f"{where}[{j}]")
            ref: dict[str, Any] = {"url": img.url}
            if img.detail is not None:
                ref["detail"] = img.detail
            parts.append({"type": "image_url", "image_url": ref})
        elif ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatTemplateError(f"{where}[{j}].text: expected a string")
            parts.append({"type": "text", "text": text})
        else:
            raise ChatTemplateError(f"{where}[{j}]: unsupported content part type {ptype!r} (only 'text' and "
                                    "'image_url')")
    return parts


def _content_text(content: Any, where: str, *, required: bool) -> str | list[dict]:
    if content is None:
        if required:
            raise ChatTemplateError(f"{where}: content is required")
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if any(isinstance(p, Mapping) and p.get("type") in IMAGE_PART_TYPES for p in content):
            return _content_parts(content, where)
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise ChatTemplateError(f"{where}[{j}]: expected a content part object, got {type(part).__name__}")
            ptype = part.get("type", "text")
            if ptype != "text":
                raise ChatTemplateError(f"{where}[{j}]: unsupported content part type {ptype!r} (only 'text')")
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatTemplateError(f"{where}[{j}].text: expected a string")
            parts.append(text)
        return "".join(parts)
    raise ChatTemplateError(
        f"{where}: expected a string, a list of text parts or null, got {type(content).__name__}"
    )


def _arguments_text(args: Any, where: str) -> str:
    if isinstance(args, str):
        if not args.strip():
            return "{}"
        try:
            json.loads(args, strict=False)
        except ValueError as exc:
            raise ChatTemplateError(f"{where}: not valid JSON ({exc})") from None
        return args
    if isinstance(args, (Mapping, list)):
        return json.dumps(args, ensure_ascii=False)
    if args is None:
        raise ChatTemplateError(f"{where}: missing")
    raise ChatTemplateError(f"{where}: expected a JSON string or an object, got {type(args).__name__}")


def normalize_messages(messages: Any) -> list[dict]:
    """Validate OpenAI-style messages and normalise them for the template (see module docstring)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ChatTemplateError("messages must be a list of message objects")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    out: list[dict] = []
    id_map: dict[str, str] = {}
    n_calls = 0
    for i, raw in enumerate(messages):
        msg = _plain(raw)
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ChatTemplateError(f"{where}: expected a message object, got {type(raw).__name__}")
        role = msg.get("role")
        if role is None:
            raise ChatTemplateError(f"{where}: missing 'role'")
        if role not in ROLES:
            raise ChatTemplateError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "developer":
            role = "system"
        norm: dict[str, Any] = {"role": role}
        name = msg.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ChatTemplateError(f"{where}.name: expected a string")
            if name:
                norm["name"] = name
        norm["content"] = _content_text(msg.get("content"), f"{where}.content", required=role != "assistant")

        if role == "assistant":
            reasoning = msg.get("reasoning_content")
            if reasoning is None:
                reasoning = msg.get("reasoning")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise ChatTemplateError(f"{where}.reasoning_content: expected a string")
                norm["reasoning_content"] = reasoning
            tool_calls = msg.get("tool_calls")
            if tool_calls:
                if not isinstance(tool_calls, list):
                    raise ChatTemplateError(f"{where}.tool_calls: expected a list")
                calls = []
                for j, tc in enumerate(tool_calls):
                    w = f"{where}.tool_calls[{j}]"
                    if not isinstance(tc, dict):
                        raise ChatTemplateError(f"{w}: expected an object")
                    if tc.get("type", "function") != "function":
                        raise ChatTemplateError(f"{w}.type: unsupported tool call type {tc.get('type')!r}")
                    fn = tc.get("function")
                    if not isinstance(fn, dict):
                        raise ChatTemplateError(f"{w}.function: missing")
                    fname = fn.get("name")
                    if not isinstance(fname, str) or not fname:
                        raise ChatTemplateError(f"{w}.function.name: missing or not a string")
                    args = _arguments_text(fn.get("arguments"), f"{w}.function.arguments")
                    raw_id = tc.get("id")
                    if raw_id is not None and not isinstance(raw_id, str):
                        raise ChatTemplateError(f"{w}.id: expected a string")
                    parsed = parse_tool_call_id(raw_id) if raw_id else None
                    new_id = raw_id if (parsed and parsed[0] == fname) else tool_call_id(fname, n_calls)
                    if raw_id:
                        id_map[raw_id] = new_id
                    n_calls += 1
                    calls.append({"id": new_id, "type": "function", "function": {"name": fname, "arguments": args}})
                norm["tool_calls"] = calls
        elif msg.get("tool_calls"):
            raise ChatTemplateError(f"{where}: only assistant messages may carry tool_calls")

        if role == "tool":
            tcid = msg.get("tool_call_id")
            if not isinstance(tcid, str) or not tcid.strip():
                raise ChatTemplateError(f"{where}: tool message without tool_call_id")
            norm["tool_call_id"] = id_map.get(tcid, tcid)
        out.append(norm)
    return out


def count_tool_calls(messages: Iterable[Mapping]) -> int:
    """Number of tool calls in a conversation (the IDX the next call should get)."""
    return sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")


def _validate_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError("tools must be a list of tool objects")
    out = []
    for i, tool in enumerate(tools):
        tool = _plain(tool)
        if not isinstance(tool, dict):
            raise ChatTemplateError(f"tools[{i}]: expected an object")
        if tool.get("type", "function") == "function":
            fn = tool.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn.get("name"):
                raise ChatTemplateError(f"tools[{i}].function.name: missing or not a string")
        out.append(tool)
    return out or None


# ----------------------------------------------------------------------------------- jinja


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    if isinstance(separators, list):
        separators = tuple(separators)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _escape_specials(obj: Any, pattern: "re.Pattern[str]") -> Any:
    """Make every special-token spelling inside client strings unmatchable (reversibly)."""
    if isinstance(obj, str):
        s = obj.replace(_ESC, _ESC_LITERAL) if _ESC in obj else obj
        while True:
            new = pattern.sub(lambda m: m.group()[0] + _ESC_BREAK + m.group()[1:], s)
            if new == s:
                return s
            s = new
    if isinstance(obj, dict):
        return {_escape_specials(k, pattern): _escape_specials(v, pattern) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_escape_specials(v, pattern) for v in obj]
    return obj


def _unescape(text: str) -> str:
    if _ESC not in text:
        return text
    return _UNESCAPE_RE.sub(lambda m: _ESC if m.group() == _ESC_LITERAL else "", text)


class ChatTemplate:
    """A model's chat template, rendered the way transformers renders it."""

    def __init__(
        self,
        template: str,
        tokenizer: KimiTokenizer | None = None,
        special_tokens_map: Mapping[str, str] | None = None,
    ) -> None:
        self.source = template
        self.tokenizer = tokenizer
        try:
            self._template = make_jinja_env().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        ctx: dict[str, str] = {}
        if special_tokens_map:
            ctx.update({k: v for k, v in special_tokens_map.items() if isinstance(v, str)})
        elif tokenizer is not None:
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                val = getattr(tokenizer, key, None)
                if val:
                    ctx[key] = val
        self._context = ctx

    @property
    def thinks(self) -> bool:
        """The template renders think blocks: the model writes reasoning before ``</think>`` (K2-Thinking, not
        K2-Instruct)."""
        return any(m in self.source for m in THINK_MARKERS)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, tokenizer: KimiTokenizer | None = None) -> "ChatTemplate":
        """Load ``chat_template.jinja`` (or ``tokenizer_config.json``'s ``chat_template``) + the tokenizer."""
        model_dir = os.fspath(model_dir)
        if tokenizer is None and os.path.exists(os.path.join(model_dir, "tiktoken.model")):
            tokenizer = KimiTokenizer.from_dir(model_dir)
        path = os.path.join(model_dir, "chat_template.jinja")
        template = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                template = fh.read()
        else:
            cfg_path = os.path.join(model_dir, "tokenizer_config.json")
            if os.path.exists(cfg_path):
                with open(cfg_path, encoding="utf-8") as fh:
                    tpl = json.load(fh).get("chat_template")
                if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
                    named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
                    tpl = named.get("default") or next(iter(named.values()), None)
                template = tpl if isinstance(tpl, str) else None
        if template is None:
            raise FileNotFoundError(f"no chat template in {model_dir} (chat_template.jinja or tokenizer_config.json)")
        return cls(template, tokenizer)

    # ------------------------------------------------------------------ rendering
    def _prepare(self, messages: Any, tools: Any, template_kwargs: dict) -> tuple[list[dict], list | None, dict]:
        msgs = normalize_messages(messages)
        tools = _validate_tools(tools)
        kwargs = {k: _plain(v) for k, v in template_kwargs.items()}
        # Kimi's templates read ``thinking``; vLLM/SGLang clients send ``enable_thinking`` (Qwen's name): both count,
        # ``thinking`` wins when both are given.
        switch = kwargs.pop("enable_thinking", None)
        if kwargs.get("thinking") is None and switch is not None:
            kwargs["thinking"] = switch
        if kwargs.get("thinking") is not None:
            kwargs["thinking"] = thinking_enabled(kwargs["thinking"])
        return msgs, tools, kwargs

    def _render(self, msgs: list[dict], tools: list | None, add_generation_prompt: bool, kwargs: dict) -> str:
        ctx = dict(self._context)
        ctx.update(kwargs)
        try:
            return self._template.render(
                messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt, **ctx
            )
        except jinja2.TemplateError as exc:
            images = collect_images(msgs)
            if images:  # a text-only template refusing image parts: name the part
                raise ChatTemplateError(f"{images[0].where}: image input is not supported by this model (its chat "
                                        f"template does not take image parts: {exc})") from exc
            raise ChatTemplateError(f"chat template error: {exc}") from exc

    def render(
        self, messages: Any, tools: Any = None, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The prompt text (special-token markers spelled out)."""
        msgs, tools, kwargs = self._prepare(messages, tools, template_kwargs)
        return self._render(msgs, tools, add_generation_prompt, kwargs)

    def apply(
        self, messages: Any, tools: Any = None, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> ChatPrompt:
        """Render and encode in one go, with what the output parser needs to know."""
        if self.tokenizer is None:
            raise RuntimeError("ChatTemplate has no tokenizer: load it with from_dir() or pass tokenizer=")
        msgs, tools, kwargs = self._prepare(messages, tools, template_kwargs)
        text = self._render(msgs, tools, add_generation_prompt, kwargs)
        pattern = self.tokenizer.special_token_pattern
        safe = self._render(
            _escape_specials(msgs, pattern),
            _escape_specials(tools, pattern),
            add_generation_prompt,
            _escape_specials(kwargs, pattern),
        )
        ids: list[int] = []
        for piece, is_special in self.tokenizer.split_special(safe):
            if is_special:
                ids.append(self.tokenizer.special_tokens[piece])
            else:
                ids.extend(self.tokenizer.encode(_unescape(piece)))
        return ChatPrompt(
            text=text,
            token_ids=ids,
            thinking=thinking_enabled(kwargs.get("thinking")),
            tool_call_offset=count_tool_calls(msgs),
            messages=msgs,
            images=collect_images(msgs),
        )

    def encode(
        self, messages: Any, tools: Any = None, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Prompt token ids: only the template's own markers become special tokens."""
        return self.apply(messages, tools, add_generation_prompt, **template_kwargs).token_ids
