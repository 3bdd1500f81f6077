"""The Anthropic Messages API as pydantic models: the request (validated strictly, as the OpenAI models are: a string
where a number belongs is a 400, not a silent conversion), the response message, the stream events and the error body.

Unknown fields are accepted and ignored, so newer clients keep working. Content blocks are read by their ``type``;
a block type this server does not take (images, documents, server-tool results, ...) still validates here, as an
:class:`UnsupportedBlockParam`, so the translation can refuse it with a message naming the block
(:mod:`k2ray.serve.anthropic.translate`). What the server does with each field: docs/api.md, "Anthropic Messages API".
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from k2ray.runtime.sampling import ParamError
from k2ray.serve.openai.protocol import check_function_name


def random_id(prefix: str) -> str:
    """Anthropic-style ids: ``msg_...`` for messages, ``toolu_...`` for tool uses."""
    return f"{prefix}_{uuid.uuid4().hex}"


class _Param(BaseModel):
    model_config = ConfigDict(extra="allow")


def _by_type(tags: tuple[str, ...], other: Optional[str] = None):
    """A discriminator on ``type`` whose tags are ``'<type> block'`` (tags with a space stay out of error locations);
    a type not in ``tags`` goes to ``other`` when given."""

    def pick(v: Any) -> Optional[str]:
        t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
        if t in tags:
            return f"{t} block"
        return other

    return Discriminator(pick)


def _str_or_list(v: Any) -> str:
    return "str" if isinstance(v, str) else "list"


# -- content blocks of the request -------------------------------------------------------------------------------------
class TextBlockParam(_Param):
    type: Literal["text"]
    text: str


class ImageBlockParam(_Param):
    type: Literal["image"]
    source: Optional[dict[str, Any]] = None


class UnsupportedBlockParam(_Param):
    """A block of a type this server does not take (``document``, ``search_result``, ``server_tool_use``, ...):
    refused by the translation, naming it."""

    type: str


class ToolUseBlockParam(_Param):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]


_RESULT_TYPES = ("text", "image")
ToolResultContentParam = Annotated[
    Union[Annotated[TextBlockParam, Tag("text block")], Annotated[ImageBlockParam, Tag("image block")],
          Annotated[UnsupportedBlockParam, Tag("unsupported block")]],
    _by_type(_RESULT_TYPES, "unsupported block"),
]


class ToolResultBlockParam(_Param):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: Optional[Annotated[Union[Annotated[str, Tag("str")], Annotated[list[ToolResultContentParam], Tag("list")]],
                                Discriminator(_str_or_list)]] = None
    is_error: bool = False


class ThinkingBlockParam(_Param):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None  # any signature is accepted (nothing is verified)


class RedactedThinkingBlockParam(_Param):
    type: Literal["redacted_thinking"]
    data: str


_BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")
BlockParam = Annotated[
    Union[Annotated[TextBlockParam, Tag("text block")], Annotated[ImageBlockParam, Tag("image block")],
          Annotated[ToolUseBlockParam, Tag("tool_use block")],
          Annotated[ToolResultBlockParam, Tag("tool_result block")],
          Annotated[ThinkingBlockParam, Tag("thinking block")],
          Annotated[RedactedThinkingBlockParam, Tag("redacted_thinking block")],
          Annotated[UnsupportedBlockParam, Tag("unsupported block")]],
    _by_type(_BLOCK_TYPES, "unsupported block"),
]


class MessageParam(_Param):
    role: Literal["user", "assistant"]
    content: Annotated[Union[Annotated[str, Tag("str")], Annotated[list[BlockParam], Tag("list")]],
                       Discriminator(_str_or_list)]


# -- tools, tool choice, thinking --------------------------------------------------------------------------------------
class ToolParam(_Param):
    """A client tool (``type`` absent or ``custom``). Anthropic's server tools (``web_search_...``, ``bash_...``) do
    not exist here: a 400 naming the tool."""

    type: Optional[str] = None
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    input_schema: dict[str, Any]
    strict: Optional[bool] = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, v):
        if isinstance(v, dict) and v.get("type") not in (None, "custom"):
            raise ValueError(f"tool type {v.get('type')!r} is not supported (only custom tools with an input_schema)")
        return v

    _name = field_validator("name")(check_function_name)


class ToolChoiceAuto(_Param):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Param):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Param):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Param):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone],
                       Field(discriminator="type")]


class ThinkingEnabled(_Param):
    type: Literal["enabled"]
    budget_tokens: int  # accepted, not enforced: K2 has no reasoning budget; max_tokens bounds reasoning + answer

    @field_validator("budget_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v


class ThinkingDisabled(_Param):
    type: Literal["disabled"]


class ThinkingAdaptive(_Param):
    type: Literal["adaptive"]


ThinkingConfig = Annotated[Union[ThinkingEnabled, ThinkingDisabled, ThinkingAdaptive], Field(discriminator="type")]


class OutputFormat(_Param):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Param):
    format: Optional[OutputFormat] = None  # the answer as JSON of this schema (``effort`` is ignored)


# -- requests ----------------------------------------------------------------------------------------------------------
class CountTokensRequest(_Param):
    """``POST /v1/messages/count_tokens``: what a conversation's prompt is made of (no sampling fields)."""

    model: str
    messages: list[MessageParam]
    system: Optional[Annotated[Union[Annotated[str, Tag("str")], Annotated[list[TextBlockParam], Tag("list")]],
                               Discriminator(_str_or_list)]] = None
    tools: Optional[list[ToolParam]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[ThinkingConfig] = None
    output_config: Optional[OutputConfig] = None

    @model_validator(mode="after")
    def _conversation(self):
        if not self.messages:
            raise ParamError("messages", "at least one message is required")
        return self


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: int
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    metadata: Optional[dict[str, Any]] = None  # accepted, ignored

    @model_validator(mode="after")
    def _budget(self):
        if self.max_tokens < 1:
            raise ParamError("max_tokens", f"must be at least 1 (got {self.max_tokens})")
        return self


# -- the response ------------------------------------------------------------------------------------------------------
class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Union[TextBlock, ThinkingBlock, ToolUseBlock]


class Usage(BaseModel):
    input_tokens: int = 0  # prompt tokens not read from the prefix cache
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0  # prompt tokens served from the prefix cache


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock] = []
    stop_reason: Optional[Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]] = None
    stop_sequence: Optional[str] = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


# -- stream events -----------------------------------------------------------------------------------------------------
class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDelta(BaseModel):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Union[TextDelta, ThinkingDelta, SignatureDelta, InputJsonDelta]


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: Optional[str] = None
    stop_sequence: Optional[str] = None


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: Usage  # cumulative: the final counts


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


StreamEvent = Union[MessageStartEvent, PingEvent, ContentBlockStartEvent, ContentBlockDeltaEvent,
                    ContentBlockStopEvent, MessageDeltaEvent, MessageStopEvent]


def sse(event_type: str, data: dict) -> str:
    """One server-sent event as Anthropic writes them: ``event: <type>`` then the JSON data."""
    return f"event: {event_type}\ndata: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def sse_event(event: BaseModel) -> str:
    return sse(event.type, event.model_dump())
