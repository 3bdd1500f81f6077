"""Sampling parameters and the sampler: a pure function from logits to tokens, run where the logits are.

Every row is processed on its own, so a request's result never depends on what else is in the batch. Seeded requests
draw their randomness from ``(seed, output index)`` only — reproducible across batch compositions, executors and
preemptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

_MAX_LOGPROBS = 20


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = 1
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None  # top-k alternatives per generated token (the chosen token is always included)
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _ranges(self) -> "SamplingParams":
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must not be negative"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must not exceed max_tokens"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1 (disabled) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 2.0, "must be in (0, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= _MAX_LOGPROBS, f"must be in [0, {_MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= _MAX_LOGPROBS,
             f"must be in [0, {_MAX_LOGPROBS}]"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be non-negative token ids"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"{name}: {msg} (got {getattr(self, name)!r})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_history(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


@dataclass
class SampleRequest:
    """What the sampler needs about one row."""

    params: SamplingParams
    output_index: int = 0  # tokens generated so far (selects the seeded random stream)
    prompt_ids: list[int] = field(default_factory=list)  # only filled when penalties need them
    output_ids: list[int] = field(default_factory=list)
    banned_ids: list[int] = field(default_factory=list)  # e.g. EOS before min_tokens
    allowed_mask: Optional[torch.Tensor] = None  # bool [vocab]: grammar-constrained decoding


@dataclass
class Sample:
    token_id: int
    logprob: float
    top_logprobs: Optional[list[tuple[int, float]]] = None


def _seeded_generator(seed: int, output_index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + output_index * 7919 + 0x5EED) % (2**63 - 1))
    return g


def apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_ids) | set(req.output_ids)), dtype=torch.long, device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_ids:
        counts = torch.bincount(torch.tensor(req.output_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> list[Sample]:
    """Sample one token per row of ``logits [rows, vocab]``."""
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for i, req in enumerate(requests):
        p = req.params
        row = logits[i].clone()
        if p.needs_history:
            row = apply_penalties(row, req)
        if req.banned_ids:
            row[torch.tensor(req.banned_ids, dtype=torch.long, device=row.device)] = float("-inf")
        if req.allowed_mask is not None:
            row = row.masked_fill(~req.allowed_mask.to(row.device), float("-inf"))
        if p.greedy:
            token = int(torch.argmax(row))
        else:
            row = row / p.temperature
            if p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, idx = probs.sort(descending=True)
                cum = sorted_probs.cumsum(0)
                drop = (cum - sorted_probs) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
                probs = probs.scatter(0, idx, sorted_probs.masked_fill(drop, 0.0))
            if p.min_p > 0.0:
                probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            gen = _seeded_generator(p.seed, req.output_index, row.device) if p.seed is not None else None
            # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p exactly.
            noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
            token = int(torch.argmax(probs / noise))
        top = None
        if p.logprobs:
            vals, ids = torch.topk(raw_logprobs[i], p.logprobs)
            top = list(zip(ids.tolist(), vals.tolist()))
        out.append(Sample(token_id=token, logprob=float(raw_logprobs[i, token]), top_logprobs=top))
    return out
