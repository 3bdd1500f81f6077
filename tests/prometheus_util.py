"""Test helpers: a real Prometheus server on loopback, and the dashboards' PromQL.

Used by tests/test_metrics.py and meant for the end-to-end test against the Serve app::

    port = free_port()
    ray.init(**ray_metrics_init_kwargs(port), num_cpus=2)
    with PrometheusServer({"ray": [f"127.0.0.1:{port}"]}, tmp_dir) as prom:
        ... send traffic ...
        prom.wait_until(lambda: prom.value('sum(ray_k2ray_requests_total)') == n)
        for expr in dashboard_exprs(): prom.query(substitute(expr, {"model": "k2"}))

The Prometheus binary comes from the Debian package ``prometheus`` (or ``$PROMETHEUS_BIN``); this module never
installs it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD_DIR = os.path.join(ROOT, "dashboards")

MISSING_PROMETHEUS = (
    "The `prometheus` server binary was not found on PATH (nor in $PROMETHEUS_BIN). Install the Debian package: "
    "`apt-get update && apt-get install -y prometheus` (the test starts its own server; the package's service "
    "need not run)."
)


def find_prometheus() -> Optional[str]:
    """Path of the Prometheus server binary, or None."""
    env = os.environ.get("PROMETHEUS_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("prometheus")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_metrics_init_kwargs(metrics_port: int, report_interval_ms: int = 1000) -> dict:
    """``ray.init`` arguments that export metrics on ``metrics_port`` and report them every ``report_interval_ms``.

    Ray 2.60 serves every process's metrics on the node's dashboard agent at ``http://<node>:<port>/metrics`` (it
    runs with ``include_dashboard=False`` too). Processes push values to the agent every
    ``metrics_report_interval_ms`` (default 10 s; Ray floors it at 1 s).
    """
    return {
        "_metrics_export_port": metrics_port,
        "include_dashboard": False,
        "_system_config": {"metrics_report_interval_ms": report_interval_ms},
    }


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """A Prometheus server scraping ``jobs`` ({job name: ["host:port", ...]}) every ``scrape_interval``.

    ``metric_relabel``: {job name: [relabel rule dicts]} applied to that job's samples (``metric_relabel_configs``).
    Data lives in ``workdir`` (a temp dir when None, removed at stop).
    """

    def __init__(self, jobs: Mapping[str, Sequence[str]], workdir: Optional[str] = None,
                 scrape_interval: str = "1s", metric_relabel: Optional[Mapping[str, list]] = None,
                 binary: Optional[str] = None, port: Optional[int] = None):
        self.binary = binary or find_prometheus()
        if not self.binary:
            raise PrometheusError(MISSING_PROMETHEUS)
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="k2ray-prom-")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jobs = {k: list(v) for k, v in jobs.items()}
        self.scrape_interval = scrape_interval
        self.metric_relabel = dict(metric_relabel or {})
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(self.workdir, "prometheus.log")

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def config_text(self) -> str:
        lines = ["global:", f"  scrape_interval: {self.scrape_interval}", f"  scrape_timeout: {self.scrape_interval}",
                 f"  evaluation_interval: {self.scrape_interval}", "scrape_configs:"]
        for job, targets in self.jobs.items():
            lines += [f"  - job_name: {json.dumps(job)}", "    metrics_path: /metrics",
                      "    static_configs:", f"      - targets: {json.dumps(targets)}"]
            rules = self.metric_relabel.get(job)
            if rules:
                lines.append("    metric_relabel_configs:")
                for rule in rules:
                    first = True
                    for k, v in rule.items():
                        lines.append(f"      {'- ' if first else '  '}{k}: {json.dumps(v)}")
                        first = False
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        cfg = os.path.join(self.workdir, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write(self.config_text())
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PrometheusServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- HTTP API -----------------------------------------------------------------------------------------------------
    def api(self, path: str, params: Optional[Sequence[Tuple[str, str]]] = None, post: bool = False):
        data = urllib.parse.urlencode(list(params or []))
        if post:
            req = urllib.request.Request(self.url + path, data=data.encode(),
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        else:
            req = urllib.request.Request(self.url + path + ("?" + data if data else ""))
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: Optional[float] = None) -> List[dict]:
        """Instant query; returns the result vector ([{"metric": {...}, "value": [t, "v"]}, ...])."""
        params = [("query", expr)] + ([("time", f"{at:.3f}")] if at is not None else [])
        data = self.api("/api/v1/query", params, post=True)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: unexpected result type {data['resultType']}")
        return data["result"]

    def values(self, expr: str, by: Sequence[str] = (), at: Optional[float] = None) -> Dict[tuple, float]:
        """{tuple of the ``by`` label values: value} of an instant query."""
        return {tuple(r["metric"].get(k, "") for k in by): float(r["value"][1]) for r in self.query(expr, at)}

    def value(self, expr: str, at: Optional[float] = None) -> Optional[float]:
        """The single value of an instant query (None when empty)."""
        res = self.query(expr, at)
        if not res:
            return None
        if len(res) != 1:
            raise PrometheusError(f"{expr}: {len(res)} series, expected one")
        return float(res[0]["value"][1])

    def label_values(self, label: str, match: Optional[str] = None) -> List[str]:
        params = [("match[]", match)] if match else []
        return self.api(f"/api/v1/label/{urllib.parse.quote(label)}/values", params)

    def targets(self) -> List[dict]:
        return self.api("/api/v1/targets")["activeTargets"]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.5,
                   what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        last_exc: Optional[BaseException] = None
        while True:
            try:
                if predicate():
                    return
                last_exc = None
            except (PrometheusError, urllib.error.URLError, OSError) as e:
                last_exc = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout}s"
                                   + (f" (last error: {last_exc})" if last_exc else "")
                                   + f"; targets: {[(t['labels'].get('job'), t['health'], t.get('lastError')) for t in self.targets()]}")
            time.sleep(interval)

    def wait_for_targets(self, timeout: float = 30.0) -> None:
        """Until every target has been scraped successfully at least once."""
        def all_up():
            ts = self.targets()
            return len(ts) == sum(len(v) for v in self.jobs.values()) and all(t["health"] == "up" for t in ts)
        self.wait_until(all_up, timeout, what="all targets up")


# --------------------------------------------------------------------------------------------------------------------
# Dashboards
# --------------------------------------------------------------------------------------------------------------------

def dashboard_paths() -> List[str]:
    return sorted(glob.glob(os.path.join(DASHBOARD_DIR, "*.json")))


def iter_panels(panels: Sequence[dict]) -> Iterator[dict]:
    """Every panel, including those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels") or [])


