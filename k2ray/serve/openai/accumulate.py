"""Response accumulators: the router's :class:`~k2ray.serve.wire.GenerateChunk` s in, the API's answer out.

Each accumulator turns every engine chunk into the stream's chunks (``add``) and keeps the state those chunks were
made from; the final object (``response``) is built from that same state, so a streamed and a non-streamed request
agree by construction (content, reasoning, tool calls, logprobs, finish reasons, usage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.chat import ChatPlan
from k2ray.serve.openai.completions import CompletionPlan
from k2ray.serve.openai.errors import APIError
from k2ray.serve.wire import GenerateChunk, SequenceDelta
from k2ray.tokenizer.kimi_format import THINK_END
from k2ray.tokenizer.parsers import StreamingOutputParser, openai_finish_reason


@dataclass
class _Choice:
    index: int
    num_tokens: int = 0
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class _ChatChoice(_Choice):
    parser: Optional[StreamingOutputParser] = None
    logprobs: list[P.TokenLogprob] = field(default_factory=list)
    reasoning_tokens: int = 0
    reasoning_open: bool = False  # still inside the reasoning block (counted by token id, not by text)


@dataclass
class _CompletionChoice(_Choice):
    text: list[str] = field(default_factory=list)
    logprobs: P.CompletionLogprobs = field(default_factory=P.CompletionLogprobs)
    offset: int = 0  # text offset of the next logprob entry
    echoed: bool = False


class _Accumulator:
    def __init__(self, request_id: str, model: str, created: int, tokenizer):
        self.id, self.model, self.created, self.tokenizer = request_id, model, created, tokenizer
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0

    # -- OpenAI's SSE: ``data: {chunk}`` events, an error event in the same shape as a 4xx/5xx body, ``[DONE]`` ------
    def encode(self, chunk, include_usage: bool) -> str:
        return P.sse(chunk, include_usage)

    def close(self, include_usage: bool, error: Optional[APIError] = None) -> list[str]:
        if error is not None:
            return [P.sse_error(error.body()), P.SSE_DONE]
        return ([P.sse(self.usage_chunk(), True)] if include_usage else []) + [P.SSE_DONE]

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _usage(self, choices: list[_Choice]) -> P.UsageInfo:
        n_out = sum(ch.num_tokens for ch in choices)
        return P.UsageInfo(prompt_tokens=self.num_prompt_tokens, completion_tokens=n_out,
                           total_tokens=self.num_prompt_tokens + n_out,
                           prompt_tokens_details=P.PromptTokensDetails(cached_tokens=self.num_cached_tokens))


class ChatAccumulator(_Accumulator):
    def __init__(self, plan: ChatPlan, n: int, request_id: str, model: str, created: int, tokenizer):
        super().__init__(request_id, model, created, tokenizer)
        self.plan = plan
        self.num_prompt_tokens = plan.num_prompt_tokens
        self.choices = [
            _ChatChoice(i, parser=StreamingOutputParser(thinking=plan.thinking, tools=plan.parse_tools,
                                                        tool_call_offset=plan.tool_call_offset,
                                                        hidden_tokens=plan.hidden_tokens),
                        reasoning_open=plan.thinking)
            for i in range(n)
        ]
        self._think_end = tokenizer.special_tokens.get(THINK_END) if tokenizer is not None else None

    def _chunk(self, index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None):
        return P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            P.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                              stop_reason=stop_reason)])

    def start(self) -> list[P.ChatCompletionChunk]:
        """The stream's first chunks: each choice announces the assistant role."""
        return [self._chunk(ch.index, {"role": "assistant", "content": ""}) for ch in self.choices]

    def _logprob(self, pairs: list) -> P.TokenLogprob:
        tok, lp = pairs[0]
        s = self._token_str(tok)
        top = []
        if self.plan.top_logprobs:
            top = [P.TopLogprob(token=(t := self._token_str(i)), logprob=v, bytes=list(t.encode("utf-8")))
                   for i, v in sorted(pairs, key=lambda p: -p[1])[: self.plan.top_logprobs]]
        return P.TokenLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")), top_logprobs=top)

    def add(self, prompt_index: int, chunk: GenerateChunk) -> list[P.ChatCompletionChunk]:
        """The stream chunks of one engine chunk (a chat request has one prompt: ``prompt_index`` 0)."""
        if chunk.num_prompt_tokens is not None:
            self.num_prompt_tokens, self.num_cached_tokens = chunk.num_prompt_tokens, chunk.num_cached_tokens
        out: list[P.ChatCompletionChunk] = []
        for seq in chunk.outputs:
            out += self._add_seq(self.choices[seq.index], seq)
        return out

    def _count_reasoning(self, ch: _ChatChoice, token_ids: list[int]) -> None:
        """Reasoning tokens: those up to and including the ``</think>`` token (all of them while it has not come)."""
        if not ch.reasoning_open:
            return
        if self._think_end in token_ids:
            ch.reasoning_tokens += token_ids.index(self._think_end) + 1
            ch.reasoning_open = False
        else:
            ch.reasoning_tokens += len(token_ids)

    def _add_seq(self, ch: _ChatChoice, seq: SequenceDelta) -> list[P.ChatCompletionChunk]:
        ch.num_tokens += len(seq.token_ids)
        self._count_reasoning(ch, seq.token_ids)
        deltas = ch.parser.feed(seq.text)
        if seq.finish_reason is not None:
            deltas += ch.parser.finish()
            ch.finish_reason = openai_finish_reason(seq.finish_reason, bool(ch.parser.result.tool_calls))
            ch.stop_reason = seq.stop_reason
        lps = []
        if self.plan.top_logprobs is not None and seq.logprobs:
            lps = [self._logprob(pairs) for pairs in seq.logprobs]
            ch.logprobs.extend(lps)
        chunks = []
        lp_obj = P.ChoiceLogprobs(content=lps) if lps else None
        for d in deltas:  # the token logprobs ride on the first delta they produced
            chunks.append(self._chunk(ch.index, d, lp_obj))
            lp_obj = None
        if lp_obj is not None:  # tokens whose text is still held back
            chunks.append(self._chunk(ch.index, {}, lp_obj))
        if ch.finish_reason is not None:
            chunks.append(self._chunk(ch.index, {}, None, ch.finish_reason, ch.stop_reason))
        return chunks

    @property
    def finish_reason(self) -> Optional[str]:
        return self.choices[0].finish_reason

    def usage(self) -> P.UsageInfo:
        u = self._usage(self.choices)
        u.completion_tokens_details = P.CompletionTokensDetails(
            reasoning_tokens=sum(ch.reasoning_tokens for ch in self.choices))
        return u

    def usage_chunk(self) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                     usage=self.usage())

    def response(self) -> P.ChatCompletionResponse:
        choices = []
        for ch in self.choices:
            r = ch.parser.result
            calls = [P.ToolCall(id=c["id"], function=P.FunctionCall(**c["function"])) for c in r.tool_calls]
            msg = P.ChatMessage(content=(r.content if (r.content or not calls) else None),
                                reasoning_content=(r.reasoning_content if self.plan.thinking else None),
                                tool_calls=calls)
            lp = P.ChoiceLogprobs(content=ch.logprobs) if self.plan.top_logprobs is not None else None
            choices.append(P.ChatCompletionChoice(index=ch.index, message=msg, logprobs=lp,
                                                  finish_reason=ch.finish_reason, stop_reason=ch.stop_reason))
        return P.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                        usage=self.usage())


