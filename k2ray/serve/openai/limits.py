"""The context-length policy shared by chat and completions: how long a prompt may be, how many tokens a request
may ask for, how many sequences one model group can ever hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from k2ray.serve.openai.errors import bad_request


@dataclass(frozen=True)
class Limits:
    max_model_len: int  # prompt + completion tokens
    default_max_tokens: Optional[int]  # when a request sets none (None: up to the context length)
    max_sequences: int  # max_num_seqs + max_queued_requests of one model group
    max_token_bytes: int = 1  # the longest token's UTF-8 length: len(text) // it is a lower bound of the tokens

    def check_prompt_text(self, text: str, param: str) -> None:
        """Reject a prompt that is certainly too long before spending time to tokenize it."""
        if len(text) < self.max_model_len:  # never more tokens than characters
            return
        lower = len(text.encode("utf-8")) // self.max_token_bytes
        if lower >= self.max_model_len:
            raise bad_request(f"{param}: the prompt has at least {lower} tokens, over the context length of "
                              f"{self.max_model_len} tokens", param, "context_length_exceeded")

    def max_tokens(self, requested: Optional[int], n_prompt: int, param: str) -> int:
        """The completion budget: the request's (if it fits), else the default, never past the context length."""
        limit = self.max_model_len
        if n_prompt >= limit:
            raise bad_request(f"{param}: the prompt has {n_prompt} tokens, which leaves no room to generate within "
                              f"the context length of {limit} tokens", param, "context_length_exceeded")
        room = limit - n_prompt
        if requested is None:
            return room if self.default_max_tokens is None else min(self.default_max_tokens, room)
        if requested >= 1 and requested > room:
            raise bad_request(f"max_tokens: {requested} completion tokens + {n_prompt} prompt tokens exceed the "
                              f"context length of {limit} tokens", "max_tokens", "context_length_exceeded")
        return requested

    def check_fits(self, sequences: int, param: str) -> None:
        """More sequences (prompts x n) than a model group ever holds is a 400, not a 503: no retry could help."""
        if sequences > self.max_sequences:
            raise bad_request(f"{param}: the request needs {sequences} sequences (prompts x n), more than one model "
                              f"group holds (max_num_seqs + max_queued_requests = {self.max_sequences})", param)
