"""Metrics registry, Grafana dashboard, and the whole export pipeline through a real Prometheus server.

The end-to-end test (marked ray/slow) starts a local Ray cluster exporting metrics on a free port, a Serve
application standing in for the router (request/engine metrics) and a plain actor standing in for an expert shard
(all-to-all and expert-load metrics, per-layer series enabled through the env var), plus a prometheus_client
registry in this process (the non-Ray backend, scraped through the relabel rule of docs/observability.md). A real
Prometheus scrapes both; every PromQL expression of dashboards/*.json must return finite data for both backends and
the values must be what was recorded.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from k2ray import metrics

from . import prometheus_util as pu

# Ray's own metrics the dashboard may query: exported name -> kind. Each is checked against the installed Ray source.
RAY_METRICS = {
    "ray_serve_deployment_replica_healthy": "gauge",
    "ray_serve_autoscaling_target_replicas": "gauge",
    "ray_serve_replica_processing_queries": "gauge",
    "ray_serve_deployment_queued_queries": "gauge",
    "ray_serve_deployment_request_counter_total": "counter",
}

# --------------------------------------------------------------------------------------------------------------------
# What the fake processes record per round (the e2e test runs two rounds so that every rate is positive).
# --------------------------------------------------------------------------------------------------------------------
M = metrics
COUNTS = [  # (metric, labels besides model, increment per round)
    (M.REQUESTS_TOTAL, {"finish_reason": "stop"}, 3),
    (M.REQUESTS_TOTAL, {"finish_reason": "length"}, 1),
    (M.REQUEST_ERRORS_TOTAL, {"status": "500"}, 1),
    (M.REQUEST_ERRORS_TOTAL, {"status": "429"}, 2),
    (M.PROMPT_TOKENS_TOTAL, {}, 100),
    (M.GENERATION_TOKENS_TOTAL, {}, 40),
    (M.PREFIX_CACHE_HIT_TOKENS_TOTAL, {}, 25),
    (M.CONSTRAINED_REQUESTS_TOTAL, {}, 1),
    (M.EPLB_REBALANCES_TOTAL, {}, 1),
    (M.POOL_RESIZES_TOTAL, {"pool": "expert_shards", "direction": "up"}, 1),
    (M.VISION_IMAGES_ENCODED_TOTAL, {}, 2),
]
OBSERVATIONS = [  # (metric, labels besides model, value, observations per round)
    (M.TTFT, {}, 0.12, 4),
    (M.ITL, {}, 0.02, 36),
    (M.E2E_LATENCY, {}, 1.7, 4),
    (M.QUEUE_TIME, {}, 0.004, 4),
    (M.STEP_SECONDS, {"phase": "decode"}, 0.011, 10),
    (M.STEP_SECONDS, {"phase": "prefill"}, 0.2, 2),
    (M.GRAMMAR_MASK_SECONDS, {}, 0.0003, 5),
    (M.ALL_TO_ALL_SECONDS, {"op": "dispatch"}, 0.0007, 4),
    (M.ALL_TO_ALL_SECONDS, {"op": "combine"}, 0.0012, 4),
    (M.EPLB_SWITCH_SECONDS, {}, 0.002, 1),
    (M.POOL_RESIZE_PAUSE_SECONDS, {}, 0.4, 1),
]
GAUGES = [  # (metric, labels besides model, value after round 1, value after round 2)
    (M.REQUESTS_RUNNING, {}, 3, 5),
    (M.REQUESTS_WAITING, {}, 2, 1),
    (M.KV_CACHE_USAGE, {}, 0.25, 0.5),
    (M.EXPERT_BALANCEDNESS, {"layer": "1"}, 0.6, 0.9),
    (M.EXPERT_BALANCEDNESS, {"layer": "mean"}, 0.7, 0.95),
    (M.POOL_WORKERS, {"pool": "expert_shards"}, 2, 3),
]
# tokens[layer, expert, shard]: 2 MoE layers (ids 1, 2), 4 logical experts, 2 shards (expert 2 replicated on both)
EXPERT_COUNTS = [[[5, 0], [0, 1], [2, 2], [0, 0]],
                 [[1, 0], [0, 3], [0, 0], [4, 0]]]
EXPERT_LAYER_IDS = [1, 2]
EP_METRICS = {M.ALL_TO_ALL_SECONDS.name, M.EXPERT_TOKENS_TOTAL.name, M.EXPERT_LAYER_TOKENS_TOTAL.name,
              M.EXPERT_SHARD_IMBALANCE.name}
ROUNDS = 2


def record_round(get, model: str, rnd: int, part: str) -> None:
    """Record one round; ``get(metric)`` gives what to record through (a module handle or ``registry.get``).
    ``part``: "router" (request/engine metrics), "shard" (expert-parallel ones) or "all"."""
    def mine(metric):
        return part == "all" or (metric.name in EP_METRICS) == (part == "shard")

    for metric, labels, inc in COUNTS:
        if mine(metric):
            get(metric).inc(inc, model=model, **labels)
    for metric, labels, value, n in OBSERVATIONS:
        if mine(metric):
            bound = get(metric).labels(model=model, **labels)
            for _ in range(n):
                bound.observe(value)
    for metric, labels, v1, v2 in GAUGES:
        if mine(metric):
            get(metric).set(v1 if rnd == 1 else v2, model=model, **labels)
    if part in ("shard", "all"):
        registry = getattr(get, "__self__", None)  # registry.get -> that registry; module handles -> default
        metrics.record_expert_load(model, EXPERT_COUNTS, layer_ids=EXPERT_LAYER_IDS, registry=registry)


def _expert_totals():
    totals = {}
    for li, layer in enumerate(EXPERT_COUNTS):
        for e, row in enumerate(layer):
            for s, c in enumerate(row):
                if c:
                    totals[(str(e), str(s))] = totals.get((str(e), str(s)), 0) + c
    return totals


def _imbalance():
    shard = [0, 0]
    for (e, s), c in _expert_totals().items():
        shard[int(s)] += c
    return max(shard) / (sum(shard) / len(shard))


def _bucket_bounds(metric, value):
    """(lower, upper] bucket bounds of ``metric`` that hold ``value``."""
    lo = 0.0
    for b in metric.buckets:
        if value <= b:
            return lo, b
        lo = b
    return lo, math.inf


# --------------------------------------------------------------------------------------------------------------------
# Unit tests: registry
# --------------------------------------------------------------------------------------------------------------------

def _sample(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if got == {k: str(v) for k, v in labels.items()}:
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name}{labels} not in exposition")


def test_catalog_matches_issue():
    names = {m.name: m for m in metrics.ALL_METRICS}
    expected = {
        "k2ray_requests_total": ("model", "finish_reason"),
        "k2ray_request_errors_total": ("model", "status"),
        "k2ray_prompt_tokens_total": ("model",),
        "k2ray_generation_tokens_total": ("model",),
        "k2ray_prefix_cache_hit_tokens_total": ("model",),
        "k2ray_time_to_first_token_seconds": ("model",),
        "k2ray_inter_token_latency_seconds": ("model",),
        "k2ray_e2e_request_latency_seconds": ("model",),
        "k2ray_queue_time_seconds": ("model",),
        "k2ray_step_seconds": ("model", "phase"),
        "k2ray_requests_running": ("model",),
        "k2ray_requests_waiting": ("model",),
        "k2ray_kv_cache_usage_ratio": ("model",),
        "k2ray_all_to_all_seconds": ("model", "op"),
        "k2ray_expert_tokens_total": ("model", "expert", "shard"),
        "k2ray_expert_layer_tokens_total": ("model", "layer", "expert", "shard"),
        "k2ray_expert_shard_imbalance_ratio": ("model",),
        "k2ray_expert_balancedness": ("model", "layer"),
        "k2ray_eplb_rebalances_total": ("model",),
        "k2ray_eplb_switch_seconds": ("model",),
        "k2ray_pool_resizes_total": ("model", "pool", "direction"),
        "k2ray_pool_resize_pause_seconds": ("model",),
        "k2ray_pool_workers": ("model", "pool"),
        "k2ray_constrained_requests_total": ("model",),
        "k2ray_grammar_mask_seconds": ("model",),
        "k2ray_vision_images_encoded_total": ("model",),
    }
    assert {n: m.labelnames for n, m in names.items()} == expected
    for m in metrics.ALL_METRICS:
        if m.kind == "histogram":
            assert m.buckets[0] <= 0.001 and m.buckets[-1] >= 10, m  # ms .. (tens of) seconds at least
    assert metrics.TTFT.buckets[-1] >= 300 and metrics.E2E_LATENCY.buckets[-1] >= 300  # minutes
    assert metrics.ALL_TO_ALL_SECONDS.buckets[0] <= 2e-5  # NVLink all-to-all is tens of microseconds


def test_import_is_lazy():
    code = ("import sys; from k2ray import metrics; metrics.REQUESTS_TOTAL; metrics.ALL_METRICS; "
            "assert 'ray' not in sys.modules and 'prometheus_client' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pu.ROOT, timeout=60)


def test_prometheus_backend_exposition():
    reg = metrics.MetricsRegistry(backend="prometheus", per_layer_experts=False)
    record_round(reg.get, "m", 1, "all")
    text = reg.exposition().decode()
    assert _sample(text, "k2ray_requests_total", model="m", finish_reason="stop") == 3
    assert _sample(text, "k2ray_prompt_tokens_total", model="m") == 100
    assert _sample(text, "k2ray_kv_cache_usage_ratio", model="m") == 0.25
    assert _sample(text, "k2ray_step_seconds_count", model="m", phase="decode") == 10
    assert _sample(text, "k2ray_step_seconds_bucket", model="m", phase="decode", le="0.0125") == 10
    assert _sample(text, "k2ray_step_seconds_bucket", model="m", phase="decode", le="0.01") == 0
    assert _sample(text, "k2ray_expert_tokens_total", model="m", expert="2", shard="1") == 2
    assert _sample(text, "k2ray_expert_shard_imbalance_ratio", model="m") == pytest.approx(_imbalance())
    assert "k2ray_expert_layer_tokens_total" not in text  # per-layer series are off unless enabled
    for m in metrics.ALL_METRICS:
        if not m.per_layer:
            assert all(n + "{" in text for n in metrics.exported_names(m, "prometheus")), m
    # the module-level handles record into the default registry
    try:
        metrics.configure(backend="prometheus", per_layer_experts=True)
        metrics.GENERATION_TOKENS_TOTAL.inc(7, model="x")
        metrics.record_expert_load("x", [EXPERT_COUNTS[0]], layer_ids=[3])
        text = metrics.exposition().decode()
        assert _sample(text, "k2ray_generation_tokens_total", model="x") == 7
        assert _sample(text, "k2ray_expert_layer_tokens_total", model="x", layer="3", expert="0", shard="0") == 5
    finally:
        metrics.configure()


def test_label_and_value_validation():
    reg = metrics.MetricsRegistry(backend="prometheus")
    with pytest.raises(ValueError, match="takes labels"):
        reg.get(metrics.REQUESTS_TOTAL).inc(model="m")
    with pytest.raises(ValueError, match="takes labels"):
        reg.get(metrics.TTFT).observe(0.1, model="m", phase="x")
    with pytest.raises(ValueError, match="only go up"):
        reg.get(metrics.PROMPT_TOKENS_TOTAL).inc(-1, model="m")
    reg.get(metrics.PROMPT_TOKENS_TOTAL).inc(0, model="m")  # a no-op, not an error
    with pytest.raises(TypeError):
        reg.get(metrics.TTFT).labels(model="m").inc()
    with pytest.raises(ValueError):
        metrics.MetricsRegistry(backend="statsd")
    with pytest.raises(ValueError, match="_total"):
        metrics.Counter("k2ray_bad", "", ("model",))
    import numpy as np  # numpy scalars (not int/float subclasses) are accepted

    reg.get(metrics.PROMPT_TOKENS_TOTAL).inc(np.int64(5), model="m")
    assert _sample(reg.exposition().decode(), "k2ray_prompt_tokens_total", model="m") == 5


def test_pickles_by_reference_and_env_flag(monkeypatch):
    import pickle

    assert pickle.loads(pickle.dumps(metrics.TTFT)) is metrics.TTFT
    assert metrics.by_name("k2ray_step_seconds") is metrics.STEP_SECONDS
    monkeypatch.setenv(metrics.PER_LAYER_ENV, "1")
    assert metrics.MetricsRegistry(backend="prometheus").per_layer_experts
    monkeypatch.setenv(metrics.PER_LAYER_ENV, "0")
    assert not metrics.MetricsRegistry(backend="prometheus").per_layer_experts


def test_expert_load_tracker():
    reg = metrics.MetricsRegistry(backend="prometheus", per_layer_experts=True)
    tr = metrics.ExpertLoadTracker("m", num_experts=4, num_shards=2, num_layers=2, layer_ids=EXPERT_LAYER_IDS,
                                   interval_s=3600, registry=reg)
    tr.add(EXPERT_COUNTS)
    tr.add(EXPERT_COUNTS)
    assert "k2ray_expert_tokens_total{" not in reg.exposition().decode()  # nothing before the interval
    assert tr.flush() == pytest.approx(_imbalance())
    assert tr.flush() is None  # nothing new
    text = reg.exposition().decode()
    for (e, s), c in _expert_totals().items():
        assert _sample(text, "k2ray_expert_tokens_total", model="m", expert=e, shard=s) == 2 * c
    assert _sample(text, "k2ray_expert_layer_tokens_total", model="m", layer="2", expert="3", shard="0") == 8
    with pytest.raises(ValueError):
        metrics.record_expert_load("m", [1, 2, 3], registry=reg)


# --------------------------------------------------------------------------------------------------------------------
# Unit tests: dashboard
# --------------------------------------------------------------------------------------------------------------------

def _dashboards():
    paths = pu.dashboard_paths()
    assert paths, "no dashboards/*.json"
    return [(p, json.load(open(p))) for p in paths]


def test_dashboard_structure():
    for path, d in _dashboards():
        assert d["schemaVersion"] >= 36
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert {"model", "application"} <= set(variables)
        panels = list(pu.iter_panels(d["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), "duplicate panel ids"
        rows = [p["title"] for p in panels if p["type"] == "row"]
        if os.path.basename(path) == "k2ray.json":
            assert rows == ["Traffic", "Latency", "Engine", "Expert parallelism", "Structured outputs",
                            "Scaling (Ray Serve)"]
        for p in panels:
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"
                if "model" in {n for n in re.findall(r"\$\{?(\w+)", t["expr"])} or "ray_k2ray_" in t["expr"]:
                    assert 'model=~"$model"' in t["expr"], t["expr"]
                if "ray_serve_" in t["expr"]:
                    assert 'application=~"$application"' in t["expr"], t["expr"]


def test_dashboard_and_registry_agree():
    """Every metric of k2ray/metrics.py is queried by a panel; every queried metric is defined or a known Ray one."""
    exported = {}
    for m in metrics.ALL_METRICS:
        for n in metrics.exported_names(m, "ray"):
            exported[n] = m
    used = set()
    for _file, title, ref, expr in pu.dashboard_exprs():
        names = pu.metric_names(expr)
        assert names, f"{title}/{ref}: no metric in {expr!r}"
        for n in names:
            assert n in exported or n in RAY_METRICS, f"{title}/{ref}: {n} is neither k2ray's nor a known Ray metric"
            if n in exported:
                used.add(exported[n].name)
    assert {m.name for m in metrics.ALL_METRICS} - used == set(), "metrics no panel shows"


def test_known_ray_metrics_exist_in_installed_ray():
    import ray

    src_root = os.path.dirname(ray.__file__)
    wanted = {}
    for name, kind in RAY_METRICS.items():
        base = name[len("ray_"):]
        if kind == "counter":
            base = base[: -len("_total")] if base.endswith("_total") else base
        wanted[base] = name
    found = set()
    for dirpath, _dirs, files in os.walk(src_root):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), errors="replace") as fh:
                    text = fh.read()
                found.update(b for b in wanted if f'"{b}"' in text)
    assert found == set(wanted), f"not defined in the installed Ray: {sorted(set(wanted) - found)}"


# --------------------------------------------------------------------------------------------------------------------
# End to end: Ray -> node metrics endpoint -> Prometheus -> every dashboard query
# --------------------------------------------------------------------------------------------------------------------
RAY_MODEL = "k2-ray"
LOCAL_MODEL = "k2-local"
APP = "k2ray-metrics-test"
RELABEL = [{"source_labels": ["__name__"], "regex": "(k2ray_.*)", "target_label": "__name__",
            "replacement": "ray_$1"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binary = pu.find_prometheus()
    if not binary:
        pytest.fail(pu.MISSING_PROMETHEUS, pytrace=False)
    import ray
    import ray.cloudpickle
    from ray import serve

    if ray.is_initialized():
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors below live in this test module
    ray_port = pu.free_port()
    ray.init(num_cpus=2, **pu.ray_metrics_init_kwargs(ray_port), log_to_driver=False)
    prom = None
    try:
        serve.start(proxy_location="Disabled")

        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
        class FakeRouter:
            def __call__(self, rnd: int) -> str:
                record_round(lambda m: m, RAY_MODEL, rnd, "router")
                return metrics.get_registry().backend

        @ray.remote(num_cpus=0, runtime_env={"env_vars": {metrics.PER_LAYER_ENV: "1"}})
        class FakeExpertShard:
            def record(self, rnd: int) -> str:
                record_round(lambda m: m, RAY_MODEL, rnd, "shard")
                return metrics.get_registry().backend

        router = serve.run(FakeRouter.bind(), name=APP, route_prefix=None)
        shard = FakeExpertShard.remote()
        local = metrics.MetricsRegistry(backend="prometheus", per_layer_experts=True)
        local_port = local.start_http_server(0)
        prom = pu.PrometheusServer({"ray": [f"127.0.0.1:{ray_port}"], "local": [f"127.0.0.1:{local_port}"]},
                                   str(tmp_path_factory.mktemp("prometheus")), scrape_interval="1s",
                                   metric_relabel={"local": RELABEL}, binary=binary).start()

        def play(rnd):
            assert router.remote(rnd).result(timeout_s=60) == "ray"
            assert ray.get(shard.record.remote(rnd), timeout=60) == "ray"
            record_round(local.get, LOCAL_MODEL, rnd, "all")

        for rnd in range(1, ROUNDS + 1):
            play(rnd)
            prom.wait_until(lambda: _counters_at(prom, rnd), timeout=30, what=f"round {rnd} scraped")
        prom.wait_until(lambda: prom.value(
            f'sum(ray_serve_deployment_request_counter_total{{application="{APP}"}})') == ROUNDS,
            timeout=30, what="Serve request counter scraped")
        time.sleep(1.5)  # one more scrape: every series has at least two samples after the last change
        yield prom
    finally:
        if prom is not None:
            prom.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _counters_at(prom, rnd) -> bool:
    """Every counter and gauge of both backends shows round ``rnd``'s values."""
    for model in (RAY_MODEL, LOCAL_MODEL):
        for metric, labels, inc in COUNTS:
            sel = _selector(model, labels)
            if prom.value(f"sum(ray_{metric.name}{sel})") != inc * rnd:
                return False
        if prom.value(f'sum(ray_k2ray_expert_tokens_total{{model="{model}"}})') != rnd * sum(
                _expert_totals().values()):
            return False
        for metric, labels, v1, v2 in GAUGES:
            if prom.value(f"sum(ray_{metric.name}{_selector(model, labels)})") != (v1 if rnd == 1 else v2):
                return False
    return True


