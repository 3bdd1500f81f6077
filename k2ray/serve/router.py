"""K2Router: each Serve replica is the router of ONE model group.

The replica is scheduled in bundle 0 of its own placement group (``placement_group_bundles``, see
:func:`k2ray.serve.app.router_bundles`); bundles 1.. hold the group's attention workers and expert shards, which the
replica starts there with :class:`~k2ray.executor.ray.RayExecutor`. It runs the continuous-batching engine
(:class:`~k2ray.engine.engine.LLMEngine`) and streams each request's progress back to the ingress through a
deployment handle (``handle.options(stream=True).generate.remote(...)``).

Request protocol (plain dicts, cheap to pickle)::

    in:   {"request_id", "prompt_token_ids": [...], "sampling": SamplingParams fields}
    out:  one item per engine step that advanced the request:
          {"outputs": [{"index", "text", "token_ids", "logprobs", "finish_reason", "stop_reason"}], "finished",
           first item only: "num_prompt_tokens", "num_cached_tokens", "prompt_logprobs", "group"}
          or, instead, a single {"error": {"status", "message", "type", "code", "param"}}

``text`` is new text (decoded with special tokens when ``skip_special_tokens`` is false); ``logprobs`` is a list per
new token of ``[[token_id, logprob], ...]`` (the sampled token first). An output appears only when it has something
new or has just finished.

Backpressure: the engine holds at most ``max_num_seqs`` running sequences plus ``max_queued_requests`` waiting ones;
a request beyond that gets an ``overloaded`` 503 at once. Cancelling the handle call (client disconnect) aborts the
request in the engine and frees its cache blocks.

Failure: if the group fails (:class:`~k2ray.executor.ray.ExecutorError` inside the engine), every in-flight request
gets a 503, the replica tears the group down and rebuilds it in the same placement group (new actors, new process
group, weights reloaded); meanwhile new requests get 503 and ``status()`` says ``recovering``. If rebuilding fails
``check_health`` raises, so Serve replaces the whole replica (and its placement group).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from k2ray import logs, metrics
from k2ray.serve.config import ServeArgs

log = logging.getLogger("k2ray.serve.router")

TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
_RECOVERY_ATTEMPTS = 3


def error_item(status: int, message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"status": status, "message": message, "type": type_, "code": code, "param": param}}


def _param_of(message: str) -> Optional[str]:
    """Engine errors start with the parameter's name (``"temperature: must be in [0, 2] ..."``)."""
    head, sep, _ = message.partition(":")
    return head.strip() if sep and head.strip().isidentifier() else None


class _InstrumentedExecutor:
    """The group's executor, seen through a wrapper that records per-step metrics: step time by phase, mean
    all-to-all time per exchange, and tokens per (expert, shard). Everything else is forwarded."""

    def __init__(self, inner, model: str):
        self._inner = inner
        self._model = model
        self._step = {ph: metrics.STEP_SECONDS.labels(model=model, phase=ph) for ph in ("prefill", "decode", "mixed")}
        self._a2a = {op: metrics.ALL_TO_ALL_SECONDS.labels(model=model, op=op) for op in ("dispatch", "combine")}
        args = inner.args
        self._exchanges = max(1, len(args.moe_layers)) * max(1, getattr(inner, "num_partitions", 1))
        shards = getattr(getattr(inner, "parallel", None), "expert_shards", 1)
        # Flushed by the router's poller thread (flush_expert_load), not on the step path.
        # Per-layer series only when the flag is on (K2RAY_METRICS_PER_LAYER_EXPERTS=1): then counts are 3-D.
        self._per_layer = metrics.get_registry().per_layer_experts
        self._layers = list(args.moe_layers)
        self._tracker = metrics.ExpertLoadTracker(
            model, args.n_routed_experts, shards, interval_s=float("inf"),
            **({"num_layers": len(self._layers), "layer_ids": self._layers} if self._per_layer else {}),
        )
        self._tracker_lock = threading.Lock()
        self._shards = shards

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def execute(self, step):
        t0 = time.perf_counter()
        out = self._inner.execute(step)
        dt = time.perf_counter() - t0
        if step.seqs:
            try:
                prefill = any(len(s.token_ids) > 1 or s.sample is None for s in step.seqs)
                decode = any(len(s.token_ids) == 1 and s.sample is not None for s in step.seqs)
                phase = "mixed" if prefill and decode else ("prefill" if prefill else "decode")
                self._step[phase].observe(dt)
                stats = out.stats or {}
                for op in ("dispatch", "combine"):
                    v = stats.get(f"{op}_s")
                    if v:
                        self._a2a[op].observe(v / self._exchanges)
                et = stats.get("expert_tokens")
                if et:
                    import numpy as np

                    n_exp = self._inner.args.n_routed_experts
                    if self._per_layer:
                        counts = np.zeros((len(self._layers), n_exp, self._shards), dtype=np.int64)
                        index = {layer: i for i, layer in enumerate(self._layers)}
                        for (layer, e, s), n in stats.get("expert_layer_tokens", {}).items():
                            counts[index[layer], e, s] += n
                    else:
                        counts = np.zeros((n_exp, self._shards), dtype=np.int64)
                        for (e, s), n in et.items():
                            counts[e, s] += n
                    with self._tracker_lock:
                        self._tracker.add(counts)
            except Exception:  # metrics never break a step
                log.debug("step metrics failed", exc_info=True)
        return out

    def flush_expert_load(self) -> None:
        with self._tracker_lock:
            self._tracker.flush()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        import os

        return f"pid{os.getpid()}"


