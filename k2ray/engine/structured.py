"""Grammar-constrained decoding with xgrammar: tool calls in Kimi's format, JSON schemas, regexes, choices, EBNF.

Why xgrammar: it runs on CPU (C++ with its own thread pool), accepts a raw byte vocabulary (tiktoken's), ships the
Kimi-K2 tool-call structural tag (reasoning prefix, ``<|tool_calls_section_begin|>`` section, per-tool argument
schemas, auto/required/forced), and computes a token bitmask in tens of microseconds per request.

Kimi's markers are special tokens whose text could otherwise be "spelled" inside a JSON string, or spelled out of
ordinary tokens where the grammar wants the marker. The grammar vocabulary therefore gives each marker a sentinel
spelling that starts with a control byte (``\x01``) — which JSON strings cannot hold — and removes the ordinary
tokens containing that byte, so the marker can only be produced as its special token. Every other special token gets
an empty spelling, which xgrammar never allows. Ordinary tokens holding other control bytes (tab, carriage return,
...) are left out too: xgrammar's length-bounded JSON strings would otherwise admit them raw, which JSON forbids
(constrained outputs use spaces and newlines for layout). Stop tokens end the output once the grammar is complete.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
from typing import Any

import torch

from k2ray.runtime.guided import GuidedDecoding
from k2ray.runtime.sampling import ParamError
from k2ray.tokenizer.kimi_format import THINK_END, THINK_MARKERS, THINK_START, TOOL_MARKERS

# Whitespace allowed between JSON tokens: enough for compact or lightly indented JSON, and a bound on how long a
# weak model can wander through layout instead of content.
MAX_JSON_WHITESPACE = 4
MARKERS = THINK_MARKERS + TOOL_MARKERS


class GrammarError(ParamError):
    """A guided-decoding request cannot be compiled (bad JSON schema, regex, grammar or tool list); ``param`` names
    the part of the request at fault."""


def _sentinel(marker: str) -> str:
    return "\x01" + marker + "\x02"


def _length_bound(value: Any, key: str, param: str) -> int:
    """A ``minLength``/``maxLength`` value: a non-negative integer (JSON may spell it 3.0), else the request is bad."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (ok and value == int(value) and value >= 0):
        raise GrammarError(param, f"{key} must be a non-negative integer (got {json.dumps(value)[:40]})")
    return int(value)


def _harden_schema(node: Any, param: str = "json_schema") -> Any:
    """Rewrite length-bounded plain strings as an equivalent pattern that excludes control characters.

    xgrammar 0.2.x compiles ``minLength``/``maxLength`` strings to a character class that admits raw control bytes
    (invalid JSON, and a way to reach marker sentinels); a pattern keeps the bound and the JSON rules. A bound that is
    not a non-negative integer is a :class:`GrammarError` naming ``param``.
    """
    if isinstance(node, list):
        return [_harden_schema(x, param) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _harden_schema(v, param) for k, v in node.items()}
    bounded = "minLength" in out or "maxLength" in out
    plain = not any(k in out for k in ("pattern", "format", "enum", "const"))
    if out.get("type") == "string" and bounded and plain:
        lo = _length_bound(out.pop("minLength", 0), "minLength", param)
        hi = _length_bound(out.pop("maxLength"), "maxLength", param) if "maxLength" in out else None
        if hi is not None and hi < lo:
            raise GrammarError(param, f"maxLength {hi} is below minLength {lo}")
        out["pattern"] = "^[^\"\\\\\\x00-\\x1f]{%d,%s}$" % (lo, "" if hi is None else hi)
    return out