def dashboard_exprs(paths: Optional[Sequence[str]] = None) -> List[Tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, expr) for every PromQL target of every panel."""
    out = []
    for path in paths or dashboard_paths():
        with open(path) as f:
            dash = json.load(f)
        for panel in iter_panels(dash.get("panels", [])):
            for t in panel.get("targets") or []:
                if t.get("expr"):
                    out.append((os.path.basename(path), panel.get("title", ""), t.get("refId", ""), t["expr"]))
    return out


def substitute(expr: str, variables: Mapping[str, str], interval: str = "30s") -> str:
    """Grafana variable substitution, roughly: ``$var``/``${var}``/``[[var]]`` -> value (regex-escaped as Grafana
    does for regex matchers) and the ``$__rate_interval``/``$__interval``/``$__range`` builtins -> ``interval``."""
    builtins = {"__rate_interval": interval, "__interval": interval, "__range": interval,
                "__range_s": str(_seconds(interval)), "__interval_ms": str(int(_seconds(interval) * 1000))}

    def val(name: str) -> str:
        if name in builtins:
            return builtins[name]
        if name not in variables:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        # Grafana escapes regex metacharacters of a value with a double backslash inside the PromQL string.
        return re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", variables[name])

    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}", lambda m: val(m.group(1)), expr)
    expr = re.sub(r"\[\[(\w+)\]\]", lambda m: val(m.group(1)), expr)
    return re.sub(r"\$(\w+)", lambda m: val(m.group(1)), expr)


def _seconds(d: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", d)
    if not m:
        raise ValueError(d)
    return float(m.group(1)) * units[m.group(2)]


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def metric_names(expr: str) -> List[str]:
    """Metric names referenced by a PromQL expression (functions, keywords and label names excluded)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    names = set()
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # grouping label lists
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", s):  # not inside a number (1e5, 30s)
        word, rest = m.group(0), s[m.end():].lstrip()
        if word.lower() in _PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(word)
    return sorted(names)


def is_finite_number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False
