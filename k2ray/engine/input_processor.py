"""A prompt and its sampling parameters turned into a validated :class:`Request` (in the spirit of vLLM's Processor).

Validation and tokenization happen here, on the caller's thread, so an invalid request raises ValueError (naming the
parameter) before anything reaches the scheduler. Each of the ``n`` sequences gets its seed, the stop tokens banned
before ``min_tokens``, its grammar matcher and its incremental detokenizer. The model directory's tokenizer and
default stop tokens are loaded here too.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Optional

from k2ray.config import ModelArgs
from k2ray.engine.request import MMItem, PromptTooLongError, Request, Sequence
from k2ray.runtime.sampling import ParamError, SamplingParams, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from k2ray.engine.structured import StructuredOutputs
    from k2ray.runtime.vision import VisionRunner
    from k2ray.tokenizer.image import ProcessedImage

Prompt = str | list[int]


def load_eos_token_ids(model_dir: str | Path, args=None) -> list[int]:
    """The model's default stop tokens: ``generation_config.json``'s ``eos_token_id`` if present, else the config's."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            eos = None
        if eos is not None:
            return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    if args is None:
        args = ModelArgs.from_dir(model_dir)
    return list(args.eos_token_ids)


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer, or None when it ships none (token-id prompts only)."""
    if not (Path(model_dir) / "tiktoken.model").is_file():
        return None
    from k2ray.tokenizer import KimiTokenizer

    return KimiTokenizer.from_dir(model_dir)


class InputProcessor:
    def __init__(self, args: ModelArgs, tokenizer, eos_token_ids: AbstractSet[int], max_model_len: int,
                 cache_tokens: int, grammar_compile_timeout_s: float = 10.0):
        self.args = args
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.cache_tokens = cache_tokens  # KV cache capacity of one attention worker (for error messages)
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._ids_lock = threading.Lock()
        self._reserved_ids: set[str] = set()  # ids of requests prepared and not yet retired
        self._structured: Optional["StructuredOutputs"] = None  # built on the first constrained request
        self._structured_lock = threading.Lock()
        self.grammar_compile_timeout_s = grammar_compile_timeout_s
        self.vision: Optional["VisionRunner"] = None  # the image encoder, for models that have one

    def prepare(self, prompt: Prompt, params: SamplingParams | dict | None, request_id: Optional[str] = None,
                arrival_time: Optional[float] = None, images: Optional[list["ProcessedImage"]] = None) -> Request:
        """The validated request (safe from any thread); its id stays reserved until :meth:`release_id`. Raises
        ValueError (:class:`PromptTooLongError` for length) naming what is wrong; nothing is reserved then.

        ``images``: one per ``<|media_pad|>`` placeholder of the prompt, in order; each placeholder is expanded to
        its image's token count and the image's embeddings (run through the encoder here) replace them."""
        params, text, ids = self._validate(prompt, params, images)
        items = self._expand_images(ids, images) if images else []
        if items:
            self._check_length(ids)
        request_id = self._reserve_id(request_id)
        try:
            if items:
                embeds = self.vision.encode(images)
                for item, emb in zip(items, embeds, strict=True):
                    if tuple(emb.shape) != (item.length, self.args.hidden_size):
                        raise RuntimeError(f"image encoder returned {tuple(emb.shape)} for {item.length} tokens")
                    item.embeds = emb
            compiled = self._compile_grammar(params)
        except BaseException:
            self.release_id(request_id)
            raise
        req = self._make_request(request_id, ids, params, text, arrival_time, compiled)
        req.mm_items = items
        return req

    def _expand_images(self, ids: list[int], images: list["ProcessedImage"]) -> list[MMItem]:
        """Expand each placeholder of ``ids`` (in place) to its image's token count; the images' spans."""
        pad = self.args.media_placeholder_token_id
        if self.args.vision is None or pad is None or self.vision is None:
            raise ParamError("messages", "this model does not accept images (it has no image encoder)")
        where = [i for i, t in enumerate(ids) if t == pad]
        if len(where) != len(images):
            raise ParamError("messages", f"the prompt has {len(where)} image placeholders for {len(images)} images")
        out: list[int] = []
        items: list[MMItem] = []
        prev = 0
        for pos, im in zip(where, images):
            out.extend(ids[prev:pos])
            items.append(MMItem(offset=len(out), length=im.num_tokens, content_hash=im.content_hash))
            out.extend([pad] * im.num_tokens)
            prev = pos + 1
        out.extend(ids[prev:])
        ids[:] = out
        return items

    def release_id(self, request_id: str) -> None:
        with self._ids_lock:
            self._reserved_ids.discard(request_id)

    def _reserve_id(self, request_id: Optional[str]) -> str:
        if request_id is None:
            request_id = uuid.uuid4().hex
        with self._ids_lock:
            if request_id in self._reserved_ids:
                raise ParamError("request_id", f"{request_id!r} is already in use")
            self._reserved_ids.add(request_id)
        return request_id

    def _validate(self, prompt: Prompt, params: SamplingParams | dict | None, images=None,
                  ) -> tuple[SamplingParams, Optional[str], list[int]]:
        """(params, prompt text or None, prompt token ids); raises ValueError (:class:`PromptTooLongError` for
        length) naming what is wrong."""
        params = params if params is not None else SamplingParams()
        if isinstance(params, dict):
            params = SamplingParams.validated(**params)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ParamError("prompt", "text prompts need a tokenizer; this model directory has none (pass token ids)")
            text: Optional[str] = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text = None
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise ParamError("prompt", "expected a string or a list of token ids") from None
            vocab = self.args.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ParamError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise ParamError("prompt", "empty prompt")
        if not images:
            self._check_length(ids)
        if params.stop and self.tokenizer is None:
            raise ParamError("stop", "stop strings need a tokenizer; this model directory has none")
        params.check_vocab(self.args.vocab_size)  # a stop id or bias past the logits would fail the whole step
        return params, text, ids

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt: {len(ids)} tokens leave no room to generate within max_model_len={self.max_model_len} "
                f"(model context {self.args.max_position_embeddings}, KV cache "
                f"{self.cache_tokens} tokens per attention worker)"
            )

    def _compile_grammar(self, params: SamplingParams):
        """The compiled grammar of a constrained request (None when unconstrained); raises on a bad grammar."""
        if params.guided_decoding is None:
            return None
        return self.grammars().compile(params.guided_decoding)

    def grammars(self) -> "StructuredOutputs":
        """The model's grammar compiler (xgrammar), built on first use; needs the tokenizer."""
        with self._structured_lock:
            if self._structured is None:
                if self.tokenizer is None:
                    raise ParamError("guided", "constrained decoding needs the model's tokenizer")
                from k2ray.engine.structured import StructuredOutputs

                stops = sorted(set(self.tokenizer.stop_token_ids) | set(self.eos_token_ids))
                self._structured = StructuredOutputs(self.tokenizer, self.args.vocab_size, stops,
                                                     compile_timeout_s=self.grammar_compile_timeout_s)
            return self._structured

    def _make_request(self, request_id: str, ids: list[int], params: SamplingParams, text: Optional[str],
                     arrival_time: Optional[float], compiled=None) -> Request:
        """The request and its ``params.n`` sequences (validated inputs only)."""
        req = Request(request_id, ids, params, prompt=text, arrival_time=arrival_time,
                      arrival_index=next(self._arrivals))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        ban = sorted(stop_ids) if params.min_tokens else []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None and i > 0:
                p = params.model_copy(update={"seed": derive_seed(params.seed, i)})
            seq = Sequence(next(self._seq_ids), req, i, p)
            seq.min_tokens_ban = ban
            if compiled is not None:
                from k2ray.engine.structured import GrammarMatcher

                seq.matcher = GrammarMatcher(compiled, self.args.vocab_size)
            if self.tokenizer is not None:
                from k2ray.tokenizer import IncrementalDetokenizer

                seq.detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            req.seqs.append(seq)
        return req
