"""Requests, the sequences they fan out to, and what the engine reports back.

A :class:`Request` is what a user submits: one prompt and one :class:`SamplingParams`. It owns ``n`` :class:`Sequence`
objects (one per completion); the scheduler only ever deals with sequences. Each step the engine reports a
:class:`RequestOutput` per request that made progress (built by :mod:`k2ray.engine.output_processor`), holding the
cumulative completions and, for streaming, what is new since the previous report.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from k2ray.runtime.sampling import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class MMItem:
    """An image in a prompt: its ``length`` placeholder tokens start at prompt position ``offset``; ``embeds``
    ``[length, hidden]`` (from the image encoder) replace their token embeddings."""

    offset: int
    length: int
    content_hash: bytes
    embeds: Optional["torch.Tensor"] = None

    @property
    def end(self) -> int:
        return self.offset + self.length


class PromptTooLongError(ValueError):
    """The prompt cannot be served: longer than the model's context or the KV cache. Only this request fails."""


class EngineDeadError(RuntimeError):
    """The engine stopped (executor failure or shutdown); every pending request fails with this error."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # stop token, stop string or EOS
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    """One completion of a request. ``token_ids``/``text``/``logprobs`` are cumulative; ``delta_*`` hold what is new
    since the previous :class:`RequestOutput` of this request (what a streaming client sends next)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict[int, float]]]  # per generated position: token id -> logprob (chosen one included)
    cumulative_logprob: float
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"; None while running
    stop_reason: Optional[int | str] = None  # the stop string or stop token id that ended it (None for EOS)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: Optional[list[dict[int, float]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None  # None for the first prompt token
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    error: Optional[str] = None


class Sequence:
    """One completion being generated: the unit the scheduler batches and the cache stores."""

    __slots__ = (
        "seq_id", "request", "index", "params", "output_ids", "logprobs", "cumulative_logprob", "num_computed",
        "attention_rank", "block_table", "block_hashes", "num_published", "status", "finish_reason", "stop_reason",
        "detok", "text", "stop_checked", "sent_tokens", "sent_text", "num_preemptions", "sample_request",
        "min_tokens_ban", "holdback", "matcher", "prefill_turn",
    )

    def __init__(self, seq_id: int, request: "Request", index: int, params: SamplingParams):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.params = params  # the request's params, with this child's derived seed when n > 1
        self.output_ids: list[int] = []
        self.logprobs: Optional[list[dict[int, float]]] = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.num_computed = 0  # tokens whose latents are in the cache
        self.attention_rank: Optional[int] = None  # the attention worker whose cache holds it (set on admission)
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain hashes of full blocks, computed lazily
        self.num_published = 0  # leading full blocks already published to the prefix cache
        self.status = SeqStatus.WAITING
        self.finish_reason: Optional[FinishReason] = None
        self.stop_reason: Optional[int | str] = None
        self.detok = None  # incremental detokenizer (when the engine has a tokenizer)
        self.text = ""
        self.stop_checked = 0  # text prefix already searched for stop strings
        self.sent_tokens = 0  # tokens / text already reported (for deltas)
        self.sent_text = 0
        self.num_preemptions = 0
        self.prefill_turn = -1  # the last scheduler step whose prefill work this sequence led (fair rotation)
        self.sample_request = None  # reused SampleRequest (see k2ray.engine.work)
        self.min_tokens_ban: list[int] = []  # stop tokens the sampler bans before min_tokens
        self.matcher = None  # grammar state when the output is constrained (k2ray.engine.structured)
        # Characters of text withheld from reports while running: a stop string could still complete over them.
        self.holdback = max((len(x) for x in params.stop), default=1) - 1

    def visible_text(self) -> str:
        if self.holdback and self.status is not SeqStatus.FINISHED:
            return self.text[: max(self.sent_text, len(self.text) - self.holdback)]
        return self.text

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)

    def token_at(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output."""
        p = self.request.prompt_token_ids
        n = len(p)
        if end <= n:
            return p[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return p[start:] + self.output_ids[: end - n]

    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, computed={self.num_computed}/"
                f"{self.num_tokens}, status={self.status.value})")


class Request:
    """A submitted prompt with its sampling parameters; fans out to ``params.n`` sequences."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: Optional[str] = None,
        arrival_time: Optional[float] = None,
        arrival_index: int = 0,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_index = arrival_index  # FCFS order (ties in arrival_time broken by submission order)
        self.seqs: list[Sequence] = []
        self.mm_items: list[MMItem] = []  # images, in prompt order (see MMItem)
        self.prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.num_cached_tokens: Optional[int] = None
        self.error: Optional[str] = None
        self.first_token_time: Optional[float] = None
        self.first_scheduled_time: Optional[float] = None  # when the scheduler first ran it (queue time ends)
        self.finish_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def block_extra(self) -> Optional[Callable[[int, int], bytes]]:
        """For prefix-cache hashing (None for text): positions ``[lo, hi)`` of a block -> the content hashes (and
        where they start) of the images whose placeholder tokens it holds, so that two prompts with the same tokens
        and different images never share a block."""
        if not self.mm_items:
            return None
        items = self.mm_items

        def extra(lo: int, hi: int) -> bytes:
            return b"".join(it.content_hash + it.offset.to_bytes(8, "little") for it in items
                            if it.offset < hi and it.end > lo)
        return extra

    def embeds_for(self, start: int, end: int) -> list[tuple[int, "torch.Tensor"]]:
        """Image embeddings for prompt positions ``[start, end)``: (index from ``start``, rows)."""
        out = []
        for it in self.mm_items:
            lo, hi = max(start, it.offset), min(end, it.end)
            if lo < hi:
                out.append((lo - start, it.embeds[lo - it.offset : hi - it.offset]))
        return out
