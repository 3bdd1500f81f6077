"""LLMEngine: requests in, tokens out, one batched model step at a time.

Synchronous use (``LLM.generate``, tests)::

    engine.add_request(prompt, params)          # -> request id
    while engine.has_unfinished_requests():
        for out in engine.step(): ...           # RequestOutput per request that progressed

Asynchronous use (the Serve router): ``async for out in engine.stream(prompt, params)``. The first stream starts a
background thread that owns the scheduler and runs steps while there is work; requests and aborts reach it through
an inbox, outputs go back to each stream's event loop. If the executor raises, every open stream receives
:class:`EngineDeadError` (with the cause) and the engine refuses new work; :meth:`LLMEngine.shutdown` stops the loop
and the executor.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional, Sequence as Seq

from k2ray.config import EngineConfig, ParallelConfig
from k2ray.engine.request import (
    EngineDeadError, FinishReason, PromptTooLongError, Request, RequestOutput, Sequence, SeqStatus,
)
from k2ray.runtime.sampling import SampleRequest, SamplingParams, derive_seed
from k2ray.engine.scheduler import Scheduler
from k2ray.runtime.step import SeqWork, StepInput

if TYPE_CHECKING:  # pragma: no cover
    from k2ray.runtime.step import Executor

log = logging.getLogger(__name__)

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
        from k2ray.config import ModelArgs

        args = ModelArgs.from_dir(model_dir)
    return list(args.eos_token_ids)


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer, or None when it ships none (token-id prompts only)."""
    if not (Path(model_dir) / "tiktoken.model").is_file():
        return None
    from k2ray.tokenizer import KimiTokenizer

    return KimiTokenizer.from_dir(model_dir)


def build_executor(model_dir: str | Path, engine_cfg: EngineConfig, parallel_cfg: ParallelConfig | None = None):
    """LocalExecutor or RayExecutor (imported only when asked for, so Ray stays out of local runs)."""
    parallel_cfg = parallel_cfg or ParallelConfig()
    if parallel_cfg.executor == "ray":
        from k2ray.executor.ray import RayExecutor

        return RayExecutor(model_dir, engine_cfg, parallel_cfg)
    if parallel_cfg.attention_workers != 1 or parallel_cfg.expert_shards != 1:
        raise ValueError("attention_workers / expert_shards > 1 need executor='ray'")
    from k2ray.executor.local import LocalExecutor

    return LocalExecutor(model_dir, engine_cfg, device=parallel_cfg.device)


