"""The guided-decoding request: what a constrained output must match (a parameter of a request, carried to the
engine inside :class:`~k2ray.runtime.sampling.SamplingParams`; compiled to a grammar by :mod:`k2ray.engine.structured`).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, model_validator


class GuidedDecoding(BaseModel):
    """What the output must match. Exactly one of the constraint fields is set.

    ``tools`` + ``tool_choice`` constrain the tool-call section (``auto``: free text, but once the model opens a
    tool section the calls are constrained; ``required``: at least one call; ``{"name": ...}``: that function).
    ``thinking`` lets a free ``[<think>]…</think>`` reasoning block come first.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: Optional[Union[dict, str]] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None  # EBNF (GBNF-style) as xgrammar reads it
    tools: Optional[list[dict]] = None
    tool_choice: Union[Literal["auto", "required"], dict] = "auto"
    parallel_tool_calls: bool = True
    call_index: Optional[int] = None  # index of the first call (``functions.NAME:IDX``): calls so far in the chat
    thinking: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> "GuidedDecoding":
        kinds = [
            k for k in ("json_schema", "regex", "choice", "grammar", "tools")
            if getattr(self, k) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(kinds) != 1:
            raise ValueError(f"guided decoding needs exactly one constraint, got {kinds or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: must list at least one string")
        return self

    def key(self) -> str:
        return self.model_dump_json()