def _selector(model, labels):
    return "{" + ",".join(f'{k}="{v}"' for k, v in {"model": model, **labels}.items()) + "}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("model", [RAY_MODEL, LOCAL_MODEL])
def test_recorded_values_reach_prometheus(stack, model):
    prom = stack
    for metric, labels, inc in COUNTS:
        assert prom.value(f"sum(ray_{metric.name}{_selector(model, labels)})") == ROUNDS * inc, metric.name
    for metric, labels, v1, v2 in GAUGES:
        assert prom.value(f"sum(ray_{metric.name}{_selector(model, labels)})") == v2, metric.name
    got = prom.values(f'sum by (expert, shard) (ray_k2ray_expert_tokens_total{{model="{model}"}})',
                      by=("expert", "shard"))
    assert got == {k: ROUNDS * c for k, c in _expert_totals().items()}
    got = prom.values(f'sum by (layer, expert, shard) (ray_k2ray_expert_layer_tokens_total{{model="{model}"}})',
                      by=("layer", "expert", "shard"))
    assert got == {(str(EXPERT_LAYER_IDS[l]), str(e), str(s)): ROUNDS * c
                   for l, layer in enumerate(EXPERT_COUNTS) for e, row in enumerate(layer)
                   for s, c in enumerate(row) if c}
    assert prom.value(f'max(ray_k2ray_expert_shard_imbalance_ratio{{model="{model}"}})') == pytest.approx(
        _imbalance())
    for metric, labels, value, n in OBSERVATIONS:
        sel = _selector(model, labels)
        assert prom.value(f"sum(ray_{metric.name}_count{sel})") == ROUNDS * n, metric.name
        buckets = prom.values(f"sum by (le) (ray_{metric.name}_bucket{sel})", by=("le",))
        assert sorted(float(le) for (le,) in buckets) == sorted(list(metric.buckets) + [math.inf]), metric.name
        for (le,), count in buckets.items():
            assert count == (ROUNDS * n if value <= float(le) else 0), (metric.name, le, count)
        total = prom.value(f"sum(ray_{metric.name}_sum{sel})")
        if model == LOCAL_MODEL:
            assert total == pytest.approx(ROUNDS * n * value), metric.name
        else:  # Ray re-records observations at their bucket's midpoint (see k2ray/metrics.py)
            lo, hi = _bucket_bounds(metric, value)
            assert total == pytest.approx(ROUNDS * n * (lo + hi) / 2), metric.name


