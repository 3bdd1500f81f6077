"""k2ray's edge (``k2ray edge``: Debian's nginx with k2ray/assets/edge/nginx.conf.template) in front of a real Serve
app: slow clients are cut off after the header timeout, a burst over the in-flight cap is refused at once in each
API's error shape while the admitted requests complete, streams pass through unbuffered, forwarded clients see the
redacted layout, and the command's own errors are one line. The Helm chart's sidecar runs the same template with the
same values (tests/test_helm_chart.py::test_edge_sidecar_fronts_every_serve_proxy)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from k2ray import edge

from .serve_helpers import assert_openai_error, free_port, serve_app, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "k2ray-tiny"
CAPACITY = 4  # max_num_seqs + max_queued_requests: the ingress's bound, and the edge's cap below
ARGS = {
    "model": "k2ray-tiny",
    "served_model_name": MODEL,
    "engine": {"num_kv_blocks": 512, "block_size": 16, "max_num_seqs": 2, "max_num_batched_tokens": 512},
    "parallel": {"executor": "local"},
    "router_cpus": 0.5,
    "max_queued_requests": CAPACITY - 2,
}
HEADER_TIMEOUT_S = 2
DIRECT_PORT = 30400  # first port of the ingress replicas' own HTTP servers (Serve's direct ingress) in this module


def _edge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "k2ray.cli", "edge", *args]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with Serve's direct ingress on, as deploy/config.yaml has it: the ingress replica also answers HTTP
    on its own port (from DIRECT_PORT)."""
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_PORT)}
    with serve_app(ARGS, tmp_path_factory.mktemp("k2ray-cache"), runtime_env={"env_vars": env}) as url:
        wait_until(lambda: _status(f"http://127.0.0.1:{DIRECT_PORT}/health") == 200, 60, 0.5, "direct ingress")
        yield url