def _tool_format(guided: GuidedDecoding) -> dict:
    """The tool-call part from xgrammar's built-in Kimi-K2 structural tag (no reasoning prefix)."""
    import xgrammar as xgr

    tools = [dict(t) if isinstance(t, dict) else t for t in guided.tools or []]
    for t in tools:
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and "parameters" in t["function"]:
            t["function"] = {**t["function"], "parameters": _harden_schema(t["function"]["parameters"], "tools")}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GrammarError(f"tools[{i}]", "expected {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    choice: Any = guided.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise GrammarError("tool_choice", f"function {name!r} is not among the declared tools")
        choice = {"type": "function", "function": {"name": name}}
    if not tools:
        raise GrammarError("tools", "at least one tool is needed for a constrained tool call")
    try:
        st = xgr.get_builtin_structural_tag(
            "kimi", tools=tools, tool_choice=choice, reasoning="disabled",
            parallel_tool_calls=guided.parallel_tool_calls, max_whitespace_cnt=MAX_JSON_WHITESPACE,
        )
    except Exception as e:
        raise GrammarError("tools", str(e)) from None
    fmt = json.loads(st.model_dump_json())["format"]
    # Call indexes: the exact next index for a single call, else bounded digits.
    index = r"\d{1,5}"
    if guided.call_index is not None and not guided.parallel_tool_calls:
        index = str(int(guided.call_index))
    return json.loads(json.dumps(fmt).replace(json.dumps(r"\d+"), json.dumps(index)))


def _body_format(guided: GuidedDecoding) -> dict:
    if guided.tools is not None:
        return _tool_format(guided)
    if guided.json_object:
        return {"type": "json_schema", "json_schema": {"type": "object"}, "max_whitespace_cnt": MAX_JSON_WHITESPACE}
    if guided.json_schema is not None:
        schema = guided.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError("json_schema", f"not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError("json_schema", "a JSON schema must be an object")
        return {"type": "json_schema", "json_schema": _harden_schema(schema, "json_schema"),
                "max_whitespace_cnt": MAX_JSON_WHITESPACE}
    if guided.regex is not None:
        return {"type": "regex", "pattern": guided.regex}
    if guided.choice is not None:
        alts = " | ".join(json.dumps(c) for c in guided.choice)
        return {"type": "grammar", "grammar": f"root ::= {alts}"}
    return {"type": "grammar", "grammar": guided.grammar}


def structural_tag(guided: GuidedDecoding) -> str:
    """The xgrammar structural tag (JSON text) for ``guided``, markers spelled with their sentinels."""
    body = _body_format(guided)
    if guided.thinking:
        # Free reasoning up to </think>, opened by the model's own <think> or not (K2-Thinking writes it, K2.5's
        # template pre-fills it); inside it may not open a tool section or a second <think>.
        free = {"type": "any_text", "excludes": list(TOOL_MARKERS) + [THINK_START]}
        reasoning = {"type": "or", "elements": [
            {"type": "tag", "begin": begin, "content": free, "end": THINK_END} for begin in (THINK_START, "")
        ]}
        body = {"type": "sequence", "elements": [reasoning, body]}
    text = json.dumps({"type": "structural_tag", "format": body})
    for m in MARKERS:
        text = text.replace(json.dumps(m)[1:-1], json.dumps(_sentinel(m))[1:-1])
    return text


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_terminated())


class StructuredOutputs:
    """Per model: the grammar vocabulary, a compiler with a cache, and batched mask computation."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], threads: int = 2,
                 compile_timeout_s: float = 10.0):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        vocab: list[bytes] = []
        for i in range(vocab_size):
            if i >= tokenizer.vocab_size:
                vocab.append(b"")  # padding rows of the embedding: never generated
            elif tokenizer.is_special(i):
                name = tokenizer.id_to_bytes(i).decode("utf-8")
                vocab.append(_sentinel(name).encode() if name in MARKERS else b"")
            else:
                raw = tokenizer.id_to_bytes(i)
                vocab.append(b"" if any(b < 0x20 and b != 0x0A for b in raw) else raw)
        self.info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True)
        self.compile_timeout_s = compile_timeout_s
        # xgrammar's compile cannot be interrupted (C++): it runs on these threads and the caller stops waiting
        # after the budget. Two of them bound the CPU that runaway grammars can take; the budget counts the wait for
        # a free one too, so a backlog is refused rather than queued without end.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="k2ray-grammar")

    def compile(self, guided: GuidedDecoding):
        """The compiled grammar (from xgrammar's cache when seen before). Raises :class:`GrammarError` naming the
        part at fault for an invalid grammar or one that does not compile within ``compile_timeout_s``."""
        what = "json_schema" if guided.json_schema is not None or guided.json_object else (
            "regex" if guided.regex is not None else "tools" if guided.tools is not None else "grammar"
        )
        try:
            text = structural_tag(guided)
        except GrammarError:
            raise
        except Exception as e:  # a schema value of the wrong type deep inside, ...: the request's fault
            raise GrammarError(what, f"invalid: {type(e).__name__}: {str(e)[:200]}") from None
        future = self._pool.submit(self.compiler.compile_structural_tag, text)
        try:
            return future.result(timeout=self.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # if it never started; a running compile finishes into the cache unobserved
            raise GrammarError(what, f"too complex: compiling it took longer than {self.compile_timeout_s:g}s"
                               ) from None
        except Exception as e:
            # (xgrammar prefixes its messages with a time and its C++ source location: not for API clients)
            reason = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", (str(e).splitlines() or [type(e).__name__])[0])
            raise GrammarError(what, f"cannot compile: {reason[:300]}") from None

    def matcher(self, guided: GuidedDecoding) -> GrammarMatcher:
        return GrammarMatcher(self.compile(guided), self.vocab_size)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        import xgrammar as xgr

        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    @staticmethod
    def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """int32 bitmask rows ``[n, ceil(V/32)]`` -> bool ``[n, V]`` (True = allowed)."""
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()

    def allowed_masks(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        """Bool ``[len(matchers), V]`` of the tokens each matcher allows next."""
        bm = self.allocate_bitmask(len(matchers))
        for i, m in enumerate(matchers):
            m.fill_bitmask(bm, i)
        return self.bitmask_to_bool(bm, self.vocab_size)