@pytest.mark.ray
@pytest.mark.slow
def test_dashboard_variables_resolve(stack):
    prom = stack
    for _path, d in _dashboards():
        for v in d["templating"]["list"]:
            if v["type"] != "query":
                continue
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q)
            assert m, f"variable {v['name']}: unsupported query {q!r}"
            values = prom.label_values(m.group(2), m.group(1))
            want = {"model": {RAY_MODEL, LOCAL_MODEL}, "application": {APP}}.get(v["name"], set())
            assert want <= set(values), (v["name"], values)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("model", [RAY_MODEL, LOCAL_MODEL])
def test_every_dashboard_query_returns_data(stack, model):
    prom = stack
    obs = {}
    for metric, labels, value, _n in OBSERVATIONS:
        obs.setdefault(metric.name, []).append((labels, value))
    results = {}
    failures = []
    for file, title, ref, expr in pu.dashboard_exprs():
        q = pu.substitute(expr, {"model": model, "application": APP})
        res = prom.query(q)
        results[(title, ref)] = res
        if not res:
            failures.append(f"{file} / {title} / {ref}: no data for {q}")
            continue
        bad = [r for r in res if not pu.is_finite_number(r["value"][1])]
        if bad:
            failures.append(f"{file} / {title} / {ref}: non-finite {bad} for {q}")
            continue
        # quantiles must land in the bucket of the (single) value observed for that label set
        m = re.search(r"histogram_quantile\(.*?(ray_(k2ray_\w+)_bucket)", q)
        if m:
            metric = metrics.by_name(m.group(2))
            for r in res:
                vals = [v for labels, v in obs[metric.name] if all(r["metric"].get(k) == x for k, x in labels.items())]
                assert len(vals) == 1, (q, r)
                lo, hi = _bucket_bounds(metric, vals[0])
                assert lo <= float(r["value"][1]) <= hi, (q, r, vals)
    assert not failures, "\n".join(failures)

    def only(title, ref="A"):
        (r,) = results[(title, ref)]
        return float(r["value"][1])

    assert only("Running / waiting requests", "A") == 5
    assert only("Running / waiting requests", "B") == 1
    assert only("KV-cache usage", "A") == only("KV-cache usage", "B") == 0.5
    assert only("Prefix-cache hit rate") == pytest.approx(25 / 100)
    assert only("Shard imbalance (max / mean)", "A") == pytest.approx(_imbalance())
    assert only("Shard imbalance (max / mean)", "B") == pytest.approx(_imbalance())
    assert only("Constrained requests", "B") == pytest.approx(1 / 4)
    assert {r["metric"]["finish_reason"] for r in results[("Requests / s by finish reason", "A")]} == {"stop",
                                                                                                       "length"}
    assert {r["metric"]["status"] for r in results[("Errors / s by status", "A")]} == {"500", "429"}
    assert len(results[("Per-expert load (tokens / s)", "A")]) == 4
    # Ray Serve's own metrics for the test application: one healthy replica, target one.
    assert only("Healthy replicas per deployment") == 1
    assert only("Target replicas per deployment") == 1
    assert only("Requests / s per deployment") > 0
