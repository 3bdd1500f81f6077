"""Helpers for the Serve tests: every test module starts ONE Ray cluster and ONE Serve instance (module fixture)."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def serve_app(args: dict, cache_dir, num_cpus: int = 8, ingress_options: dict | None = None, **ray_init_kwargs):
    """Start Ray (logical CPUs: ``num_cpus``) and Serve on a free loopback port, deploy ``build_app(args)`` (with
    ``ingress_options`` over the ingress deployment's defaults); yields the base URL. The tiny checkpoint is written
    into ``cache_dir`` by the replicas (first start)."""
    import ray
    from ray import serve

    old = os.environ.get("K2RAY_CACHE_DIR")
    os.environ["K2RAY_CACHE_DIR"] = str(cache_dir)
    if ray.is_initialized():  # left over by another test module
        ray.shutdown()
    # address="local": always a fresh cluster of our own, even if another one runs on this machine
    ray.init(address="local", num_cpus=num_cpus,
             **{"include_dashboard": False, "log_to_driver": False, **ray_init_kwargs})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from k2ray.serve.app import build_app_with_options

        serve.run(build_app_with_options(args, ingress_options), name="k2ray", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(base + "/health", timeout=10).status_code == 200, 180, 0.5, "/health")
        yield base
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if old is None:
            os.environ.pop("K2RAY_CACHE_DIR", None)
        else:
            os.environ["K2RAY_CACHE_DIR"] = old


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """``resp`` is an OpenAI error body with ``status`` (and ``code`` / ``param`` when given), without a traceback."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def scrape(url: str) -> list[tuple[str, dict, float]]:
    """Every sample of a Prometheus text endpoint as ``(name, labels, value)``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_sum(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == str(x) for k, x in labels.items()))


def descendant_pids() -> set[int]:
    """Pids of every process below this one (this test's Ray cluster: raylet, workers, actors)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in mine}
        mine |= frontier
    return mine