@pytest.fixture(scope="module")
def edge_url(app):
    """`k2ray edge` in front of the app: cap = the app's capacity, 2 s header timeout, 1 MB bodies."""
    port = free_port()
    proc = subprocess.Popen(_edge_command("--listen", f"127.0.0.1:{port}", "--upstream", app.removeprefix("http://"),
                                          "--direct", f"127.0.0.1:{DIRECT_PORT}-{DIRECT_PORT + 1}", "--max-requests", str(CAPACITY), "--header-timeout",
                                          f"{HEADER_TIMEOUT_S}s", "--body-timeout", f"{HEADER_TIMEOUT_S}s",
                                          "--max-body", "1m"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(url + "/health") == 200, 30, 0.2, "the edge")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        # The command's nginx went with it.
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "nginx still listens after `k2ray edge` was stopped"


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_streams_pass_through_unchanged(app, edge_url):
    """A streamed completion through the edge arrives in as many chunks, with the same text, as straight from
    Serve."""
    req = dict(model=MODEL, prompt="Count to five", max_tokens=24, temperature=0, stream=True,
               extra_body={"ignore_eos": True})
    runs = {}
    for name, url in (("serve", app), ("edge", edge_url)):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        chunks = [c for c in client.completions.create(**req) if c.choices and c.choices[0].text]
        runs[name] = ["".join(c.choices[0].text for c in chunks), len(chunks)]
    assert runs["edge"] == runs["serve"] and runs["edge"][1] > 1, runs


async def _slow_client(port: int, first: bytes) -> float:
    """Send a request head one byte every 0.5 s (slowloris); the seconds until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    writer.write(first)
    try:
        while time.monotonic() - t0 < 20:
            try:
                data = await asyncio.wait_for(reader.read(1024), timeout=0.5)
                if not data:
                    break
            except asyncio.TimeoutError:
                writer.write(b"X")
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return time.monotonic() - t0


@pytest.mark.parametrize("route", ["direct ports alone", "proxy backing up missing direct ports"])
def test_edge_reaches_the_app_either_way(app, route):
    """The edge serves through the ingress replica's own port with the proxy down, and through the proxy when no
    replica answers on the direct ports."""
    dead = free_port()
    if route == "direct ports alone":
        settings = edge.EdgeSettings(listen=f"127.0.0.1:{free_port()}", upstream=f"127.0.0.1:{dead}",
                                     direct=f"127.0.0.1:{DIRECT_PORT}-{DIRECT_PORT}")
    else:
        settings = edge.EdgeSettings(listen=f"127.0.0.1:{free_port()}", upstream=app.removeprefix("http://"),
                                     direct=f"127.0.0.1:{dead}-{dead}")
    url = "http://" + settings.listen
    proc = edge.start(settings)
    try:
        wait_until(lambda: _status(url + "/health") == 200, 20, 0.2, "the edge")
        body = {"model": MODEL, "prompt": "Count to five", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        through = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        direct = httpx.post(app + "/v1/completions", json=body, timeout=60).json()
        assert through["choices"][0]["text"] == direct["choices"][0]["text"]
        assert through["usage"]["completion_tokens"] == 8
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_slow_clients_are_closed_after_the_header_timeout(edge_url):
    """40 slowloris connections and 10 silent ones are all closed shortly after the 2 s header timeout, and a normal
    request answers meanwhile."""
    port = int(edge_url.rsplit(":", 1)[1])
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: k2ray\r\nX-Slow: "

    async def run():
        slow = [asyncio.create_task(_slow_client(port, head)) for _ in range(40)]
        silent = [asyncio.create_task(_slow_client(port, b"")) for _ in range(10)]
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=edge_url, timeout=10) as c:
            t0 = time.monotonic()
            models = await c.get("/v1/models")
            models_s = time.monotonic() - t0
        return await asyncio.gather(*slow), await asyncio.gather(*silent), models.status_code, models_s

    slow, silent, models_status, models_s = asyncio.run(run())
    assert models_status == 200 and models_s < 2.0, (models_status, models_s)
    print(f"slowloris closed after {min(slow):.2f}-{max(slow):.2f} s, silent after {min(silent):.2f}-"
          f"{max(silent):.2f} s (header timeout {HEADER_TIMEOUT_S} s)")
    for closed_after in slow + silent:
        assert HEADER_TIMEOUT_S - 0.5 <= closed_after <= HEADER_TIMEOUT_S + 3, (slow, silent)


async def _raw_request(port: int, path: str, body: dict) -> tuple[int, dict, str, float]:
    """(status, headers, body text, seconds to the status line) over a bare connection."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: k2ray\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
            f"\r\nConnection: close\r\n\r\n").encode()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + data)
    status_line = await reader.readline()
    elapsed = time.monotonic() - t0
    raw = (await reader.read()).decode(errors="replace")
    writer.close()
    head_text, _, text = raw.partition("\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head_text.splitlines() if ": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, text, elapsed


def test_burst_over_the_cap_is_refused_at_once(edge_url):
    """64 streaming completions at once against a cap of 4: the rest get the OpenAI 503 `overloaded` with
    Retry-After within a fraction of a second, and every admitted request completes all its tokens."""
    port = int(edge_url.rsplit(":", 1)[1])
    body = {"model": MODEL, "prompt": "burst", "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}

    async def run():
        return await asyncio.gather(*(_raw_request(port, "/v1/completions", body) for _ in range(64)))

    results = asyncio.run(run())
    refused = [r for r in results if r[0] == 503]
    admitted = [r for r in results if r[0] == 200]
    assert len(refused) + len(admitted) == 64, sorted({r[0] for r in results})
    assert len(admitted) >= CAPACITY and len(refused) >= 48, (len(admitted), len(refused))
    for status, headers, text, _ in refused:
        err = json.loads(text)["error"]
        assert err["code"] == "overloaded" and err["type"] == "service_unavailable", err
        assert headers.get("retry-after") == "1" and headers["content-type"].startswith("application/json")
    times = sorted(r[3] for r in refused)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    print(f"refused {len(refused)}: p50 {times[len(times) // 2] * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms; "
          f"admitted {len(admitted)}")
    assert p99 < 1.0, times
    for _, _, text, _ in admitted:
        usage = re.findall(r'"completion_tokens":\s*(\d+)', text)
        assert usage and int(usage[-1]) == 48, text[-300:]


def test_messages_over_the_cap_get_anthropic_529(edge_url):
    """With the cap held by running streams, /v1/messages is refused in Anthropic's shape (529 overloaded_error)."""
    port = int(edge_url.rsplit(":", 1)[1])
    hold = {"model": MODEL, "prompt": "hold", "max_tokens": 160, "temperature": 0, "ignore_eos": True,
            "stream": True}
    message = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}

    async def run():
        holders = [asyncio.create_task(_raw_request(port, "/v1/completions", hold)) for _ in range(CAPACITY)]
        await asyncio.sleep(0.5)
        refused = await _raw_request(port, "/v1/messages", message)
        return refused, await asyncio.gather(*holders)

    (status, headers, text, elapsed), holders = asyncio.run(run())
    assert [h[0] for h in holders] == [200] * CAPACITY
    assert status == 529 and headers.get("retry-after") == "1", (status, text)
    assert json.loads(text) == {"type": "error", "error": {"type": "overloaded_error", "message": json.loads(
        text)["error"]["message"]}} and "overloaded" in text
    assert elapsed < 1.0


def test_large_body_is_a_json_413(edge_url):
    big = {"model": MODEL, "prompt": "x" * (2 << 20), "max_tokens": 1}
    r = httpx.post(edge_url + "/v1/completions", json=big, timeout=30)
    assert_openai_error(r, 413, "request_too_large")


def test_forwarded_clients_see_the_redacted_stats(app, edge_url):
    """Serve on loopback trusts a local operator; everyone who comes through the edge is a forwarded client and sees
    the redacted engine stats (top-level counters only)."""
    direct = httpx.get(app + "/v1/k2ray/stats", timeout=10).json()
    through = httpx.get(edge_url + "/v1/k2ray/stats", timeout=10).json()
    assert through["state"] == direct["state"] == "ready"
    assert "phase_time_s" in direct and "phase_time_s" not in through, (direct, through)
    assert set(through) < set(direct)


def test_upstream_down_is_an_api_error():
    """Nothing behind the edge: each API's own unavailable error, never nginx's HTML page."""
    port = free_port()
    settings = edge.EdgeSettings(listen=f"127.0.0.1:{port}", upstream=f"127.0.0.1:{free_port()}")
    proc = edge.start(settings)
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{port}/health") != 0, 20, 0.2, "the edge")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=10)
        assert_openai_error(r, 503, "model_unavailable")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", json={}, timeout=10)
        assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_deploy_file_settings_and_config_check():
    """`k2ray edge deploy/config.yaml` forwards to the deploy file's proxy with its capacity as the cap, and nginx
    accepts the configuration it prints."""
    s = edge.settings_from_deploy(ROOT / "deploy" / "config.yaml")
    assert (s.upstream, s.direct, s.max_requests, s.max_body, s.read_timeout) == (
        "127.0.0.1:8000", "127.0.0.1:30000-30003", 96, "4m", "660s")  # 2 ingress replicas at most: 4 ports
    out = subprocess.run(_edge_command(str(ROOT / "deploy" / "config.yaml"), "--print-config"), capture_output=True,
                         text=True, check=True).stdout
    assert "server 127.0.0.1:30000 max_fails=1 fail_timeout=30s;" in out and "server 127.0.0.1:8000 backup;" in out
    assert "limit_conn k2ray_generation 96;" in out and not re.search(r"\$\{K2RAY_EDGE_[A-Z_]+\}", out)
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"k2ray-edge-check-{os.getpid()}"
    main = edge.write_config(s, run_dir)
    check = subprocess.run([edge.nginx_binary(), "-t", "-e", "stderr", "-p", str(run_dir), "-c", str(main)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("argv, message", [
    (["--header-timeout", "soon"], "edge header_timeout must be an nginx duration such as 10s, got 'soon'"),
    (["--max-requests", "0"], "edge max_requests must be between 1 and 65535, got 0"),
    (["--upstream", "a b"], "edge upstream must be PORT or HOST:PORT, got 'a b'"),
    (["--direct", "127.0.0.1:30003-30000"], "edge direct must be HOST:FIRST-LAST"),
    (["no-such-deploy.yaml"], "no-such-deploy.yaml: cannot read the deploy file"),
])
def test_bad_arguments_are_one_line(argv, message):
    r = subprocess.run(_edge_command(*argv, "--print-config"), capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("k2ray: error: " + message) and r.stderr.count("\n") == 1, r.stderr
