"""The chat planner: an OpenAI chat request -> the prompt's token ids, the sampling parameters and how to read the
output back. Pure (no I/O, no Ray): the template rendering, the context-length policy and the tool-choice /
structured-output policy live here.

Tool choice: ``none`` hides the tools from the template and parses no calls; ``auto`` lets the model decide;
``required``, a named function and ``auto`` with a ``strict`` tool get a grammar (xgrammar, in the engine) over the
declared functions and their argument schemas. ``response_format`` json_object / json_schema constrains what follows
the reasoning block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from k2ray.runtime.guided import GuidedDecoding
from k2ray.runtime.sampling import SamplingParams
from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.errors import bad_request
from k2ray.serve.openai.images import ImageLimits, load_images
from k2ray.serve.openai.limits import Limits

BIG_TEXT = 32 * 1024  # message text beyond this is checked against the context length before rendering


@dataclass(frozen=True)
class ChatOptions:
    """The server's chat settings (``ServeArgs``)."""

    enable_auto_tool_choice: bool = True
    enable_reasoning: bool = True
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    image_limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass(frozen=True)
class ChatPlan:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    thinking: bool  # the output opens with a reasoning block, returned as reasoning_content
    parse_tools: bool  # tool-call markup in the output becomes tool_calls
    tool_call_offset: int  # index of the first call id (calls already in the conversation)
    top_logprobs: Optional[int]  # None: no logprobs
    hidden_tokens: tuple[str, ...]  # special tokens kept out of the returned text
    images: tuple = ()  # ProcessedImage per <|media_pad|> of prompt_token_ids (expanded by the router)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens the model runs: each image's placeholder counts as its image's tokens."""
        return len(self.prompt_token_ids) + sum(im.num_tokens - 1 for im in self.images)


def _text_of(content: Any) -> str:
    """The text of a message's content (image parts left out: a data: URL is not prompt text)."""
    if isinstance(content, list):
        return "".join(_text_of(p) for p in content
                       if not (isinstance(p, dict) and p.get("type") in ("image_url", "image")))
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def is_big(messages: list) -> bool:
    return sum(len(_text_of(m.get("content"))) for m in messages if isinstance(m, dict)) > BIG_TEXT


def _thinking_switch(kwargs: dict) -> dict:
    """``enable_thinking`` (the name vLLM/SGLang clients send) as Kimi's ``thinking``, so a request's switch overrides
    the server's default whichever name either uses."""
    if "enable_thinking" not in kwargs:
        return kwargs
    out = dict(kwargs)
    switch = out.pop("enable_thinking")
    if out.get("thinking") is None:
        out["thinking"] = switch
    return out


def render_chat(template, messages: list, tools: Optional[list[dict]], add_generation_prompt: bool,
                template_kwargs: Optional[dict], options: ChatOptions, limits: Limits):
    """The conversation through the model's chat template (a ``ChatPrompt``: token ids, thinking, call offset)."""
    from k2ray.tokenizer import ChatTemplateError

    if template is None:
        raise bad_request("messages: this model has no chat template; use /v1/completions", "messages")
    kwargs = {**_thinking_switch(options.default_chat_template_kwargs), **_thinking_switch(template_kwargs or {})}
    for reserved in ("messages", "tools", "add_generation_prompt"):
        kwargs.pop(reserved, None)
    if is_big(messages):
        limits.check_prompt_text("".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict)),
                                 "messages")
    try:
        return template.apply(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    except ChatTemplateError as e:
        msg = str(e)
        head = msg.split(":", 1)[0]
        param = head if head.startswith(("messages[", "tools[")) and " " not in head else (
            "messages" if msg.startswith("messages") else ("tools" if msg.startswith("tools") else None))
        raise bad_request(msg, param) from None


def _tool_choice(req: P.ChatCompletionRequest, tools: Optional[list[dict]], options: ChatOptions):
    """``(choice, named function or None)``, checked against the declared tools."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    names = [t["function"]["name"] for t in tools or []]
    if isinstance(choice, P.NamedToolChoice):
        named = choice.function.name
        if named not in names:
            raise bad_request(f"tool_choice: function {named!r} is not among the declared tools {names}",
                              "tool_choice")
        return choice, named
    if choice == "required" and not tools:
        raise bad_request("tool_choice: 'required' needs at least one tool in tools", "tool_choice")
    if choice == "auto" and tools and not options.enable_auto_tool_choice:
        raise bad_request("tool_choice: 'auto' is disabled on this server (enable_auto_tool_choice: false)",
                          "tool_choice")
    return choice, None


def _response_schema(rf: P.ResponseFormat) -> dict:
    schema = getattr(rf, "json_schema", None) or {}
    schema = schema.get("schema") if isinstance(schema, dict) else None
    if not isinstance(schema, dict):
        raise bad_request("response_format.json_schema.schema: expected a JSON schema object",
                          "response_format.json_schema.schema")
    return schema


def plan_chat(req: P.ChatCompletionRequest, template, tokenizer, limits: Limits, options: ChatOptions,
              thinking_template: bool, image_config=None) -> ChatPlan:
    """``thinking_template``: the model's template knows ``<think>`` (K2-Thinking; not K2-Instruct).
    ``image_config``: the model's ``ImageProcessorConfig`` when it takes images (image parts are refused without)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice, named = _tool_choice(req, tools, options)
    limits.check_fits(req.n, "n")
    rf = req.response_format
    if rf is not None and rf.type not in ("text", "json_object", "json_schema"):
        raise bad_request(f"response_format: type {rf.type!r} is not supported", "response_format")

    prompt = render_chat(template, req.messages, None if choice == "none" else tools, req.add_generation_prompt,
                         req.chat_template_kwargs, options, limits)
    thinking = options.enable_reasoning and thinking_template and prompt.thinking
    offset = prompt.tool_call_offset
    guided = None
    strict = any(t["function"].get("strict") for t in tools or [])
    if tools and (named is not None or choice == "required" or (choice == "auto" and strict)):
        # The engine constrains the tool-call section to the declared functions and their argument schemas.
        guided = GuidedDecoding(tools=tools, tool_choice={"name": named} if named is not None else choice,
                                thinking=thinking, parallel_tool_calls=req.parallel_tool_calls is not False,
                                call_index=offset)
    elif rf is not None and rf.type == "json_object":
        guided = GuidedDecoding(json_object=True, thinking=thinking)
    elif rf is not None and rf.type == "json_schema":
        # A thinking model reasons first (reasoning_content); the constraint applies to what follows </think>.
        guided = GuidedDecoding(json_schema=_response_schema(rf), thinking=thinking)
    ids = list(prompt.token_ids)
    images = tuple(load_images(getattr(prompt, "images", []), image_config, options.image_limits))
    n_prompt = len(ids) + sum(im.num_tokens - 1 for im in images)
    max_tokens = limits.max_tokens(req.requested_max_tokens, n_prompt, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    sampling = SamplingParams.from_openai(req, max_tokens=max_tokens, logprobs=k, skip_special_tokens=False,
                                          guided_decoding=guided)
    sampling.check_vocab(tokenizer.vocab_size)
    return ChatPlan(
        prompt_token_ids=ids, sampling=sampling, thinking=thinking, parse_tools=choice != "none",
        tool_call_offset=offset, top_logprobs=k,
        hidden_tokens=tuple(tokenizer.special_tokens) if req.skip_special_tokens else (),
        images=images,
    )