class CompletionAccumulator(_Accumulator):
    """Completions of one or more prompts; choice ``j * n + i`` is completion ``i`` of prompt ``j``."""

    def __init__(self, plan: CompletionPlan, request_id: str, model: str, created: int, tokenizer):
        super().__init__(request_id, model, created, tokenizer)
        self.plan = plan
        self.choices = [_CompletionChoice(j * plan.n + i) for j in range(len(plan.prompts)) for i in range(plan.n)]
        self.num_prompt_tokens = sum(len(p.token_ids) for p in plan.prompts)

    def start(self) -> list[P.CompletionChunk]:
        return []  # a completion stream opens with text (the echoed prompt or the first tokens)

    def _chunk(self, index: int, text: str, logprobs=None, finish_reason=None, stop_reason=None):
        return P.CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            P.CompletionChunkChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,
                                    stop_reason=stop_reason)])

    def _logprobs(self, ch: _CompletionChoice, entries) -> P.CompletionLogprobs:
        """Append ``(token text, logprob, top, width)`` entries to the choice's logprobs; the new part alone."""
        new = P.CompletionLogprobs()
        for s, lp, top, width in entries:
            for dst in (new, ch.logprobs):
                dst.tokens.append(s)
                dst.token_logprobs.append(lp)
                dst.top_logprobs.append(top)
                dst.text_offset.append(ch.offset)
            ch.offset += width
        return new

    def _prompt_entries(self, ids: list[int], prompt_logprobs: Optional[list]):
        yield self._token_str(ids[0]), None, None, len(self._token_str(ids[0]))
        for j in range(1, len(ids)):
            s = self._token_str(ids[j])  # the echoed prompt shows special tokens as written
            pairs = prompt_logprobs[j] if prompt_logprobs and j < len(prompt_logprobs) else None
            if pairs is None:
                yield s, None, None, len(s)
            else:
                yield s, dict(pairs).get(ids[j]), {self._token_str(t): v for t, v in pairs}, len(s)

    def _generated_entries(self, seq: SequenceDelta):
        hide_special = self.plan.skip_special_tokens
        for t, pairs in zip(seq.token_ids, seq.logprobs or []):
            s = self._token_str(t)
            width = 0 if hide_special and self.tokenizer.is_special(t) else len(s)
            yield s, pairs[0][1], {self._token_str(i): v for i, v in pairs}, width

    def add(self, prompt_index: int, chunk: GenerateChunk) -> list[P.CompletionChunk]:
        plan, n, out = self.plan, self.plan.n, []
        if chunk.num_prompt_tokens is not None:
            self.num_cached_tokens += chunk.num_cached_tokens
        if plan.echo:  # the prompt comes first, once per choice of this prompt
            prompt = plan.prompts[prompt_index]
            for ch in self.choices[prompt_index * n:(prompt_index + 1) * n]:
                if ch.echoed:
                    continue
                ch.echoed = True
                ch.text.append(prompt.text)
                lp = None
                if plan.logprobs is not None:
                    lp = self._logprobs(ch, self._prompt_entries(prompt.token_ids, chunk.prompt_logprobs))
                out.append(self._chunk(ch.index, prompt.text, lp))
        for seq in chunk.outputs:
            ch = self.choices[prompt_index * n + seq.index]
            ch.num_tokens += len(seq.token_ids)
            ch.text.append(seq.text)
            lp = None
            if plan.logprobs is not None and seq.logprobs:
                lp = self._logprobs(ch, self._generated_entries(seq))
            if seq.text or lp is not None:
                out.append(self._chunk(ch.index, seq.text, lp))
            if seq.finish_reason is not None:
                ch.finish_reason, ch.stop_reason = seq.finish_reason, seq.stop_reason
                out.append(self._chunk(ch.index, "", None, ch.finish_reason, ch.stop_reason))
        return out

    @property
    def finish_reason(self) -> Optional[str]:
        return self.choices[0].finish_reason

    def usage(self) -> P.UsageInfo:
        return self._usage(self.choices)

    def usage_chunk(self) -> P.CompletionChunk:
        return P.CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())

    def response(self) -> P.CompletionResponse:
        choices = [P.CompletionChoice(index=ch.index, text="".join(ch.text),
                                      logprobs=ch.logprobs if self.plan.logprobs is not None else None,
                                      finish_reason=ch.finish_reason, stop_reason=ch.stop_reason)
                   for ch in self.choices]
        return P.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                    usage=self.usage())