class _Sink:
    """Delivers outputs from the step thread to one stream's asyncio queue."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def put(self, item) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's loop is closed
            return False


class LLMEngine:
    def __init__(
        self,
        executor: "Executor",
        config: EngineConfig | None = None,
        tokenizer=None,
        eos_token_ids: Optional[Seq[int]] = None,
    ):
        self.executor = executor
        self.config = config = config or EngineConfig()
        self.args = executor.args
        self.tokenizer = tokenizer
        self.block_size = executor.block_size
        self.num_kv_blocks = executor.num_kv_blocks
        self.num_partitions = executor.num_partitions
        capacity = self.num_kv_blocks * self.block_size
        limit = min(self.args.max_position_embeddings, capacity)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len: {config.max_model_len} exceeds what this engine can hold ({limit} tokens: model "
                f"context {self.args.max_position_embeddings}, KV cache {self.num_kv_blocks} blocks x "
                f"{self.block_size} per partition)"
            )
        self.max_model_len = config.max_model_len or limit
        self.eos_token_ids = frozenset(self.args.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.scheduler = Scheduler(
            num_partitions=self.num_partitions,
            num_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self._requests: dict[str, Request] = {}
        self._ids_lock = threading.Lock()
        self._reserved_ids: set[str] = set()
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        # counters for metrics
        self.num_steps = 0
        self.num_prompt_tokens = 0  # prompt tokens of admitted requests
        self.num_generation_tokens = 0
        self.num_finished = 0
        self.num_aborted = 0
        self.last_step_stats: dict = {}
        self.num_constrained_requests = 0
        self.grammar_mask_time_s = 0.0
        self._structured = None  # StructuredOutputs, built on the first constrained request
        # Optional observers for a metrics layer (called on the step thread; exceptions are ignored):
        # on_step(stats) after every step, on_first_schedule(request, queue_seconds) when a request first runs.
        self.on_step: Optional[Callable[[dict], None]] = None
        self.on_first_schedule: Optional[Callable[[Request, float], None]] = None
        self._structured_lock = threading.Lock()
        self.phase_time_s = {"schedule": 0.0, "execute": 0.0, "process": 0.0}
        # background loop
        self._thread: Optional[threading.Thread] = None
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._sinks: dict[str, _Sink] = {}
        self._dead: Optional[BaseException] = None
        self._closed = False

    @classmethod
    def from_model(
        cls, model_dir: str | Path, config: EngineConfig | None = None, parallel: ParallelConfig | None = None
    ) -> "LLMEngine":
        """Engine over a model directory: executor per ``parallel``, the directory's tokenizer and stop tokens."""
        config = config or EngineConfig()
        tokenizer = load_tokenizer(model_dir)
        executor = build_executor(model_dir, config, parallel)
        try:
            return cls(executor, config, tokenizer, load_eos_token_ids(model_dir, executor.args))
        except BaseException:
            executor.shutdown()
            raise

    # -- requests ------------------------------------------------------------------------------------------------
    def prepare_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and tokenize without touching the scheduler (safe from any thread). Raises ValueError
        (:class:`PromptTooLongError` for length) naming what is wrong."""
        self._check_alive()
        params = params if params is not None else SamplingParams()
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; this model directory has none (pass token ids)")
            text: Optional[str] = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text = None
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise ValueError("prompt: expected a string or a list of token ids") from None
            vocab = self.args.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise ValueError("prompt: empty prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt: {len(ids)} tokens leave no room to generate within max_model_len={self.max_model_len} "
                f"(model context {self.args.max_position_embeddings}, KV cache "
                f"{self.num_kv_blocks * self.block_size} tokens per partition)"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer; this model directory has none")
        if request_id is None:
            request_id = uuid.uuid4().hex
        with self._ids_lock:
            if request_id in self._reserved_ids:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            self._reserved_ids.add(request_id)
        compiled = None
        if params.guided_decoding is not None:
            try:
                compiled = self._grammars().compile(params.guided_decoding)
            except BaseException:
                with self._ids_lock:
                    self._reserved_ids.discard(request_id)
                raise
        req = Request(request_id, ids, params, prompt=text, arrival_time=arrival_time,
                      arrival_index=next(self._arrivals))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        ban = sorted(stop_ids) if params.min_tokens else []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None and i > 0:
                p = params.model_copy(update={"seed": derive_seed(params.seed, i)})
            seq = Sequence(next(self._seq_ids), req, i, p)
            seq.stop_ids = stop_ids
            seq.min_tokens_ban = ban
            if compiled is not None:
                from k2ray.engine.structured import GrammarMatcher

                seq.matcher = GrammarMatcher(compiled, self.args.vocab_size)
            if self.tokenizer is not None:
                from k2ray.tokenizer import IncrementalDetokenizer

                seq.detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            req.seqs.append(seq)
        return req

    def _grammars(self):
        """The model's grammar compiler (xgrammar), built on first use; needs the tokenizer."""
        with self._structured_lock:
            if self._structured is None:
                if self.tokenizer is None:
                    raise ValueError("guided: constrained decoding needs the model's tokenizer")
                from k2ray.engine.structured import StructuredOutputs

                stops = sorted(set(self.tokenizer.stop_token_ids) | set(self.eos_token_ids))
                self._structured = StructuredOutputs(self.tokenizer, self.args.vocab_size, stops)
            return self._structured

    def add_prepared(self, req: Request) -> str:
        """Queue a prepared request (owner thread only)."""
        if req.params.guided_decoding is not None:
            self.num_constrained_requests += 1
        self._requests[req.request_id] = req
        self.num_prompt_tokens += len(req.prompt_token_ids) * len(req.seqs)
        for seq in req.seqs:
            self.scheduler.add(seq)
        return req.request_id

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError naming the problem (nothing else is affected)."""
        req = self.prepare_request(prompt, params, request_id, arrival_time)
        if self._thread is not None:
            self._post(("add", req, None))
            return req.request_id
        return self.add_prepared(req)

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request and free its cache blocks at once. Returns its final output (None if unknown/finished).
        While the background loop runs, the abort is queued to it and None is returned."""
        if self._thread is not None:
            self._post(("abort", request_id, None))
            return None
        return self._abort(request_id)

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        req = self._requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                self._set_finished(seq, FinishReason.ABORT)
        self.num_aborted += 1
        return self._retire(req)

    def _retire(self, req: Request) -> RequestOutput:
        out = req.make_output()
        self._requests.pop(req.request_id, None)
        with self._ids_lock:
            self._reserved_ids.discard(req.request_id)
        req.finish_time = time.monotonic()
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Optional[Request]:
        return self._requests.get(request_id)

    # -- the step -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, process the sampled tokens. Returns an output for every request that got
        new tokens or finished in this step."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("step() is driven by the background loop while streams are open")
        self._check_alive()
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            self.last_step_stats = {}
            return []
        works = []
        for c in sched.scheduled:
            seq = c.seq
            req = seq.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now = time.monotonic()  # the clock of arrival_time
                if self.on_first_schedule is not None:
                    try:
                        self.on_first_schedule(req, max(0.0, now - req.arrival_time))
                    except Exception:
                        log.debug("on_first_schedule failed", exc_info=True)
            work = SeqWork(seq.seq_id, seq.token_at(c.start, c.start + c.num_new), c.start, seq.block_table,
                           seq.partition)
            if c.sample:
                work.sample = self._sample_request(seq)
            plp = req.prompt_logprobs
            if plp is not None and seq.index == 0 and c.start == len(plp) - 1:
                prompt_len = len(req.prompt_token_ids)
                end = c.start + c.num_new
                if c.start < prompt_len - 1:
                    work.prompt_logprobs = req.params.prompt_logprobs
                    work.next_prompt_token = req.prompt_token_ids[end] if end < prompt_len else None
            works.append(work)
        constrained = [w.sample for c, w in zip(sched.scheduled, works) if c.sample and c.seq.matcher is not None]
        mask_s = 0.0
        if constrained:
            tm = time.perf_counter()
            matchers = [c.seq.matcher for c in sched.scheduled if c.sample and c.seq.matcher is not None]
            masks = self._structured.allowed_masks(matchers)
            for sr, mask in zip(constrained, masks):
                sr.allowed_mask = mask
            mask_s = time.perf_counter() - tm
            self.grammar_mask_time_s += mask_s
        t1 = time.perf_counter()
        try:
            result = self.executor.execute(StepInput(works))
        except BaseException as e:
            self._fail(e)
            raise
        t2 = time.perf_counter()
        self.scheduler.commit(sched.scheduled)
        touched: dict[str, Request] = {}
        results = result.results
        for c in sched.scheduled:
            seq = c.seq
            res = results.get(seq.seq_id)
            if res is None:
                err = RuntimeError(f"executor returned no result for sequence {seq.seq_id}")
                self._fail(err)
                raise err
            req = seq.request
            if res.prompt_logprobs is not None and req.prompt_logprobs is not None:
                ptoks = req.prompt_token_ids
                base = len(req.prompt_logprobs)
                for j, (lp, top) in enumerate(res.prompt_logprobs):
                    d = {ptoks[base + j]: lp}
                    for tok, v in top:
                        d.setdefault(tok, v)
                    req.prompt_logprobs.append(d)
            if c.sample:
                self._append_token(seq, res.sample)
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.finished:
                self.num_finished += 1
                outputs.append(self._retire(req))
            else:
                outputs.append(req.make_output())
        t3 = time.perf_counter()
        self.num_steps += 1
        stats = {
            "schedule_s": t1 - t0, "execute_s": t2 - t1, "process_s": t3 - t2,
            "num_seqs": len(sched.scheduled), "num_batched_tokens": sched.num_batched_tokens,
            "num_prefill_tokens": sched.num_prefill_tokens, "num_decode_tokens": sched.num_decode_tokens,
            "num_preempted": len(sched.preempted),
            "grammar_mask_s": mask_s, "num_constrained": len(constrained),
        }
        if result.stats:
            stats["executor"] = result.stats
        self.last_step_stats = stats
        if self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:
                log.debug("on_step failed", exc_info=True)
        ph = self.phase_time_s
        ph["schedule"] += t1 - t0
        ph["execute"] += t2 - t1
        ph["process"] += t3 - t2
        return outputs

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        sr = seq.sample_request
        if sr is None:
            sr = seq.sample_request = SampleRequest(seq.params)
            if seq.params.needs_history:
                sr.prompt_ids = seq.request.prompt_token_ids
                sr.output_ids = seq.output_ids
        n_out = len(seq.output_ids)
        sr.output_index = n_out
        sr.banned_ids = seq.min_tokens_ban if n_out < seq.params.min_tokens else []
        return sr

    def _append_token(self, seq: Sequence, s) -> None:
        tok = s.token_id
        if seq.matcher is not None and not seq.matcher.accept(tok):
            # Cannot happen when the mask was applied; never let a grammar violation pass silently.
            log.error("sequence %s: token %d rejected by its grammar", seq.seq_id, tok)
            seq.request.error = "constrained decoding produced a token outside the grammar"
            self.scheduler.remove(seq)
            self._set_finished(seq, FinishReason.ERROR)
            return
        seq.output_ids.append(tok)
        seq.cumulative_logprob += s.logprob
        self.num_generation_tokens += 1
        req = seq.request
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if seq.logprobs is not None:
            d = {tok: s.logprob}
            if s.top_logprobs:
                for t, v in s.top_logprobs:
                    d.setdefault(t, v)
            seq.logprobs.append(d)
        p = seq.params
        n_out = len(seq.output_ids)
        reason = None
        if tok in seq.stop_ids:
            reason = FinishReason.STOP
            seq.stop_reason = None if tok in self.eos_token_ids and tok not in p.stop_token_ids else tok
        else:
            if seq.detok is not None:
                delta = seq.detok.feed(tok)
                if delta:
                    seq.text += delta
                    if p.stop:
                        if n_out < p.min_tokens:  # stop strings count only from min_tokens on
                            seq.stop_checked = len(seq.text)
                        elif self._check_stop_strings(seq):
                            reason = FinishReason.STOP
        if reason is None and (
            (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            if reason is FinishReason.LENGTH and seq.detok is not None:
                seq.text += seq.detok.flush()
            self.scheduler.remove(seq)
            self._set_finished(seq, reason)

    def _check_stop_strings(self, seq: Sequence) -> bool:
        text = seq.text
        longest = seq.holdback + 1
        start = max(0, seq.stop_checked - longest + 1)
        best = None
        for stop in seq.params.stop:
            i = text.find(stop, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        seq.stop_checked = len(text)
        if best is None:
            return False
        i, stop = best
        seq.text = text[: i + len(stop)] if seq.params.include_stop_str_in_output else text[:i]
        seq.stop_reason = stop
        return True

    @staticmethod
    def _set_finished(seq: Sequence, reason: FinishReason) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _fail(self, e: BaseException) -> None:
        """The executor failed: every live request ends with an error; the engine accepts no more work."""
        self._dead = e
        msg = f"engine step failed: {type(e).__name__}: {e}"
        log.error(msg)
        for req in list(self._requests.values()):
            req.error = msg
            for seq in req.seqs:
                if not seq.finished:
                    self.scheduler.remove(seq)
                    self._set_finished(seq, FinishReason.ERROR)
            self._retire(req)

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError("engine is shut down")
        if self._dead is not None:
            raise EngineDeadError(f"engine failed: {type(self._dead).__name__}: {self._dead}") from self._dead

    # -- metrics --------------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by live sequences (mean over partitions)."""
        return self.scheduler.kv_usage()

    @property
    def prefix_cache_queried_tokens(self) -> int:
        return self.scheduler.prefix_cache_stats()[0]

    @property
    def prefix_cache_hit_tokens(self) -> int:
        return self.scheduler.prefix_cache_stats()[1]

    @property
    def num_computed_tokens(self) -> int:
        """Tokens run through the model so far (prefill chunks, decodes and recomputation)."""
        return self.scheduler.num_computed_tokens

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def num_free_blocks(self) -> list[int]:
        return [bm.num_free_blocks for bm in self.scheduler.managers]

    def metrics(self) -> dict:
        """A snapshot of everything the engine counts (for a metrics exporter)."""
        q, h = self.scheduler.prefix_cache_stats()
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_cache_usage": self.kv_cache_usage(),
            "kv_cache_usage_per_partition": [bm.usage for bm in self.scheduler.managers],
            "prefix_cache_queried_tokens": q,
            "prefix_cache_hit_tokens": h,
            "num_preemptions": self.num_preemptions,
            "num_steps": self.num_steps,
            "num_computed_tokens": self.num_computed_tokens,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generation_tokens": self.num_generation_tokens,
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "phase_time_s": dict(self.phase_time_s),
            "last_step": dict(self.last_step_stats),
        }

    # -- async front ----------------------------------------------------------------------------------------------
    async def stream(
        self, prompt: Prompt | Request, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its :class:`RequestOutput` after every step that advanced it (the last one
        has ``finished=True``). ``prompt`` may also be a :class:`Request` from :meth:`prepare_request` (validate
        first, stream later). Leaving the loop early aborts the request. Raises ValueError for an invalid request
        and :class:`EngineDeadError` if the engine fails or shuts down meanwhile."""
        req = prompt if isinstance(prompt, Request) else self.prepare_request(prompt, params, request_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._ensure_loop()
        self._post(("add", req, _Sink(loop, queue)))
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finished:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self._post(("abort", req.request_id, None))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """The final output of one request, through the background loop."""
        last = None
        async for out in self.stream(prompt, params, request_id):
            last = out
        return last

    def _post(self, item) -> None:
        if self._thread is None and item[0] == "add":
            raise RuntimeError("background loop is not running")
        self._inbox.append(item)
        self._wake.set()

    def _ensure_loop(self) -> None:
        self._check_alive()
        if self._thread is None:
            if self._requests:
                raise RuntimeError("stream() cannot start while requests added with add_request() are in flight")
            self._thread = threading.Thread(target=self._run_loop, name="k2ray-engine-loop", daemon=True)
            self._thread.start()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, a, sink = self._inbox.popleft()
            if kind == "add":
                if sink is not None:
                    self._sinks[a.request_id] = sink
                self.add_prepared(a)
            else:
                out = self._abort(a)
                s = self._sinks.pop(a, None)
                if s is not None and out is not None:
                    s.put(out)

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._wake.wait()
                    continue
                if self._stopping:
                    break
                outs = self.step()
                for out in outs:
                    sink = self._sinks.get(out.request_id)
                    if sink is None:
                        continue
                    if out.finished:
                        del self._sinks[out.request_id]
                    if not sink.put(out):
                        self._sinks.pop(out.request_id, None)
                        self._abort(out.request_id)
        except BaseException as e:  # executor failure (already recorded by step) or a bug in the loop
            if self._dead is None and not self._closed:
                self._fail(e)
        finally:
            self._fail_streams()

    def _fail_streams(self) -> None:
        if self._dead is not None:
            err: BaseException = EngineDeadError(f"engine failed: {type(self._dead).__name__}: {self._dead}")
            err.__cause__ = self._dead
        else:
            err = EngineDeadError("engine is shut down")
        while self._inbox:  # requests that never reached the scheduler
            kind, a, sink = self._inbox.popleft()
            if kind == "add" and sink is not None:
                sink.put(err)
        for sink in self._sinks.values():
            sink.put(err)
        self._sinks.clear()

    def shutdown(self) -> None:
        """Stop the background loop (open streams get :class:`EngineDeadError`) and release the executor."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        if self._thread is None:
            self._fail_streams()
        for req in list(self._requests.values()):
            for seq in req.seqs:
                if not seq.finished:
                    self.scheduler.remove(seq)
                    self._set_finished(seq, FinishReason.ABORT)
            self._retire(req)
        self.executor.shutdown()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
