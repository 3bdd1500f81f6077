"""K2Router: the model-group server. Each Serve replica is the router actor of ONE model group.

The replica is scheduled in bundle 0 of its own placement group (``placement_group_bundles``, see
:func:`k2ray.serve.app.router_bundles`); bundles 1.. hold the group's attention workers and expert shards, which the
replica starts there (:func:`k2ray.executor.build.build_executor`). It runs the continuous-batching engine
(:class:`~k2ray.engine.engine.LLMEngine`) and streams each request's progress back to the ingress through a
deployment handle (``handle.options(stream=True).generate.remote(...)``), in the typed messages of
:mod:`k2ray.serve.wire`: a :class:`~k2ray.serve.wire.GenerateRequest` in, :class:`~k2ray.serve.wire.GenerateChunk` s
out (a sequence appears in a chunk only when it has something new or has just finished), or one
:class:`~k2ray.serve.wire.GenerateError`.

Backpressure: the engine holds at most ``max_num_seqs`` running sequences plus ``max_queued_requests`` waiting ones;
a request beyond that gets an ``overloaded`` 503 at once. Cancelling the handle call (client disconnect) aborts the
request in the engine and frees its cache blocks.

Preparing a request (validation, tokenization, grammar compilation, which can take seconds for a large schema) runs
on a small thread pool of the router, never on its event loop, so one request's schema never stalls the others'
streams or Serve's health checks.

Failure: a failure that belongs to one request (its sampling, its output processing) ends that request alone with a
500. If the group fails (:class:`~k2ray.executor.ray.ExecutorError` inside the engine: a dead worker, a stalled
collective), every in-flight request gets a 503, the replica tears the group down and rebuilds it in the same
placement group (new actors, new process group, weights reloaded); meanwhile new requests get 503 and ``status()``
says ``recovering``. While the group is idle the poller thread pings its workers every
``_HEARTBEAT_INTERVAL_S``, so a worker that died between requests starts the rebuild at once instead of failing the
next request. If rebuilding fails ``check_health`` raises, so Serve replaces the whole replica (and its placement
group).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from k2ray import logs, metrics
from k2ray.config import POOLS
from k2ray.parallel.elastic import ElasticPolicy, PoolSignals
from k2ray.runtime.sampling import ParamError
from k2ray.serve.config import ServeArgs
from k2ray.serve.step_metrics import MeteredExecutor
from k2ray.serve.wire import GenerateChunk, GenerateError, GenerateRequest, SequenceDelta

log = logging.getLogger("k2ray.serve.router")

TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "preprocessor_config.json")
_RECOVERY_ATTEMPTS = 3
_PREPARE_THREADS = 2  # requests validated / tokenized / grammar-compiled at once, off the event loop
_HEARTBEAT_INTERVAL_S = 2.0  # how often an idle group's workers are pinged
_HEARTBEAT_TIMEOUT_S = 1.0  # a worker that has not answered by then is not judged (only a dead one is)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        import os

        return f"pid{os.getpid()}"


class K2Router:
    """The router of one model group (a Serve deployment class; see :func:`k2ray.serve.app.build_app`)."""

    def __init__(self, args: dict | ServeArgs, vision=None):
        from k2ray.checkpoint.builtin import resolve_model

        logs.configure()
        self.args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
        self.model_name = self.args.model_name
        self.model_dir = Path(resolve_model(self.args.model))
        self.group_id = _replica_id()
        self.vision = vision  # handle of the VisionEncoder deployment (vision_workers > 0), else None
        self.tokenizer = None
        self.eos_token_ids = None
        self._state = "starting"
        self._error: Optional[str] = None
        self._inflight = 0  # sequences of requests in the engine (running or waiting)
        self._lock = threading.Lock()
        self.executor = None  # the group's executor, metered
        self.engine = None
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(_PREPARE_THREADS,
                                                                   thread_name_prefix="k2ray-router-prepare")
        self._bound = {
            "prompt": metrics.PROMPT_TOKENS_TOTAL.labels(model=self.model_name),
            "gen": metrics.GENERATION_TOKENS_TOTAL.labels(model=self.model_name),
            "hit": metrics.PREFIX_CACHE_HIT_TOKENS_TOTAL.labels(model=self.model_name),
        }
        p = self.args.parallel
        self._policy = ElasticPolicy(p.elastic, p.pool_bounds("attention_workers"), p.pool_bounds("expert_shards")) if (
            p.elastic_pools and p.elastic.policy) else None  # resizes the pools on the group's own signals
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_gauges, name="k2ray-router-gauges", daemon=True)
        self._poller.start()
        # The replica is not running (Serve sends it nothing) until its group is ready; meanwhile the ingress's
        # /health answers "starting" after a short wait instead of hanging.
        self._start_group()

    def _start_group(self) -> None:
        t0 = time.perf_counter()
        p = self.args.parallel
        log.info("model group %s starting: %s, %d attention worker(s) + %d expert shard(s), %s executor on %s",
                 self.group_id, self.model_name, p.attention_workers, p.expert_shards, p.executor, p.device)
        try:
            from k2ray.engine.input_processor import load_eos_token_ids, load_tokenizer

            self.tokenizer = load_tokenizer(self.model_dir)
            self.eos_token_ids = load_eos_token_ids(self.model_dir)
            shards = p.pool_bounds("expert_shards")[1]  # the most the group may have
            self.executor = MeteredExecutor(self._make_executor(), self.model_name, shards)
            self.engine = self._make_engine()
        except Exception as e:
            self._stop.set()
            log.error("model group %s failed to start: %s: %s", self.group_id, type(e).__name__, e)
            raise
        with self._lock:
            self._state = "ready"
        log.info("model group %s ready in %.1fs: %s", self.group_id, time.perf_counter() - t0, _layout_line(self.layout()))

    # -- construction ---------------------------------------------------------------------------------------------
    def _make_executor(self):
        from k2ray.executor.build import build_executor

        p = self.args.parallel
        pg = None
        if p.executor == "ray":
            import ray

            # None when deployed without placement_group_bundles: the executor reserves its own group then.
            pg = ray.util.get_current_placement_group()
        # Bundle 0 of the replica's placement group is the router itself; the workers go in bundles 1..
        return build_executor(self.model_dir, self.args.engine, p, placement_group=pg,
                              bundle_offset=0 if pg is None else 1)

    def _make_engine(self):
        from k2ray.engine.engine import LLMEngine

        engine = LLMEngine(self.executor, self.args.engine, self.tokenizer, self.eos_token_ids)
        p = self.args.parallel
        remote = _VisionPoolClient(self.vision) if self.vision is not None else None
        engine.attach_vision(self.model_dir, "cuda" if p.device == "cuda" and self.args.router_gpus > 0 else "cpu",
                             encoder=remote)
        if remote is None and engine.input_processor.vision is not None:
            encoded = metrics.VISION_IMAGES_ENCODED_TOTAL.labels(model=self.model_name)
            engine.input_processor.vision.on_encoded = encoded.inc
        queue = metrics.QUEUE_TIME.labels(model=self.model_name)
        mask = metrics.GRAMMAR_MASK_SECONDS.labels(model=self.model_name)
        engine.on_first_schedule = lambda req, seconds: queue.observe(seconds)
        engine.on_step = lambda st: mask.observe(st.grammar_mask_s) if st.num_constrained else None
        if p.elastic_pools:
            engine.start_background()  # follows a resize while no stream is open
        return engine

    # -- serving --------------------------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk | GenerateError]:
        """Stream one request: a :class:`GenerateChunk` per engine step that advanced it, or one
        :class:`GenerateError` (see :mod:`k2ray.serve.wire`)."""
        from k2ray.engine.request import EngineDeadError, PromptTooLongError

        if self._state != "ready":
            yield GenerateError(503, f"model group {self.group_id} is {self._state}; retry shortly", "service_unavailable",
                                "model_unavailable", retry_elsewhere=True)
            return
        params = req.sampling
        # Sequences beyond the running batch (max_num_seqs) wait; never more than max_queued_requests of them.
        capacity = self.args.group_capacity
        if self._inflight + params.n > capacity:
            yield GenerateError(503, f"server overloaded: {self.waiting} requests already waiting "
                                     f"(max_queued_requests={self.args.max_queued_requests}); retry later",
                                "service_unavailable", "overloaded")
            return
        engine = self.engine
        if params.guided_decoding is not None:
            metrics.CONSTRAINED_REQUESTS_TOTAL.inc(model=self.model_name)
        self._inflight += params.n
        first = True
        finished: set[int] = set()
        try:
            prepared = await self._prepare(engine, req)
            stream = engine.stream(prepared)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.error is not None and out.finished:
                        # Something of this request alone failed in the step; the others went on.
                        yield GenerateError(500, out.error, "internal_error", "request_failed")
                        return
                    chunk = self._chunk(out, finished, first)
                    if first:
                        first = False
                        self._bound["prompt"].inc(chunk.num_prompt_tokens)
                        self._bound["hit"].inc(chunk.num_cached_tokens)
                    self._bound["gen"].inc(chunk.num_new_tokens)
                    yield chunk
        except PromptTooLongError as e:
            yield GenerateError(400, str(e), code="context_length_exceeded", param="messages")
        except EngineDeadError as e:
            self._on_engine_dead(engine, e)
            yield GenerateError(503, f"model group {self.group_id} failed; the request was aborted", "service_unavailable",
                                "model_group_failed")
        except ParamError as e:
            yield GenerateError(400, str(e), param=e.param)
        except ValueError as e:
            yield GenerateError(400, str(e))
        finally:
            self._inflight -= params.n

    async def _prepare(self, engine, req: GenerateRequest):
        """Validate, tokenize and compile the grammar of ``req`` on the prepare pool (the event loop keeps serving
        the other streams meanwhile). If the caller goes away first, the prepared request is given back."""
        fut = self._prepare_pool.submit(engine.prepare_request, req.prompt_token_ids, req.sampling, req.request_id,
                                        None, req.images or None)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda f: _release_prepared(engine, f))
            raise

    def _chunk(self, out, finished: set[int], first: bool) -> GenerateChunk:
        """The engine's output for a request -> what is new for each of its sequences (finished ones once)."""
        deltas = []
        for o in out.outputs:
            if o.index in finished or not (o.delta_token_ids or o.delta_text or o.finish_reason is not None):
                continue
            if o.finish_reason is not None:
                finished.add(o.index)
            deltas.append(SequenceDelta(
                index=o.index, text=o.delta_text, token_ids=list(o.delta_token_ids),
                logprobs=[list(d.items()) for d in o.delta_logprobs] if o.delta_logprobs is not None else None,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason,
            ))
        if not first:
            return GenerateChunk(outputs=deltas, finished=out.finished)
        prompt_lp = out.prompt_logprobs
        return GenerateChunk(
            outputs=deltas, finished=out.finished, num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens, model_group=self.group_id,
            prompt_logprobs=[None if d is None else list(d.items()) for d in prompt_lp] if prompt_lp is not None else None,
        )

    # -- failure and recovery --------------------------------------------------------------------------------------
    def _on_engine_dead(self, engine, exc: BaseException) -> None:
        with self._lock:
            if engine is not self.engine or self._state != "ready":
                return
            self._state = "recovering"
            self._error = str(exc)
        log.error("model group %s failed: %s; rebuilding", self.group_id, exc)
        threading.Thread(target=self._recover, args=(engine,), name="k2ray-router-recover", daemon=True).start()

    def _recover(self, engine) -> None:
        try:
            engine.shutdown()  # stops its loop and tears the (already failed) workers down
        except Exception:
            log.warning("shutting the failed engine down raised", exc_info=True)
        for attempt in range(1, _RECOVERY_ATTEMPTS + 1):
            try:
                self.executor.rebuild()
                self.engine = self._make_engine()
                with self._lock:
                    self._state, self._error = "ready", None
                log.info("model group %s rebuilt (attempt %d)", self.group_id, attempt)
                return
            except Exception as e:
                self._error = f"rebuild attempt {attempt} failed: {type(e).__name__}: {e}"
                log.error("model group %s: %s", self.group_id, self._error)
                time.sleep(min(10.0, 2.0 * attempt))
        with self._lock:
            self._state = "dead"

    def check_health(self) -> None:
        """Serve's health check: raise when the group is dead (rebuilding failed) so Serve replaces the replica."""
        if self._state == "dead":
            raise RuntimeError(f"model group {self.group_id} is dead: {self._error}")
        failed = self.executor.failed if self.executor is not None else None
        eng = self.engine
        if failed and self._state == "ready" and eng is not None:
            # The group failed while idle (no stream saw it): start recovering now.
            from k2ray.engine.request import EngineDeadError

            self._on_engine_dead(eng, EngineDeadError(failed))

    # -- information ----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"group": self.group_id, "state": self._state, "error": self._error, "inflight": self._inflight}

    @property
    def waiting(self) -> int:
        return max(0, self._inflight - self.args.engine.max_num_seqs)

    def info(self) -> dict:
        eng = self.engine
        if eng is None:
            raise RuntimeError(f"model group {self.group_id} is {self._state}")
        return {
            "model": self.model_name,
            "group": self.group_id,
            "max_model_len": eng.max_model_len,
            "vocab_size": eng.args.vocab_size,
            "eos_token_ids": sorted(eng.eos_token_ids),
            "vision": eng.args.vision is not None,  # accepts image parts (Kimi K2.5)
        }

    def tokenizer_files(self) -> dict[str, bytes]:
        """The model's tokenizer and chat-template files, so an ingress on another node needs no checkpoint."""
        return {n: (self.model_dir / n).read_bytes() for n in TOKENIZER_FILES if (self.model_dir / n).is_file()}

    def layout(self) -> dict:
        base = {"model": self.model_name, "group": self.group_id, "state": self._state}
        p = self.args.parallel
        if self.executor is not None:
            base.update(self.executor.describe())
        now = getattr(getattr(self.executor, "inner", None), "layout", None)  # the pools' sizes now (elastic)
        base["parallel"] = {"executor": p.executor,
                            "attention_workers": now.attention_workers if now else p.attention_workers,
                            "expert_shards": now.expert_shards if now else p.expert_shards, "device": p.device}
        if p.elastic_pools:
            base["parallel"]["elastic"] = {pool: dict(zip(("min", "max"), p.pool_bounds(pool))) for pool in POOLS}
        return base

    async def rebalance(self) -> dict:
        """Admin: plan a balanced expert placement from the measured load and switch the group to it at a step
        boundary once every worker has loaded its new experts (in the background; requests in flight go on).
        Answers the mean balancedness predicted for the current and the new placement; planning runs off the event
        loop."""
        ex = self.executor
        if self._state != "ready" or ex is None:
            return {"started": False, "reason": f"model group {self.group_id} is {self._state}"}
        try:
            out = await asyncio.to_thread(ex.rebalance)
        except ValueError as e:  # the local executor has a single shard: nothing to balance
            return {"started": False, "reason": str(e)}
        return _json_safe({"group": self.group_id, **out})

    async def resize(self, attention_workers: int | None = None, expert_shards: int | None = None) -> dict:
        """Admin: resize the pools (within ``parallel.elastic``); answers at once, the switch follows at a step
        boundary once the added workers are loaded. A size outside the range answers ``error_param``."""
        eng = self.engine
        if self._state != "ready" or eng is None:
            return {"started": False, "reason": f"model group {self.group_id} is {self._state}"}
        try:
            out = await asyncio.to_thread(eng.resize, attention_workers, expert_shards, "admin")
        except ValueError as e:
            param = next((f for f in ("attention_workers", "expert_shards") if str(e).startswith(f)), None)
            return {"started": False, "reason": str(e), "error_param": param}
        if out.get("started") and self._policy is not None:
            self._policy.resized(time.monotonic())
        return _json_safe({"group": self.group_id, **out})

    def _autoscale(self) -> None:
        """The router's own resize policy (k2ray/parallel/elastic.py), once a second on the poller thread."""
        pol, eng, ex = self._policy, self.engine, self.executor
        if pol is None or self._state != "ready" or eng is None or ex is None:
            return
        now = time.monotonic()
        pol.observe(PoolSignals(now, eng.kv_cache_usage(), eng.num_waiting, ex.take_expert_wait()))
        if ex.pending_layout() is not None:
            pol.resized(now)  # the cooldown counts from the switch; signals of the old layout are dropped
            return
        d = pol.decide(now, eng.num_attention_workers, ex.inner.layout.expert_shards)
        if d is None:
            return
        out = eng.resize(d.attention_workers, d.expert_shards, reason=f"policy: {d.reason}")
        if out.get("started"):
            pol.resized(now)
            log.info("model group %s: %s %s to %d (%s)", self.group_id, d.pool, d.direction,
                     getattr(d, d.pool), d.reason)

    def stats(self) -> dict:
        eng = self.engine
        out = self.status()
        out.update(eng.metrics() if eng is not None else {})
        if eng is not None:
            out["num_free_blocks"] = eng.num_free_blocks()
            out["num_kv_blocks"] = eng.num_kv_blocks
        return _json_safe(out)

    # -- gauges -----------------------------------------------------------------------------------------------------
    def _poll_gauges(self) -> None:
        m = self.model_name
        running = metrics.REQUESTS_RUNNING.labels(model=m)
        waiting = metrics.REQUESTS_WAITING.labels(model=m)
        kv = metrics.KV_CACHE_USAGE.labels(model=m)
        last_beat = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                eng = self.engine
                if eng is None:
                    continue
                running.set(eng.num_running)
                waiting.set(eng.num_waiting)
                kv.set(eng.kv_cache_usage())
                if self.executor is not None:
                    self.executor.flush_expert_load()
                self._autoscale()
            except Exception:
                log.debug("gauge poll failed", exc_info=True)
            if time.monotonic() - last_beat >= _HEARTBEAT_INTERVAL_S:
                last_beat = time.monotonic()
                try:
                    self._heartbeat()
                except Exception:
                    log.debug("heartbeat failed", exc_info=True)

    def _heartbeat(self) -> None:
        """While the group is idle, ping its workers; a dead one starts the rebuild now (``status()`` says
        ``recovering`` at once) rather than failing the next request. Busy groups are watched by their steps."""
        eng, ex = self.engine, self.executor
        if self._state != "ready" or eng is None or ex is None or self._inflight or eng.has_unfinished_requests():
            return
        failed = ex.heartbeat(_HEARTBEAT_TIMEOUT_S)
        if failed:
            from k2ray.engine.request import EngineDeadError

            self._on_engine_dead(eng, EngineDeadError(failed))

    def __del__(self):  # pragma: no cover - best effort at replica shutdown
        try:
            self._stop.set()
            self._prepare_pool.shutdown(wait=False)
            if self.engine is not None:
                self.engine.shutdown()
        except Exception:
            pass


