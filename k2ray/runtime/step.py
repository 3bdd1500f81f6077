"""The contract between the engine (scheduler, block tables) and whatever runs the model.

Per step the engine hands the executor a :class:`StepInput`; the executor runs the model on every sequence's new
tokens (writing their latents into the paged cache of the attention worker that holds the sequence) and samples one
token for each sequence that asked for it. The local executor runs it in-process; the Ray executor splits it by
``attention_rank`` over the attention workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol

from k2ray.config import ModelArgs
from k2ray.runtime.sampling import Sample, SampleRequest

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class SeqWork:
    seq_id: int
    token_ids: list[int]  # new tokens to run this step
    start_pos: int  # position of token_ids[0]; tokens before it are already in the cache
    block_table: list[int]  # cache blocks covering positions [0, start_pos + len(token_ids))
    attention_rank: int = 0  # the attention worker whose cache holds this sequence
    sample: Optional[SampleRequest] = None  # set when a token is to be sampled after the last new token
    prompt_logprobs: Optional[int] = None  # also return logprobs of the prompt tokens of this chunk
    next_prompt_token: Optional[int] = None  # token after this chunk when the prompt continues (for prompt_logprobs)
    # Image embeddings that replace the token embeddings of some of token_ids: (index into token_ids, rows
    # [n, hidden]) — the rows of token_ids[index : index + n]. Empty for text.
    embeds: list[tuple[int, "torch.Tensor"]] = field(default_factory=list)


@dataclass
class StepInput:
    seqs: list[SeqWork]


@dataclass
class SeqResult:
    seq_id: int
    sample: Optional[Sample] = None
    # For each prompt token after the first in this chunk: (logprob, top alternatives).
    prompt_logprobs: Optional[list[tuple[float, list[tuple[int, float]]]]] = None


@dataclass(frozen=True)
class PendingLayout:
    """A pool resize the executor is preparing (see ``LLMEngine.follow_layout``)."""

    attention_workers: int  # after the switch
    expert_shards: int
    ready: bool  # the added workers are loaded and the kept shards staged: the switch can happen
    drain_deadline: float  # monotonic time after which sequences on removed attention workers move by recompute


@dataclass
class StepOutput:
    results: dict[int, SeqResult] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # executor-specific timings/counters for metrics


class Executor(Protocol):
    args: ModelArgs
    num_attention_workers: int  # each owns its own cache blocks
    num_kv_blocks: int  # per attention worker
    block_size: int

    failed: Optional[str]  # why the executor can no longer run steps (a worker died, a collective stalled)

    def execute(self, step: StepInput) -> StepOutput: ...

    def describe(self) -> dict: ...  # where its workers run, for the layout endpoint

    def rebuild(self) -> None: ...  # start again after a failure: new workers, weights reloaded

    def heartbeat(self, timeout_s: float) -> Optional[str]: ...  # between steps: why the group broke, else None

    def shutdown(self) -> None: ...
