"""Sampling parameters and the sampler: a pure function from logits to tokens, run where the logits are.

A request's result never depends on what else is in the batch: batched operations are row-wise, and seeded requests
draw their randomness from ``(seed, output index)`` only — reproducible across batch compositions, executors and
preemptions. For ``n > 1`` completion ``i`` uses :func:`derive_seed` ``(seed, i)``.

Order of operations on a row: repetition penalty (prompt and output tokens), frequency and presence penalties (output
tokens), ``logit_bias`` (added to the logits, OpenAI's semantics), banned tokens (e.g. stop tokens before
``min_tokens``) and the allowed mask, then — unless greedy — temperature, top-k, softmax, top-p (smallest prefix of
the sorted distribution whose mass reaches ``top_p``), min-p (drop tokens below ``min_p`` times the top probability),
and a draw from what is left. Reported logprobs are those of the model's raw distribution (``log_softmax`` of the
logits before any of the above).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from k2ray.runtime.guided import GuidedDecoding

_MAX_LOGPROBS = 20
# Stop strings are matched against each step's new text (plus a tail of the longest one): these bounds keep that
# work per token small whatever a client sends.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
_GREEDY_EPS = 1e-5  # temperatures below this sample greedily (dividing by them would overflow)


class ParamError(ValueError):
    """An invalid request parameter, named: the API answers it as a 400 whose ``param`` is :attr:`param`."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


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
    guided_decoding: Optional[GuidedDecoding] = None  # grammar-constrained output (tool calls, JSON schema, regex, ...)
    logit_bias: dict[int, float] = {}  # token id -> added to its logit before sampling ([-100, 100] as OpenAI)

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
            ("logit_bias", all(t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()),
             "token ids must be non-negative and biases in [-100, 100]"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ParamError(name, f"{msg} (got {getattr(self, name)!r})")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParamError("stop", f"at most {MAX_STOP_STRINGS} stop strings (got {len(self.stop)})")
        longest = max((len(x) for x in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ParamError("stop", f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters "
                                     f"(got one of {longest})")
        return self

    @classmethod
    def validated(cls, **fields) -> "SamplingParams":
        """``SamplingParams(**fields)`` whose errors are a :class:`ParamError` naming the field."""
        try:
            return cls(**fields)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            cause = (first.get("ctx") or {}).get("error")
            if isinstance(cause, ParamError):
                raise cause from None
            loc = ".".join(str(x) for x in first.get("loc", ())) or "sampling"
            raise ParamError(loc, str(first.get("msg", "invalid value")).removeprefix("Value error, ")) from None

    @classmethod
    def from_openai(cls, req, *, max_tokens: Optional[int], logprobs: Optional[int] = None,
                    prompt_logprobs: Optional[int] = None, skip_special_tokens: bool = True,
                    guided_decoding: Optional[GuidedDecoding] = None) -> "SamplingParams":
        """From an OpenAI request (chat or completions: any object with their sampling attributes); OpenAI's
        ``null`` means the default, ``logit_bias`` keys are token ids written as strings. Raises :class:`ParamError`."""
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise ParamError("logit_bias", f"key {key!r} is not a token id") from None
        stop = req.stop
        return cls.validated(
            n=req.n,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            stop=[] if stop is None else ([stop] if isinstance(stop, str) else list(stop)),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=skip_special_tokens,
            logit_bias=bias,
            guided_decoding=guided_decoding,
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must exist in the model's vocabulary (a larger id would index past the
        logits). Raises :class:`ParamError`."""
        for param, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias)):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ParamError(param, f"token id {bad} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def needs_row_work(self) -> bool:
        """Anything beyond an argmax or a plain draw on the raw logits (penalties, biases)."""
        return self.needs_history or bool(self.logit_bias)

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
    banned_ids: list[int] = field(default_factory=list)  # e.g. stop tokens before min_tokens
    allowed_mask: Optional[torch.Tensor] = None  # bool [vocab]: grammar-constrained decoding


@dataclass
class Sample:
    token_id: int
    logprob: float
    top_logprobs: Optional[list[tuple[int, float]]] = None


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, index: int) -> int:
    """Seed of completion ``index`` of a request seeded with ``seed`` (index 0 keeps the seed itself)."""
    if index == 0:
        return seed
    return _splitmix64(_splitmix64(seed & _MASK64) ^ index) >> 1


def _seeded_generator(seed: int, output_index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) + output_index) >> 1)
    return g


def apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """Penalize one row ``[vocab]`` in place (and return it).

    repetition (CTRL): every token seen in prompt or output has its logit divided by the penalty if positive,
    multiplied if not. frequency / presence (OpenAI): ``logit -= frequency * count + presence * (count > 0)`` with
    ``count`` the token's occurrences in the output.
    """
    p = req.params
    vocab = logits.shape[-1]
    if p.repetition_penalty != 1.0:
        seen = sorted(t for t in set(req.prompt_ids) | set(req.output_ids) if 0 <= t < vocab)
        if seen:
            idx = torch.tensor(seen, dtype=torch.long, device=logits.device)
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_ids:
        ids = torch.tensor([t for t in req.output_ids if 0 <= t < vocab], dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=vocab).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _draw(row: torch.Tensor, p: SamplingParams, output_index: int) -> int:
    """Random draw from one processed row of logits."""
    row = row / p.temperature
    if 0 < p.top_k < row.numel():
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
    gen = _seeded_generator(p.seed, output_index, row.device) if p.seed is not None else None
    # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws index i with probability p_i exactly.
    noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return int(torch.argmax(probs / noise))


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> list[Sample]:
    """Sample one token per row of ``logits [rows, vocab]``.

    Rows that need nothing but an argmax are handled in one batched operation; penalties, masks and random draws go
    row by row. The result of a row depends only on that row and its request.
    """
    rows = len(requests)
    if rows == 0:
        return []
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    work = logits
    special = [i for i, r in enumerate(requests)
               if r.params.needs_row_work or r.banned_ids or r.allowed_mask is not None]
    if special:
        work = logits.clone()
        for i in special:
            r = requests[i]
            row = work[i]
            if r.params.needs_history:
                apply_penalties(row, r)
            if r.params.logit_bias:
                ids = [t for t in r.params.logit_bias if t < row.numel()]
                if ids:
                    bias = torch.tensor([r.params.logit_bias[t] for t in ids], dtype=row.dtype, device=row.device)
                    row[torch.tensor(ids, dtype=torch.long, device=row.device)] += bias
            if r.banned_ids:
                row[torch.tensor(r.banned_ids, dtype=torch.long, device=row.device)] = float("-inf")
            if r.allowed_mask is not None:
                row.masked_fill_(~r.allowed_mask.to(row.device), float("-inf"))
    chosen = work.argmax(dim=-1)  # greedy rows are done; random rows are overwritten below
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if random_rows:
        chosen = chosen.clone()
        for i in random_rows:
            chosen[i] = _draw(work[i], requests[i].params, requests[i].output_index)
    token_ids = chosen.tolist()
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    kmax = max((r.params.logprobs or 0) for r in requests)
    tops: list = [None] * rows
    if kmax:
        vals, ids = torch.topk(logprobs, min(kmax, logprobs.shape[-1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        for i, r in enumerate(requests):
            k = r.params.logprobs
            if k:
                tops[i] = list(zip(ids[i][:k], vals[i][:k]))
    return [Sample(token_id=token_ids[i], logprob=chosen_lp[i], top_logprobs=tops[i]) for i in range(rows)]