class _VisionPoolClient:
    """The engine's image encoder when it is the shared VisionEncoder deployment: called on the prepare threads
    (never on the event loop); the embeddings come back through the object store."""

    def __init__(self, handle):
        self.handle = handle

    def encode(self, images: list) -> list:
        return self.handle.encode.remote(images).result(timeout_s=_VISION_TIMEOUT_S)


_VISION_TIMEOUT_S = 300.0


def _release_prepared(engine, fut: concurrent.futures.Future) -> None:
    """Give back a request prepared for a caller that left (its id would otherwise stay reserved)."""
    if not fut.cancelled() and fut.exception() is None:
        with contextlib.suppress(Exception):
            engine.release_prepared(fut.result())


def _layout_line(layout: dict) -> str:
    """One log line of where the group's actors run (pid@node of each attention worker and expert shard)."""
    def where(actors) -> str:
        return ", ".join(f"pid {a.get('pid')}@{a.get('node_ip', a.get('node', '?'))}" for a in actors or [])

    if "attention_workers" not in layout:
        return f"local executor on {layout.get('device')}"
    return (f"{len(layout['attention_workers'])} attention worker(s) [{where(layout['attention_workers'])}] + "
            f"{len(layout.get('expert_shards', []))} expert shard(s) [{where(layout.get('expert_shards'))}]")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