class K2Router:
    """The router of one model group (a Serve deployment class; see :func:`k2ray.serve.app.build_app`)."""

    def __init__(self, args: dict | ServeArgs):
        from k2ray.checkpoint.builtin import resolve_model

        logs.configure()
        self.args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
        self.model_name = self.args.model_name
        self.model_dir = Path(resolve_model(self.args.model))
        self.group = _replica_id()
        self.tokenizer = None
        self.eos_token_ids = None
        self._state = "starting"
        self._error: Optional[str] = None
        self._inflight = 0  # sequences of requests in the engine (running or waiting)
        self._lock = threading.Lock()
        self.executor = None
        self.engine = None
        self._bound = {
            "prompt": metrics.PROMPT_TOKENS_TOTAL.labels(model=self.model_name),
            "gen": metrics.GENERATION_TOKENS_TOTAL.labels(model=self.model_name),
            "hit": metrics.PREFIX_CACHE_HIT_TOKENS_TOTAL.labels(model=self.model_name),
        }
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
                 self.group, self.model_name, p.attention_workers, p.expert_shards, p.executor, p.device)
        try:
            from k2ray.engine.engine import load_eos_token_ids, load_tokenizer

            self.tokenizer = load_tokenizer(self.model_dir)
            self.eos_token_ids = load_eos_token_ids(self.model_dir)
            self.executor = _InstrumentedExecutor(self._make_executor(), self.model_name)
            self.engine = self._make_engine()
        except Exception as e:
            self._stop.set()
            log.error("model group %s failed to start: %s: %s", self.group, type(e).__name__, e)
            raise
        with self._lock:
            self._state = "ready"
        log.info("model group %s ready in %.1fs: %s", self.group, time.perf_counter() - t0, _layout_line(self.layout()))

    # -- construction ---------------------------------------------------------------------------------------------
    def _make_executor(self):
        p, cfg = self.args.parallel, self.args.engine
        if p.executor == "ray":
            import ray

            from k2ray.executor.ray import RayExecutor

            pg = ray.util.get_current_placement_group()
            if pg is None:  # deployed without placement_group_bundles: the executor reserves its own group
                return RayExecutor(self.model_dir, cfg, p)
            return RayExecutor(self.model_dir, cfg, p, placement_group=pg, bundle_offset=1)
        from k2ray.executor.local import LocalExecutor

        return LocalExecutor(self.model_dir, cfg, device=p.device)

    def _make_engine(self):
        from k2ray.engine.engine import LLMEngine

        engine = LLMEngine(self.executor, self.args.engine, self.tokenizer, self.eos_token_ids)
        queue = metrics.QUEUE_TIME.labels(model=self.model_name)
        mask = metrics.GRAMMAR_MASK_SECONDS.labels(model=self.model_name)
        engine.on_first_schedule = lambda req, seconds: queue.observe(seconds)
        engine.on_step = lambda st: mask.observe(st["grammar_mask_s"]) if st.get("num_constrained") else None
        return engine

    # -- serving --------------------------------------------------------------------------------------------------
    async def generate(self, req: dict) -> AsyncIterator[dict]:
        """Stream one request (see the module docstring for the protocol)."""
        from k2ray.engine.request import EngineDeadError, PromptTooLongError
        from k2ray.runtime.sampling import SamplingParams

        if self._state != "ready":
            yield error_item(503, f"model group {self.group} is {self._state}; retry shortly", "service_unavailable",
                             "model_unavailable")
            return
        try:
            params = SamplingParams(**req.get("sampling", {}))
        except (ValueError, TypeError) as e:
            msg = _validation_message(e)
            yield error_item(400, msg, "invalid_request_error", None, _param_of(msg))
            return
        # Sequences beyond the running batch (max_num_seqs) wait; never more than max_queued_requests of them.
        capacity = self.args.engine.max_num_seqs + self.args.max_queued_requests
        if self._inflight + params.n > capacity:
            yield error_item(503, f"server overloaded: {self.waiting} requests already waiting "
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
            stream = engine.stream(req["prompt_token_ids"], params, req.get("request_id"))
            async with contextlib.aclosing(stream):
                async for out in stream:
                    item = self._pack(out, finished)
                    if first:
                        first = False
                        n_prompt = len(out.prompt_token_ids)
                        item.update(
                            num_prompt_tokens=n_prompt, num_cached_tokens=out.num_cached_tokens, group=self.group,
                            prompt_logprobs=(
                                [None if d is None else list(d.items()) for d in out.prompt_logprobs]
                                if out.prompt_logprobs is not None else None
                            ),
                        )
                        self._bound["prompt"].inc(n_prompt)
                        self._bound["hit"].inc(out.num_cached_tokens)
                    n_new = sum(len(o["token_ids"]) for o in item["outputs"])
                    self._bound["gen"].inc(n_new)
                    yield item
        except PromptTooLongError as e:
            yield error_item(400, str(e), "invalid_request_error", "context_length_exceeded", "messages")
        except EngineDeadError as e:
            self._on_engine_dead(engine, e)
            yield error_item(503, f"model group {self.group} failed; the request was aborted ({e})",
                             "service_unavailable", "model_group_failed")
        except ValueError as e:
            msg = str(e)
            yield error_item(400, msg, "invalid_request_error", None, _param_of(msg))
        finally:
            self._inflight -= params.n

    @staticmethod
    def _pack(out, finished: set[int]) -> dict:
        outs = []
        for o in out.outputs:
            if o.index in finished:
                continue
            done = o.finish_reason is not None
            if not (o.delta_token_ids or o.delta_text or done):
                continue
            if done:
                finished.add(o.index)
            outs.append({
                "index": o.index,
                "text": o.delta_text,
                "token_ids": list(o.delta_token_ids),
                "logprobs": [list(d.items()) for d in o.delta_logprobs] if o.delta_logprobs is not None else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            })
        return {"outputs": outs, "finished": out.finished}

    # -- failure and recovery --------------------------------------------------------------------------------------
    def _on_engine_dead(self, engine, exc: BaseException) -> None:
        with self._lock:
            if engine is not self.engine or self._state != "ready":
                return
            self._state = "recovering"
            self._error = str(exc)
        log.error("model group %s failed: %s; rebuilding", self.group, exc)
        threading.Thread(target=self._recover, args=(engine,), name="k2ray-router-recover", daemon=True).start()

    def _recover(self, engine) -> None:
        try:
            engine.shutdown()  # stops its loop and tears the (already failed) workers down
        except Exception:
            log.warning("shutting the failed engine down raised", exc_info=True)
        for attempt in range(1, _RECOVERY_ATTEMPTS + 1):
            try:
                inner = self.executor._inner
                if hasattr(inner, "rebuild"):
                    inner.rebuild()
                else:
                    self.executor = _InstrumentedExecutor(self._make_executor(), self.model_name)
                self.engine = self._make_engine()
                with self._lock:
                    self._state, self._error = "ready", None
                log.info("model group %s rebuilt (attempt %d)", self.group, attempt)
                return
            except Exception as e:
                self._error = f"rebuild attempt {attempt} failed: {type(e).__name__}: {e}"
                log.error("model group %s: %s", self.group, self._error)
                time.sleep(min(10.0, 2.0 * attempt))
        with self._lock:
            self._state = "dead"

    def check_health(self) -> None:
        """Serve's health check: raise when the group is dead (rebuilding failed) so Serve replaces the replica."""
        if self._state == "dead":
            raise RuntimeError(f"model group {self.group} is dead: {self._error}")
        ex = self.executor
        failed = getattr(getattr(ex, "_inner", None), "failed", None) if ex is not None else None
        eng = self.engine
        if failed and self._state == "ready" and eng is not None:
            # The group failed while idle (no stream saw it): start recovering now.
            from k2ray.engine.request import EngineDeadError

            self._on_engine_dead(eng, EngineDeadError(failed))

    # -- information ----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"group": self.group, "state": self._state, "error": self._error, "inflight": self._inflight}

    @property
    def waiting(self) -> int:
        return max(0, self._inflight - self.args.engine.max_num_seqs)

    def info(self) -> dict:
        eng = self.engine
        if eng is None:
            raise RuntimeError(f"model group {self.group} is {self._state}")
        return {
            "model": self.model_name,
            "group": self.group,
            "max_model_len": eng.max_model_len,
            "vocab_size": eng.args.vocab_size,
            "eos_token_ids": sorted(eng.eos_token_ids),
            "guided_field": _guided_field(),
        }

    def tokenizer_files(self) -> dict[str, bytes]:
        """The model's tokenizer and chat-template files, so an ingress on another node needs no checkpoint."""
        return {n: (self.model_dir / n).read_bytes() for n in TOKENIZER_FILES if (self.model_dir / n).is_file()}

    def layout(self) -> dict:
        inner = getattr(self.executor, "_inner", self.executor)
        base = {"model": self.model_name, "group": self.group, "state": self._state}
        p = self.args.parallel
        if hasattr(inner, "describe"):
            base.update(inner.describe())
        else:
            base.update({"executor": "local", "device": p.device})
        base["parallel"] = {"executor": p.executor, "attention_workers": p.attention_workers,
                            "expert_shards": p.expert_shards, "device": p.device}
        return base

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
            except Exception:
                log.debug("gauge poll failed", exc_info=True)

    def __del__(self):  # pragma: no cover - best effort at replica shutdown
        try:
            self._stop.set()
            if self.engine is not None:
                self.engine.shutdown()
        except Exception:
            pass


def _layout_line(layout: dict) -> str:
    """One log line of where the group's actors run (pid@node of each attention worker and expert shard)."""
    def where(actors) -> str:
        return ", ".join(f"pid {a.get('pid')}@{a.get('node_ip', a.get('node', '?'))}" for a in actors or [])

    if "attention_workers" not in layout:
        return f"local executor on {layout.get('device')}"
    return (f"{len(layout['attention_workers'])} attention worker(s) [{where(layout['attention_workers'])}] + "
            f"{len(layout.get('expert_shards', []))} expert shard(s) [{where(layout.get('expert_shards'))}]")


def _guided_field() -> Optional[str]:
    """The SamplingParams field that takes a grammar constraint (``GuidedDecoding``), if the engine has one."""
    from k2ray.runtime.sampling import SamplingParams

    for name, f in SamplingParams.model_fields.items():
        if "GuidedDecoding" in str(f.annotation):
            return name
    return None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _validation_message(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            msg = str(first.get("msg", e)).removeprefix("Value error, ")
            loc = ".".join(str(x) for x in first.get("loc", ()))
            return msg if not loc or msg.startswith(loc) else f"{loc}: {msg}"
        except Exception:
            pass
    return str(e)
