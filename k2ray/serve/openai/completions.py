"""The completions planner: an OpenAI completions request (one prompt or a batch, text or token ids) -> per prompt its
token ids, the echoed text and the sampling parameters. Pure (no I/O, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from k2ray.runtime.sampling import SamplingParams
from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.errors import bad_request
from k2ray.serve.openai.limits import Limits

@dataclass(frozen=True)
class CompletionPrompt:
    token_ids: list[int]
    text: str  # what echo returns (the decoded ids for a token prompt)
    sampling: SamplingParams


@dataclass(frozen=True)
class CompletionPlan:
    prompts: list[CompletionPrompt]
    n: int
    logprobs: Optional[int]  # None: no logprobs
    echo: bool
    skip_special_tokens: bool


def prompt_list(req: P.CompletionRequest) -> list:
    prompts = req.prompt
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return list(prompts)


def plan_completions(req: P.CompletionRequest, tokenizer, limits: Limits) -> CompletionPlan:
    prompts = prompt_list(req)
    if not prompts:
        raise bad_request("prompt: must not be empty", "prompt")
    vocab = tokenizer.vocab_size
    tokenized: list[tuple[list[int], str]] = []
    for p in prompts:
        if isinstance(p, str):
            limits.check_prompt_text(p, "prompt")
            ids, text = tokenizer.encode(p), p
        else:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
            ids, text = list(p), (tokenizer.decode(p) if req.echo else "")
        if not ids:
            raise bad_request("prompt: must not be empty", "prompt")
        tokenized.append((ids, text))
    limits.check_fits(len(tokenized) * req.n, "n" if len(tokenized) == 1 else "prompt")
    budgets = [limits.max_tokens(req.max_tokens, len(ids), "prompt") for ids, _ in tokenized]
    k = req.logprobs
    base = SamplingParams.from_openai(req, max_tokens=budgets[0], logprobs=k,
                                      prompt_logprobs=k if (req.echo and k is not None) else None,
                                      skip_special_tokens=req.skip_special_tokens)
    base.check_vocab(vocab)
    return CompletionPlan(
        prompts=[CompletionPrompt(ids, text, base if budget == base.max_tokens else
                                  SamplingParams.validated(**{**base.model_dump(), "max_tokens": budget}))
                 for (ids, text), budget in zip(tokenized, budgets)],
        n=req.n, logprobs=k, echo=req.echo, skip_special_tokens=req.skip_special_tokens,
    )
