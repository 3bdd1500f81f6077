"""The OpenAI API as pydantic models: requests (validated strictly: a string where a number belongs is a 400, not a
silent conversion), responses, stream chunks and the error body.

Unknown request fields are accepted and ignored, as OpenAI-compatible servers do, so newer clients keep working.
Range checks of sampling parameters live in :class:`k2ray.runtime.sampling.SamplingParams`, whose messages name the
parameter; the models here check types and the API's own rules (``top_logprobs`` needs ``logprobs``, ...).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from k2ray.runtime.sampling import ParamError
from k2ray.tokenizer import kimi_format as K

MAX_TOP_LOGPROBS = 20


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors ------------------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- shared request pieces ---------------------------------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


def check_function_name(name: str) -> str:
    # Kimi writes calls as ``functions.NAME:IDX`` between special tokens: a name with whitespace or a marker could
    # never come back as a call.
    if any(c.isspace() or ord(c) < 0x20 for c in name) or "<|" in name or any(m in name for m in K.THINK_MARKERS):
        raise ValueError(f"function name {name!r} must not contain whitespace, control characters or special tokens")
    return name


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    _name = field_validator("name")(check_function_name)


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str = Field(min_length=1)


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(_Request):
    type: str


class _SamplingFields(_Request):
    """Sampling fields common to chat and completions (OpenAI's, then the usual open-source extras)."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "only allowed when stream is true")
        return self


# -- chat ------------------------------------------------------------------------------------------------------------
class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ParamError("top_logprobs", "requires logprobs to be true")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ParamError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}] (got {self.top_logprobs})")
        return self

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- completions -----------------------------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _checks(self):
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ParamError("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}] (got {self.logprobs})")
        if self.suffix:
            raise ParamError("suffix", "not supported by this model")
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of", "only best_of == n is supported")
        return self


# -- admin --------------------------------------------------------------------------------------------------------------
class ResizeRequest(BaseModel):
    """``POST /v1/k2ray/resize``: the answering model group's pool sizes (omitted: unchanged)."""

    model_config = ConfigDict(extra="forbid")  # an admin typo must not be a silent no-op

    attention_workers: Optional[int] = None
    expert_shards: Optional[int] = None


# -- tokenizer endpoints ---------------------------------------------------------------------------------------------
class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    tools: Optional[list[Tool]] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


# -- responses -------------------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # generated tokens of the reasoning block, its closing </think> included


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None
    completion_tokens_details: Optional[CompletionTokensDetails] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[ToolCall] = []


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[Optional[float]] = []
    tokens: list[str] = []
    top_logprobs: list[Optional[dict[str, float]]] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


# -- stream chunks ---------------------------------------------------------------------------------------------------
class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # {"role"}, {"content"}, {"reasoning_content"} or {"tool_calls": [...]}
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None  # sent only when set


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None  # sent (null until the last chunk) only with stream_options.include_usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None  # sent only when set


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Optional[UsageInfo] = None


def sse(chunk: BaseModel, include_usage: bool) -> str:
    """One server-sent event. ``usage`` appears only when the client asked for it; ``stop_reason`` only when set."""
    body = chunk.model_dump()
    for c in body.get("choices", ()):
        if c.get("stop_reason") is None:
            c.pop("stop_reason", None)
    if not include_usage:
        body.pop("usage", None)
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def sse_error(body: dict) -> str:
    """An error inside a stream (after the 200 status went out): the error body as an event."""
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "k2ray"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
