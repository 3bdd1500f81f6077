"""Every metric k2ray exports, in one place.

Recording
---------
Callers use the module-level handles; labels are keyword arguments and must be exactly the metric's label set::

    from k2ray import metrics

    metrics.REQUESTS_TOTAL.inc(model="kimi-k2", finish_reason="stop")
    metrics.GENERATION_TOKENS_TOTAL.inc(17, model="kimi-k2")
    metrics.TTFT.observe(0.12, model="kimi-k2")
    metrics.KV_CACHE_USAGE.set(0.3, model="kimi-k2")
    metrics.STEP_SECONDS.observe(0.004, model="kimi-k2", phase="decode")
    metrics.record_expert_load("kimi-k2", counts)   # counts[expert, shard]; sets the imbalance gauge too

Hot paths can bind labels once: ``ttft = metrics.TTFT.labels(model="kimi-k2"); ttft.observe(dt)``.
Counters ignore increments of 0 and reject negative ones.

Backends
--------
Nothing is created at import time and importing this module never imports or starts Ray. At the first recording the
default registry picks its backend once per process:

* ``ray``: when Ray is initialized in this process (a Ray worker, actor, Serve replica or a driver after
  ``ray.init``): ``ray.util.metrics`` Counter/Gauge/Histogram. Every process reports to its node's metrics agent,
  which serves all of them on the node's Prometheus endpoint (``ray start --metrics-export-port=PORT`` or
  ``ray.init(_metrics_export_port=PORT)``; the port is also in ``/tmp/ray/prom_metrics_service_discovery.json``).
* ``prometheus``: otherwise: ``prometheus_client`` metrics in a private ``CollectorRegistry``;
  expose it with :func:`start_http_server` or read it with :func:`exposition`.

``configure(backend=...)`` forces a backend (and resets the default registry); :class:`MetricsRegistry` gives an
independent registry (``registry.get(metrics.TTFT).observe(...)``), which tests use.

What Prometheus receives (measured with Ray 2.60, whose default metrics path is OpenTelemetry)
--------------------------------------------------------------------------------------------
Ray prefixes every name with ``ray_``. For a metric registered here as ``k2ray_x``:

* Counter ``k2ray_x_total`` -> ``ray_k2ray_x_total`` (TYPE counter). Ray appends ``_total`` only to counter names
  that lack it (``Counter("foo")`` arrives as ``ray_foo_total``), so every counter here already ends in ``_total``
  and arrives exactly once suffixed. No gauge twin is exported on this path.
* Gauge ``k2ray_x`` -> ``ray_k2ray_x``.
* Histogram ``k2ray_x_seconds`` -> ``ray_k2ray_x_seconds_bucket{le="..."}`` (``le`` rendered like Python floats:
  ``"0.1"``, ``"1.0"``, ``"+Inf"``), ``ray_k2ray_x_seconds_count`` and ``ray_k2ray_x_seconds_sum``. Bucket counts
  and ``_count`` are exact; ``_sum`` is NOT: Ray re-records each observation at its bucket's midpoint (an
  observation above the last bound counts as twice that bound), so averages from ``_sum/_count`` are approximate.
  The dashboard uses quantiles from buckets.
* Besides the labels given here every series carries ``Component``, ``NodeAddress``, ``SessionName``, ``Version``,
  ``WorkerId`` and ``otel_scope_*`` labels, i.e. one series per process: always aggregate
  (``sum by (model) (...)``) in queries.
* Values arrive at the agent every ``metrics_report_interval_ms`` (default 10 s; tests use 1 s via
  ``_system_config``), so a scrape sees a value up to one interval late. A gauge a live process no longer re-reports
  ages out after two intervals; a live process keeps re-reporting its last value.

The ``prometheus`` backend exposes the names without the ``ray_`` prefix (``k2ray_requests_total``, plus
``prometheus_client``'s ``_created`` series); a ``metric_relabel_configs`` rule (docs/observability.md) adds the
prefix so that the same dashboard serves both.

Per-layer expert load (``k2ray_expert_layer_tokens_total``, 60 layers x 384 experts of series) is recorded only when
enabled: ``K2RAY_METRICS_PER_LAYER_EXPERTS=1`` in the recording process's environment (for Ray actors: the
``runtime_env`` ``env_vars``) or ``configure(per_layer_experts=True)``. Otherwise recording it is a no-op.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "Metric",
    "MetricsRegistry",
    "ALL_METRICS",
    "LATENCY_BUCKETS",
    "TOKEN_LATENCY_BUCKETS",
    "FAST_BUCKETS",
    "RAY_PREFIX",
    "PER_LAYER_ENV",
    "configure",
    "get_registry",
    "by_name",
    "exported_names",
    "exposition",
    "start_http_server",
    "record_expert_load",
    "ExpertLoadTracker",
]

RAY_PREFIX = "ray_"
PER_LAYER_ENV = "K2RAY_METRICS_PER_LAYER_EXPERTS"

# Request-level latencies (queue, TTFT, end-to-end): 1 ms .. 10 min.
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0,
)
# Per-token and per-step latencies (ITL, engine step): 0.5 ms .. 2 min, fine around decode speeds.
TOKEN_LATENCY_BUCKETS: Tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0,
)
# Sub-step operations (all-to-all, grammar masks): 10 us .. 10 s.
FAST_BUCKETS: Tuple[float, ...] = (
    1e-05, 2.5e-05, 5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------------------------
# Metric definitions (backend-independent handles)
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    kind: str  # "counter" | "gauge" | "histogram"
    name: str
    description: str
    labels: Tuple[str, ...]
    buckets: Tuple[float, ...] = ()
    per_layer: bool = False


class Metric:
    """A metric definition. Recording goes to the default registry (see :func:`get_registry`)."""

    kind = ""

    def __init__(self, name: str, description: str, labels: Sequence[str], buckets: Sequence[float] = (),
                 per_layer: bool = False):
        if self.kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total (Ray and prometheus_client would add it)")
        if self.kind == "histogram" and (not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0):
            raise ValueError(f"histogram {name!r} needs strictly increasing positive buckets")
        self.spec = _Spec(self.kind, name, description, tuple(labels), tuple(float(b) for b in buckets), per_layer)

    name = property(lambda self: self.spec.name)
    labelnames = property(lambda self: self.spec.labels)
    buckets = property(lambda self: self.spec.buckets)
    description = property(lambda self: self.spec.description)
    per_layer = property(lambda self: self.spec.per_layer)

    def labels(self, **labels: Any) -> "_Bound":
        """Labels bound once, for hot paths (validated now, not at every record)."""
        return _Bound(self, None, _check_labels(self.spec, labels))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r}, labels={self.spec.labels})"

    def __reduce__(self):  # pickled by reference: the receiving process records through its own registry
        return by_name, (self.spec.name,)


class Counter(Metric):
    kind = "counter"

    def inc(self, value: float = 1.0, **labels: Any) -> None:
        get_registry().record(self, value, labels)


class Gauge(Metric):
    kind = "gauge"

    def set(self, value: float, **labels: Any) -> None:
        get_registry().record(self, value, labels)


class Histogram(Metric):
    kind = "histogram"

    def observe(self, value: float, **labels: Any) -> None:
        get_registry().record(self, value, labels)


class _Bound:
    """A metric with its labels fixed, recording into one registry (None: the default one at each record)."""

    __slots__ = ("_metric", "_registry", "_tags")

    def __init__(self, metric: Metric, registry: Optional["MetricsRegistry"], tags: Dict[str, str]):
        self._metric, self._registry, self._tags = metric, registry, tags

    def _rec(self, value: float) -> None:
        (self._registry or get_registry())._record_checked(self._metric, value, self._tags)

    def inc(self, value: float = 1.0) -> None:
        if self._metric.kind != "counter":
            raise TypeError(f"{self._metric.name} is a {self._metric.kind}, not a counter")
        self._rec(value)

    def set(self, value: float) -> None:
        if self._metric.kind != "gauge":
            raise TypeError(f"{self._metric.name} is a {self._metric.kind}, not a gauge")
        self._rec(value)

    def observe(self, value: float) -> None:
        if self._metric.kind != "histogram":
            raise TypeError(f"{self._metric.name} is a {self._metric.kind}, not a histogram")
        self._rec(value)


# ---- traffic ----
REQUESTS_TOTAL = Counter(
    "k2ray_requests_total", "Finished requests, by finish reason (stop, length, tool_calls, abort, ...).",
    ("model", "finish_reason"))
REQUEST_ERRORS_TOTAL = Counter(
    "k2ray_request_errors_total", "Requests that failed, by HTTP status code.", ("model", "status"))
PROMPT_TOKENS_TOTAL = Counter(
    "k2ray_prompt_tokens_total", "Prompt tokens of admitted requests.", ("model",))
GENERATION_TOKENS_TOTAL = Counter(
    "k2ray_generation_tokens_total", "Generated (output) tokens.", ("model",))
PREFIX_CACHE_HIT_TOKENS_TOTAL = Counter(
    "k2ray_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache (not recomputed).",
    ("model",))
# ---- latency ----
TTFT = Histogram(
    "k2ray_time_to_first_token_seconds", "Time from request arrival to its first output token.", ("model",),
    LATENCY_BUCKETS)
ITL = Histogram(
    "k2ray_inter_token_latency_seconds", "Time between consecutive output tokens of a request.", ("model",),
    TOKEN_LATENCY_BUCKETS)
E2E_LATENCY = Histogram(
    "k2ray_e2e_request_latency_seconds", "Time from request arrival to its last token.", ("model",),
    LATENCY_BUCKETS)
QUEUE_TIME = Histogram(
    "k2ray_queue_time_seconds", "Time a request waited before it was first scheduled.", ("model",),
    LATENCY_BUCKETS)
# ---- engine ----
STEP_SECONDS = Histogram(
    "k2ray_step_seconds", "Duration of one engine step, by phase (prefill, decode, mixed).", ("model", "phase"),
    TOKEN_LATENCY_BUCKETS)
REQUESTS_RUNNING = Gauge(
    "k2ray_requests_running", "Requests in the running batch.", ("model",))
REQUESTS_WAITING = Gauge(
    "k2ray_requests_waiting", "Requests waiting to be scheduled.", ("model",))
KV_CACHE_USAGE = Gauge(
    "k2ray_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1), per attention worker.", ("model",))
# ---- expert parallelism ----
ALL_TO_ALL_SECONDS = Histogram(
    "k2ray_all_to_all_seconds",
    "Attention-side time of one MoE layer's all-to-all, by op: dispatch (sending the rows), combine (waiting for the "
    "experts' results after the shared expert ran meanwhile).",
    ("model", "op"), FAST_BUCKETS)
EXPERT_TOKENS_TOTAL = Counter(
    "k2ray_expert_tokens_total", "Tokens routed to a logical expert on a physical shard, summed over MoE layers.",
    ("model", "expert", "shard"))
EXPERT_LAYER_TOKENS_TOTAL = Counter(
    "k2ray_expert_layer_tokens_total",
    f"Tokens routed to a logical expert on a shard, per MoE layer (only when {PER_LAYER_ENV}=1).",
    ("model", "layer", "expert", "shard"), per_layer=True)
EXPERT_SHARD_IMBALANCE = Gauge(
    "k2ray_expert_shard_imbalance_ratio",
    "Max over mean of the token load across expert shards in the last reporting window (1 = balanced).",
    ("model",))
EXPERT_BALANCEDNESS = Gauge(
    "k2ray_expert_balancedness",
    "Mean over max of the tokens each expert shard computes, per MoE layer and as the mean over layers "
    "(layer=\"mean\"), over the EPLB load window (1 = balanced).",
    ("model", "layer"))
EPLB_REBALANCES_TOTAL = Counter(
    "k2ray_eplb_rebalances_total", "Live expert rebalances: switches of the group to a new expert placement.",
    ("model",))
EPLB_SWITCH_SECONDS = Histogram(
    "k2ray_eplb_switch_seconds",
    "Pause of a live rebalance's switch: the longest time a worker spent taking up the staged placement at the step "
    "boundary (loading the weights happened before, in the background).",
    ("model",), FAST_BUCKETS)
POOL_RESIZES_TOTAL = Counter(
    "k2ray_pool_resizes_total",
    "Live resizes of a model group's pools (elastic attention workers and expert shards), by pool and direction.",
    ("model", "pool", "direction"))
POOL_RESIZE_PAUSE_SECONDS = Histogram(
    "k2ray_pool_resize_pause_seconds",
    "Pause of a live pool resize: how long the group did not step while its workers joined the new process group "
    "(starting and loading the added workers happened before, in the background).",
    ("model",), FAST_BUCKETS)
POOL_WORKERS = Gauge(
    "k2ray_pool_workers", "Workers in each pool of the model group (attention_workers, expert_shards).",
    ("model", "pool"))
# ---- structured outputs ----
CONSTRAINED_REQUESTS_TOTAL = Counter(
    "k2ray_constrained_requests_total", "Requests decoded under a grammar (tools, response_format, guided_*).",
    ("model",))
GRAMMAR_MASK_SECONDS = Histogram(
    "k2ray_grammar_mask_seconds", "Time to compute the token masks of one step's constrained requests.",
    ("model",), FAST_BUCKETS)
# ---- image input (Kimi K2.5) ----
VISION_IMAGES_ENCODED_TOTAL = Counter(
    "k2ray_vision_images_encoded_total", "Images run through the image encoder (encoder cache hits not counted).",
    ("model",))

ALL_METRICS: Tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))
_BY_NAME: Dict[str, Metric] = {m.name: m for m in ALL_METRICS}
assert len(_BY_NAME) == len(ALL_METRICS)


def by_name(name: str) -> Metric:
    """The metric registered under ``name`` (as defined here, without Ray's prefix)."""
    return _BY_NAME[name]


def exported_names(metric: Metric, backend: str = "ray") -> List[str]:
    """The sample names Prometheus receives for ``metric`` from ``backend`` ("ray" or "prometheus")."""
    base = (RAY_PREFIX if backend == "ray" else "") + metric.name
    if metric.kind == "histogram":
        return [base + "_bucket", base + "_count", base + "_sum"]
    return [base]


# --------------------------------------------------------------------------------------------------------------------
# Registries and backends
# --------------------------------------------------------------------------------------------------------------------

def _check_labels(spec: _Spec, labels: Dict[str, Any]) -> Dict[str, str]:
    if len(labels) != len(spec.labels) or any(k not in labels for k in spec.labels):
        raise ValueError(f"{spec.name} takes labels {list(spec.labels)}, got {sorted(labels)}")
    return {k: str(labels[k]) for k in spec.labels}


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to find out it is not running
    try:
        return ray is not None and bool(ray.is_initialized())
    except Exception:
        return False


# Ray metric objects are per process and per name; share them between registries.
_RAY_METRICS: Dict[str, Any] = {}
_RAY_LOCK = threading.Lock()


def _ray_metric(spec: _Spec):
    m = _RAY_METRICS.get(spec.name)
    if m is None:
        with _RAY_LOCK:
            m = _RAY_METRICS.get(spec.name)
            if m is None:
                from ray.util import metrics as rm

                if spec.kind == "counter":
                    m = rm.Counter(spec.name, spec.description, tag_keys=spec.labels)
                elif spec.kind == "gauge":
                    m = rm.Gauge(spec.name, spec.description, tag_keys=spec.labels)
                else:
                    m = rm.Histogram(spec.name, spec.description, boundaries=list(spec.buckets),
                                     tag_keys=spec.labels)
                _RAY_METRICS[spec.name] = m
    return m


class MetricsRegistry:
    """Where recordings go. ``backend``: "auto" (decided at first use), "ray" or "prometheus".

    ``per_layer_experts``: record ``k2ray_expert_layer_tokens_total`` (default: the env var).
    """

    def __init__(self, backend: str = "auto", per_layer_experts: Optional[bool] = None):
        if backend not in ("auto", "ray", "prometheus"):
            raise ValueError(f"backend must be auto, ray or prometheus, not {backend!r}")
        self._requested = backend
        self._backend: Optional[str] = None if backend == "auto" else backend
        self.per_layer_experts = _env_flag(PER_LAYER_ENV) if per_layer_experts is None else bool(per_layer_experts)
        self._lock = threading.Lock()
        self._prom_registry = None
        self._prom: Dict[str, Any] = {}

    # -- backend ------------------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend in use; decides it (once) if still undecided."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = "ray" if _ray_initialized() else "prometheus"
        return self._backend

    @property
    def prometheus_registry(self):
        """The private ``prometheus_client.CollectorRegistry`` (prometheus backend only)."""
        if self.backend != "prometheus":
            raise RuntimeError("this registry records through Ray; scrape the node's Ray metrics port instead")
        if self._prom_registry is None:
            with self._lock:
                if self._prom_registry is None:
                    from prometheus_client import CollectorRegistry

                    self._prom_registry = CollectorRegistry(auto_describe=True)
        return self._prom_registry

    def _prom_metric(self, spec: _Spec):
        m = self._prom.get(spec.name)
        if m is None:
            reg = self.prometheus_registry
            with self._lock:
                m = self._prom.get(spec.name)
                if m is None:
                    import prometheus_client as pc

                    if spec.kind == "counter":
                        m = pc.Counter(spec.name, spec.description, spec.labels, registry=reg)
                    elif spec.kind == "gauge":
                        m = pc.Gauge(spec.name, spec.description, spec.labels, registry=reg)
                    else:
                        m = pc.Histogram(spec.name, spec.description, spec.labels, registry=reg,
                                         buckets=list(spec.buckets) + [float("inf")])
                    self._prom[spec.name] = m
        return m

    # -- recording ----------------------------------------------------------------------------------------------------
    def get(self, metric: Metric) -> "_Recorder":
        """``metric`` recording into this registry: ``registry.get(metrics.TTFT).observe(0.1, model="m")``."""
        return _Recorder(metric, self)

    def record(self, metric: Metric, value: float, labels: Dict[str, Any]) -> None:
        self._record_checked(metric, value, _check_labels(metric.spec, labels))

    def _record_checked(self, metric: Metric, value: float, tags: Dict[str, str]) -> None:
        spec = metric.spec
        if spec.per_layer and not self.per_layer_experts:
            return
        value = float(value)
        if spec.kind == "counter":
            if value < 0:
                raise ValueError(f"{spec.name}: counters only go up, got {value}")
            if value == 0:
                return
        if self.backend == "ray":
            m = _ray_metric(spec)
            if spec.kind == "counter":
                m.inc(value, tags=tags)
            elif spec.kind == "gauge":
                m.set(value, tags=tags)
            else:
                m.observe(value, tags=tags)
        else:
            child = self._prom_metric(spec).labels(**tags)
            if spec.kind == "counter":
                child.inc(value)
            elif spec.kind == "gauge":
                child.set(value)
            else:
                child.observe(value)

    # -- exposition (prometheus backend) ------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.prometheus_registry)

    def start_http_server(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the bound port (``port=0``: a free one)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.prometheus_registry)
        return int(server.server_port)


class _Recorder:
    """A metric recording into an explicit registry (same methods as the module-level handles)."""

    __slots__ = ("_metric", "_registry")

    def __init__(self, metric: Metric, registry: MetricsRegistry):
        self._metric, self._registry = metric, registry

    def labels(self, **labels: Any) -> _Bound:
        return _Bound(self._metric, self._registry, _check_labels(self._metric.spec, labels))

    def inc(self, value: float = 1.0, **labels: Any) -> None:
        self.labels(**labels).inc(value)

    def set(self, value: float, **labels: Any) -> None:
        self.labels(**labels).set(value)

    def observe(self, value: float, **labels: Any) -> None:
        self.labels(**labels).observe(value)


_DEFAULT: Optional[MetricsRegistry] = None
_DEFAULT_LOCK = threading.Lock()


def get_registry() -> MetricsRegistry:
    """The process's default registry (created at first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = MetricsRegistry()
    return _DEFAULT


def configure(backend: str = "auto", per_layer_experts: Optional[bool] = None) -> MetricsRegistry:
    """Replace the default registry (values recorded in the old one are not carried over)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        _DEFAULT = MetricsRegistry(backend, per_layer_experts)
    return _DEFAULT


def exposition() -> bytes:
    """The default registry in Prometheus' text format (prometheus backend only)."""
    return get_registry().exposition()


def start_http_server(port: int = 0, addr: str = "127.0.0.1") -> int:
    """Serve the default registry on ``http://addr:port/metrics`` (prometheus backend only); returns the port."""
    return get_registry().start_http_server(port, addr)


# --------------------------------------------------------------------------------------------------------------------
# Expert load
# --------------------------------------------------------------------------------------------------------------------

def record_expert_load(model: str, counts: Any, layer_ids: Optional[Sequence[int]] = None,
                       registry: Optional[MetricsRegistry] = None) -> Optional[float]:
    """Record tokens routed to experts and the shard imbalance; returns the imbalance (None if no tokens).

    ``counts``: array-like (numpy or torch) of token counts, ``[expert, shard]`` (already summed over layers) or
    ``[layer, expert, shard]``; entry ``[e, s]`` is the tokens of logical expert ``e`` processed on physical shard
    ``s`` (redundant replicas of an expert sit on several shards). With 3-D counts the per-layer series are recorded
    too when enabled; ``layer_ids`` names the layers (default 0..L-1). The imbalance gauge is max/mean of the
    per-shard token totals in ``counts``. Call it once per step or, cheaper, accumulate with
    :class:`ExpertLoadTracker`.
    """
    import numpy as np

    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().numpy()
    c = np.asarray(counts)
    if c.ndim not in (2, 3):
        raise ValueError(f"counts must be [expert, shard] or [layer, expert, shard], got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("token counts must be non-negative")
    reg = registry or get_registry()
    total = c.sum(axis=0) if c.ndim == 3 else c
    model = str(model)
    nz = np.nonzero(total)
    for e, s, v in zip(*(a.tolist() for a in nz), total[nz].tolist()):
        reg._record_checked(EXPERT_TOKENS_TOTAL, v, {"model": model, "expert": str(e), "shard": str(s)})
    if c.ndim == 3 and reg.per_layer_experts:
        ids = list(range(c.shape[0])) if layer_ids is None else list(layer_ids)
        if len(ids) != c.shape[0]:
            raise ValueError(f"{len(ids)} layer_ids for {c.shape[0]} layers")
        nz = np.nonzero(c)
        for l, e, s, v in zip(*(a.tolist() for a in nz), c[nz].tolist()):
            reg._record_checked(EXPERT_LAYER_TOKENS_TOTAL, v,
                                {"model": model, "layer": str(ids[l]), "expert": str(e), "shard": str(s)})
    shard_load = total.sum(axis=0).astype(np.float64)
    mean = float(shard_load.mean()) if shard_load.size else 0.0
    if mean <= 0:
        return None
    imbalance = float(shard_load.max()) / mean
    reg._record_checked(EXPERT_SHARD_IMBALANCE, imbalance, {"model": model})
    return imbalance


class ExpertLoadTracker:
    """Accumulates expert token counts over steps and records them at most every ``interval_s`` seconds.

    Recording costs one metric update (~10 us with Ray) per non-zero (expert, shard) pair: a few ms for real K2's
    384 experts, and hundreds of ms with the per-layer series on (60 x 384 pairs) -- too much for every decode
    step; ``add`` is a cheap array add. The imbalance gauge then covers one interval. Call :meth:`flush` at
    shutdown or when idle so that the tail is recorded.
    """

    def __init__(self, model: str, num_experts: int, num_shards: int, num_layers: Optional[int] = None,
                 layer_ids: Optional[Sequence[int]] = None, interval_s: float = 1.0,
                 registry: Optional[MetricsRegistry] = None):
        import numpy as np

        shape: Tuple[int, ...] = (num_experts, num_shards) if num_layers is None else (num_layers, num_experts,
                                                                                         num_shards)
        self.model, self.layer_ids, self.interval_s, self._registry = model, layer_ids, interval_s, registry
        self._acc = np.zeros(shape, dtype=np.int64)
        self._last = time.monotonic()

    def add(self, counts: Any) -> None:
        import numpy as np

        if hasattr(counts, "detach"):
            counts = counts.detach().cpu().numpy()
        self._acc += np.asarray(counts, dtype=np.int64)
        if time.monotonic() - self._last >= self.interval_s:
            self.flush()

    def flush(self, num_shards: Optional[int] = None) -> Optional[float]:
        """Record what was added since the last flush; ``num_shards``: only the first shards exist now (an elastic
        pool below its max), so the imbalance is over those."""
        self._last = time.monotonic()
        if not self._acc.any():
            return None
        acc, self._acc = self._acc, self._acc * 0
        if num_shards is not None:
            acc = acc[..., :num_shards]
        return record_expert_load(self.model, acc, self.layer_ids, self._registry)

