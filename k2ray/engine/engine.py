"""LLMEngine: requests in, tokens out, one batched model step at a time.

Synchronous use (``LLM.generate``, tests)::

    engine.add_request(prompt, params)          # -> request id
    while engine.has_unfinished_requests():
        for out in engine.step(): ...           # RequestOutput per request that progressed

A step is schedule -> execute -> update (the shape of nano-vllm's ``LLMEngine.step`` and vLLM v1's ``EngineCore``):
the :class:`~k2ray.engine.scheduler.Scheduler` picks the chunks, :class:`~k2ray.engine.work.WorkBuilder` turns them
into the executor's input, the executor runs the model, and the
:class:`~k2ray.engine.output_processor.OutputProcessor` appends the sampled tokens, detokenizes, checks stops and
builds the outputs. Requests are validated and tokenized by :class:`~k2ray.engine.input_processor.InputProcessor`.

Asynchronous use (the Serve router): ``async for out in engine.stream(prompt, params)``. The first stream starts a
background thread that owns the scheduler and runs steps while there is work; requests and aborts reach it through
an inbox (:class:`~k2ray.engine.messages.Add`, :class:`~k2ray.engine.messages.Abort`), outputs go back to each
stream's event loop. If the executor raises, every open stream receives :class:`EngineDeadError` (with the cause) and
the engine refuses new work; :meth:`LLMEngine.shutdown` stops the loop and the executor. A failure that belongs to
one sequence (building its input, its sampling, processing its output) is not the executor's: that request alone
finishes with ``finish_reason="error"`` and :attr:`RequestOutput.error` set, and the step goes on for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional, Sequence as Seq

from k2ray.config import EngineConfig, ParallelConfig
from k2ray.engine.input_processor import InputProcessor, Prompt, load_eos_token_ids, load_tokenizer
from k2ray.engine.loop import StepLoop
from k2ray.engine.messages import Abort, Add, Message, Sink
from k2ray.engine.output_processor import OutputProcessor, make_request_output
from k2ray.engine.request import EngineDeadError, FinishReason, Request, RequestOutput
from k2ray.engine.scheduler import ScheduledSeq, Scheduler
from k2ray.engine.stats import StepStats
from k2ray.engine.work import BuiltStep, WorkBuilder
from k2ray.executor.build import build_executor
from k2ray.runtime.sampling import SamplingParams
from k2ray.runtime.step import StepInput, StepOutput

if TYPE_CHECKING:  # pragma: no cover
    from k2ray.runtime.step import Executor

log = logging.getLogger(__name__)


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
        self.num_attention_workers = executor.num_attention_workers
        capacity = self.num_kv_blocks * self.block_size
        limit = min(self.args.max_position_embeddings, capacity)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len: {config.max_model_len} exceeds what this engine can hold ({limit} tokens: model "
                f"context {self.args.max_position_embeddings}, KV cache {self.num_kv_blocks} blocks x "
                f"{self.block_size} per attention worker)"
            )
        self.max_model_len = config.max_model_len or limit
        self.eos_token_ids = frozenset(self.args.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.scheduler = Scheduler(
            num_attention_workers=self.num_attention_workers,
            num_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            max_step_cost=config.max_step_cost,
            attention_cost_tokens=config.attention_cost_tokens,
            max_step_ms=config.max_step_ms,
        )
        self.input_processor = InputProcessor(self.args, tokenizer, self.eos_token_ids, self.max_model_len, capacity,
                                              config.grammar_compile_timeout_s)
        self.work_builder = WorkBuilder(self.input_processor.grammars)
        self.output_processor = OutputProcessor(self.scheduler, self.eos_token_ids, self.max_model_len)
        self._requests: dict[str, Request] = {}
        # counters for metrics (generated tokens and grammar-mask time: see the properties below)
        self.num_steps = 0
        self.num_prompt_tokens = 0  # prompt tokens of admitted requests
        self.num_finished = 0
        self.num_aborted = 0
        self.last_step_stats: Optional[StepStats] = None  # None until a step ran something
        self.num_constrained_requests = 0
        # Optional observers for a metrics layer (called on the step thread; exceptions are ignored):
        # on_step(stats) after every step, on_first_schedule(request, queue_seconds) when a request first runs.
        self.on_step: Optional[Callable[[StepStats], None]] = None
        self.on_first_schedule: Optional[Callable[[Request, float], None]] = None
        self.phase_time_s = {"schedule": 0.0, "execute": 0.0, "process": 0.0}
        self._loop = StepLoop(self)  # the background thread, started by the first stream()
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
            engine = cls(executor, config, tokenizer, load_eos_token_ids(model_dir, executor.args))
            device = parallel.device if parallel is not None and parallel.executor == "local" else "cpu"
            engine.attach_vision(model_dir, device)
            return engine
        except BaseException:
            executor.shutdown()
            raise

    def attach_vision(self, model_dir: str | Path, device: str = "cpu", encoder=None) -> None:
        """Give a model that has an image encoder (Kimi K2.5; otherwise nothing happens) its encoder: ``encoder``
        (anything with ``encode(images) -> embeddings``, e.g. a client of the VisionEncoder pool), else the encoder
        loaded into this process. Requests' images are encoded when they are prepared; their embeddings travel to
        the attention workers with the step's per-sequence input."""
        if self.args.vision is None:
            return
        if encoder is None:
            from k2ray.runtime.vision import VisionRunner

            encoder = VisionRunner(model_dir, self.args, self.config.torch_dtype, device)
        self.input_processor.vision = encoder

    @property
    def num_images_encoded(self) -> int:
        v = self.input_processor.vision
        return getattr(v, "images_encoded", 0)

    # -- requests ------------------------------------------------------------------------------------------------
    def prepare_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        images: list | None = None,
    ) -> Request:
        """Validate and tokenize without touching the scheduler (safe from any thread). Raises ValueError
        (:class:`PromptTooLongError` for length) naming what is wrong. A prepared request that will not be added
        after all must be given back with :meth:`release_prepared`. ``images``
        (:class:`~k2ray.tokenizer.image.ProcessedImage`, one per ``<|media_pad|>`` of the prompt) are encoded
        here."""
        self._check_alive()
        return self.input_processor.prepare(prompt, params, request_id, arrival_time, images)

    def release_prepared(self, req: Request) -> None:
        """Give back the id of a request from :meth:`prepare_request` that will not be added (safe from any
        thread). An added request is stopped with :meth:`abort_request` instead."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id: {req.request_id!r} was added; abort it instead")
        self.input_processor.release_id(req.request_id)

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
        if self._loop.running:
            self._loop.post(Add(req))
            return req.request_id
        return self.add_prepared(req)

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request and free its cache blocks at once. Returns its final output (None if unknown/finished).
        While the background loop runs, the abort is queued to it and None is returned."""
        if self._loop.running:
            self._loop.post(Abort(request_id))
            return None
        return self._abort(request_id)

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        req = self._requests.get(request_id)
        if req is None:
            return None
        self._finish_all(req, FinishReason.ABORT)
        self.num_aborted += 1
        return self._retire(req)

    def _finish_all(self, req: Request, reason: FinishReason) -> None:
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, reason)

    def _retire(self, req: Request) -> RequestOutput:
        """Forget a finished request (its id may be reused); returns its final output."""
        out = make_request_output(req)
        self._requests.pop(req.request_id, None)
        self.input_processor.release_id(req.request_id)
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
        if self._loop.running and not self._loop.on_thread():
            raise RuntimeError("step() is driven by the background loop while streams are open")
        self._check_alive()
        self.follow_layout()
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            self.last_step_stats = None
            return []
        built = self._build(sched.scheduled)
        failed = self._fail_unbuilt(built)
        # Chunks of requests that failed while building (a sibling's matcher, ...) leave the step too.
        keep = [i for i, c in enumerate(built.scheduled) if not c.seq.finished]
        scheduled = [built.scheduled[i] for i in keep]
        step_input = built.step_input
        if len(keep) != len(step_input.seqs):
            step_input = StepInput([step_input.seqs[i] for i in keep])
        t1 = time.perf_counter()
        result = self._execute(step_input, scheduled) if scheduled else StepOutput()
        t2 = time.perf_counter()
        outputs = [self._retire(req) for req in failed] + self._update(scheduled, result)
        t3 = time.perf_counter()
        self.scheduler.observe_step(sched.cost, t3 - t0)  # the whole step: what every decode in it waited
        self._record(StepStats(
            schedule_s=t1 - t0, execute_s=t2 - t1, process_s=t3 - t2,
            num_seqs=len(sched.scheduled), num_batched_tokens=sched.num_batched_tokens,
            num_prefill_tokens=sched.num_prefill_tokens, num_decode_tokens=sched.num_decode_tokens,
            num_preempted=len(sched.preempted), grammar_mask_s=built.grammar_mask_s,
            num_constrained=built.num_constrained, cost=sched.cost, cost_budget=sched.cost_budget,
            executor=result.stats or {},
        ))
        return outputs

    # -- elastic pools --------------------------------------------------------------------------------------------
    def resize(self, attention_workers: int | None = None, expert_shards: int | None = None,
               reason: str = "admin") -> dict:
        """Resize the executor's pools while serving (any thread): the executor prepares the new workers in the
        background; the engine drains removed attention workers and switches at a step boundary
        (:meth:`follow_layout`). Returns the executor's answer at once."""
        resize = getattr(self.executor, "resize", None)
        if resize is None:
            raise ValueError("resizing needs the Ray executor (parallel.executor: ray)")
        out = resize(attention_workers, expert_shards, reason=reason)
        self._loop.wake()
        return out

    def follow_layout(self) -> bool:
        """At a step boundary (owner thread): move towards the executor's pending layout, if any — drain the attention
        workers it removes (migrating their sequences after the drain timeout), and switch once the new workers
        are ready and the removed ones idle. Returns whether a layout change is still pending."""
        pending = getattr(self.executor, "pending_layout", None)
        target = pending() if pending is not None else None
        if target is None:
            self.scheduler.accepting_ranks = len(self.scheduler.managers)  # a drain of an abandoned resize ends
            return False
        keep = target.attention_workers
        if keep < self.num_attention_workers:
            if time.monotonic() >= target.drain_deadline:
                moved = self.scheduler.migrate_from(keep)
                if moved:
                    log.info("%d sequence(s) move off attention worker(s) %d.. by recomputation", len(moved), keep)
            else:
                self.scheduler.drain_from(keep)
        if not target.ready or not self.scheduler.ranks_idle_from(keep):
            return True
        try:
            self.executor.switch_layout()
        except BaseException as e:
            self._fail(e)
            raise
        self.scheduler.set_attention_workers(keep)
        self.num_attention_workers = keep
        return False

    def _fail_unbuilt(self, built: BuiltStep) -> list[Request]:
        """Fail the requests whose work could not be built (only them); returns them, each once."""
        failed: dict[str, Request] = {}
        for c, what in built.failed:
            req = c.seq.request
            if req.request_id not in failed:
                self.output_processor.fail_request(req, what)
                failed[req.request_id] = req
        self.num_finished += len(failed)
        return list(failed.values())

    def _build(self, scheduled: list[ScheduledSeq]) -> BuiltStep:
        """The executor's input for the scheduled chunks; requests running for the first time end their queue time."""
        for c in scheduled:
            req = c.seq.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now = time.monotonic()  # the clock of arrival_time
                if self.on_first_schedule is not None:
                    try:
                        self.on_first_schedule(req, max(0.0, now - req.arrival_time))
                    except Exception:
                        log.debug("on_first_schedule failed", exc_info=True)
        return self.work_builder.build(scheduled)

    def _execute(self, step_input: StepInput, scheduled: list[ScheduledSeq]) -> StepOutput:
        """Run the model; a failure (or a missing result) ends every request and the engine. (A failure of one
        sequence's sampling is not one: its result comes back without a sample and only its request fails.)"""
        try:
            result = self.executor.execute(step_input)
            missing = next((c.seq.seq_id for c in scheduled if c.seq.seq_id not in result.results), None)
            if missing is not None:
                raise RuntimeError(f"executor returned no result for sequence {missing}")
        except BaseException as e:
            self._fail(e)
            raise
        return result

    def _update(self, scheduled: list[ScheduledSeq], result: StepOutput) -> list[RequestOutput]:
        # Commit before appending tokens: blocks published to the prefix cache must hold computed tokens only.
        self.scheduler.commit(scheduled)
        outputs = []
        for req in self.output_processor.process(scheduled, result.results):
            if req.finished:
                self.num_finished += 1
                outputs.append(self._retire(req))
            else:
                outputs.append(make_request_output(req))
        return outputs

    def _record(self, stats: StepStats) -> None:
        self.num_steps += 1
        self.last_step_stats = stats
        if self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:
                log.debug("on_step failed", exc_info=True)
        ph = self.phase_time_s
        ph["schedule"] += stats.schedule_s
        ph["execute"] += stats.execute_s
        ph["process"] += stats.process_s

    def _fail(self, e: BaseException) -> None:
        """The executor failed: every live request ends with an error; the engine accepts no more work."""
        self._dead = e
        msg = f"engine step failed: {type(e).__name__}: {e}"
        log.error(msg)
        for req in list(self._requests.values()):
            req.error = msg
            self._finish_all(req, FinishReason.ERROR)
            self._retire(req)

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError("engine is shut down")
        if self._dead is not None:
            raise EngineDeadError(f"engine failed: {type(self._dead).__name__}: {self._dead}") from self._dead

    # -- metrics --------------------------------------------------------------------------------------------------
    @property
    def num_generation_tokens(self) -> int:  # counted by the output processor
        return self.output_processor.num_generation_tokens

    @property
    def grammar_mask_time_s(self) -> float:  # total over all steps, counted by the work builder
        return self.work_builder.grammar_mask_time_s

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by live sequences (mean over attention workers)."""
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
            "kv_cache_usage_per_attention_worker": [bm.usage for bm in self.scheduler.managers],
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
            "last_step": self.last_step_stats.as_dict() if self.last_step_stats is not None else {},
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
        queue: asyncio.Queue = asyncio.Queue()
        self._ensure_loop()
        self._loop.post(Add(req, Sink(asyncio.get_running_loop(), queue)))
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
                self._loop.post(Abort(req.request_id))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """The final output of one request, through the background loop."""
        last = None
        async for out in self.stream(prompt, params, request_id):
            last = out
        return last

    def start_background(self) -> None:
        """Start the step thread now (the router does, so a resize is followed while no stream is open)."""
        self._ensure_loop()

    def _ensure_loop(self) -> None:
        self._check_alive()
        if not self._loop.running:
            if self._requests:
                raise RuntimeError("stream() cannot start while requests added with add_request() are in flight")
            self._loop.start()

    def handle(self, msg: Message) -> Optional[RequestOutput]:
        """Apply an inbox message (owner thread only): add the request, or abort it (returning its final output)."""
        if isinstance(msg, Add):
            self.add_prepared(msg.request)
            return None
        return self._abort(msg.request_id)

    def fail(self, e: BaseException) -> None:
        """End every request with ``e`` as its error and accept no more work (unless already dead or shut down)."""
        if self._dead is None and not self._closed:
            self._fail(e)

    def dead_error(self) -> EngineDeadError:
        """The error open streams receive when the engine has failed or shut down."""
        if self._dead is not None:
            err = EngineDeadError(f"engine failed: {type(self._dead).__name__}: {self._dead}")
            err.__cause__ = self._dead
            return err
        return EngineDeadError("engine is shut down")

    def shutdown(self) -> None:
        """Stop the background loop (open streams get :class:`EngineDeadError`) and release the executor."""
        if self._closed:
            return
        self._closed = True
        self._loop.stop()
        for req in list(self._requests.values()):
            self._finish_all(req, FinishReason.ABORT)
            self._retire(req)
        self.executor.shutdown()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
