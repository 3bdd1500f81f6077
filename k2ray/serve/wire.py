"""The contract between the ingress and a model group's router (``K2Router.generate``): typed messages that cross the
Ray boundary, in the spirit of vLLM's ``EngineCoreRequest`` / ``EngineCoreOutputs``.

One request in (:class:`GenerateRequest`: prompt token ids and validated :class:`SamplingParams`); a stream out of
:class:`GenerateChunk` (one per engine step that advanced the request), or a single :class:`GenerateError` when the
request cannot start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from k2ray.runtime.sampling import SamplingParams

# Per generated token: (token id, logprob) pairs, the sampled token first, then the top alternatives.
TokenLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]  # one <|media_pad|> per image: the router expands it to the image's tokens
    sampling: SamplingParams
    images: list = field(default_factory=list)  # ProcessedImage per placeholder, in order (Kimi K2.5)


@dataclass(frozen=True)
class SequenceDelta:
    """What one of the request's ``n`` sequences produced in a step (sent only when it has news or just finished)."""

    index: int
    text: str  # new text (special tokens included when ``skip_special_tokens`` is false)
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprobs]]  # one entry per new token; None when not requested
    finish_reason: Optional[str] = None  # the engine's: stop / length / abort
    stop_reason: Union[int, str, None] = None  # the stop string or token id that ended it


@dataclass(frozen=True)
class GenerateChunk:
    outputs: list[SequenceDelta]
    finished: bool
    # Set on the first chunk of a request only:
    num_prompt_tokens: Optional[int] = None
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None  # per prompt token (the first is None)
    model_group: Optional[str] = None  # which model group (router replica) serves the request

    @property
    def num_new_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass(frozen=True)
class GenerateError:
    """Why a request did not start (or stopped): answered to the client in the API's error shape."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: Optional[str] = None
    param: Optional[str] = None
    retry_elsewhere: bool = field(default=False)  # this group is not ready; another group may take the request
