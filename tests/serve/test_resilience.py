"""Resilience of the Serve app under load (issue 12): a bounded soak with 32 streaming clients, an expert shard
killed under load, and an overload burst far beyond the queue bound. One Serve instance for the module."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time

import httpx
import pytest

from .serve_helpers import descendant_pids, serve_app, wait_until
from .test_serve_api import _my_expert_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "k2ray-tiny"
MAX_NUM_SEQS = 32
MAX_QUEUED = 16
ARGS = {
    "model": "k2ray-tiny",
    "served_model_name": MODEL,
    "engine": {"num_kv_blocks": 1024, "block_size": 16, "max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": 1024},
    "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5,
                 "collective_timeout_s": 20},
    "router_cpus": 0.5,
    "max_queued_requests": MAX_QUEUED,
}
SOAK_SECONDS = float(os.environ.get("K2RAY_SOAK_SECONDS", "40"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with serve_app(ARGS, tmp_path_factory.mktemp("k2ray-cache")) as url:
        yield url


def _tree_rss_mb() -> dict[int, float]:
    """RSS of every process of this test's Ray cluster (descendants of this process), in MB."""
    mine = descendant_pids()
    out = {}
    for pid in mine:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        out[pid] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return out


async def _stream_one(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[int, int, str]:
    """One streaming completion; returns (status, tokens, error text)."""
    body = {"model": MODEL, "prompt": f"soak request {i} " * (1 + i % 5), "max_tokens": max_tokens,
            "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, 0, (await r.aread()).decode()[:200]
        tokens = 0
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return 500, tokens, str(chunk["error"])[:200]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return 200, tokens, ""


def _stats(base) -> dict:
    return httpx.get(base + "/v1/k2ray/stats", timeout=30).json()


def test_soak_32_streaming_clients(base):
    async def client_loop(client, c, deadline, results):
        i = 0
        while time.monotonic() < deadline:
            results.append(await _stream_one(client, c * 1000 + i, 16 + (c % 4) * 8))
            i += 1

    async def soak(seconds):
        results: list = []
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(client_loop(client, c, deadline, results) for c in range(32)))
        return results

    warm = asyncio.run(soak(min(10.0, SOAK_SECONDS / 4)))  # allocator and caches reach their working size
    assert all(s == 200 for s, _, _ in warm), [r for r in warm if r[0] != 200][:3]
    rss0 = _tree_rss_mb()
    results = asyncio.run(soak(SOAK_SECONDS))
    rss1 = _tree_rss_mb()
    errors = [r for r in results if r[0] != 200]
    assert not errors, errors[:5]
    assert len(results) >= 32 and all(t > 0 for _, t, _ in results)
    # Memory of every process that lived through the soak stays flat: within 10% + 25 MB each.
    grown = {pid: (rss0[pid], rss1[pid]) for pid in rss0.keys() & rss1.keys()
             if rss1[pid] > rss0[pid] * 1.10 + 25}
    assert not grown, grown
    # Load stopped: every KV block is free again (nothing running or waiting, no leaked references).
    wait_until(lambda: _stats(base)["num_running"] == 0 and _stats(base)["num_waiting"] == 0, 30, 0.5, "idle")
    s = _stats(base)
    assert s["kv_cache_usage"] == 0.0
    assert sum(s["num_free_blocks"]) == s["num_kv_blocks"] * len(s["num_free_blocks"])


BURST_TOKENS = 96  # long enough that the admitted requests still run while the rest of the burst arrives


def test_overload_gets_503_at_once_and_admitted_complete(base):
    n = 4 * (MAX_NUM_SEQS + MAX_QUEUED)

    async def burst():
        async with httpx.AsyncClient(base_url=base, timeout=120,
                                     limits=httpx.Limits(max_connections=n)) as client:
            async def one(i):
                t0 = time.monotonic()
                r = await _stream_one(client, i, BURST_TOKENS)
                return r, time.monotonic() - t0
            return await asyncio.gather(*(one(i) for i in range(n)))

    results = asyncio.run(burst())
    ok = [(r, dt) for r, dt in results if r[0] == 200]
    rejected = [(r, dt) for r, dt in results if r[0] in (429, 503)]
    assert len(ok) + len(rejected) == n, [r for r, _ in results if r[0] not in (200, 429, 503)][:3]
    # Some requests finish while the burst still arrives (on 2 cores the proxy takes seconds to accept 192
    # connections), so more than max_num_seqs + max_queued get in; a share is still refused.
    assert len(ok) >= MAX_NUM_SEQS and len(rejected) >= n // 8
    assert all(t == BURST_TOKENS for (_, t, _), _ in ok)
    # refused at once, not after queueing: refusals come back faster than admitted requests complete (on this 2-core
    # machine the HTTP proxy itself takes seconds to accept a burst of 192 connections, so no absolute bound)
    assert statistics.median(dt for _, dt in rejected) < statistics.median(dt for _, dt in ok)
    assert max(dt for _, dt in rejected) < 30
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_bench_serve_against_the_app(base, tmp_path):
    """`k2ray bench serve` drives the real server and reports what it measured (JSON for comparisons)."""
    from k2ray.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "serve", "--url", base, "--model", MODEL, "--concurrency", "1", "4", "--num-requests", "8",
               "--duration", "30", "--max-tokens", "8", "--spread", "0", "--ignore-eos", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["label"] for r in rows] == ["c=1", "c=4"]
    for r in rows:
        assert r["requests"] == 8 and r["errors"] == 0
        assert r["output_tokens_per_s"] > 0 and r["ttft_ms"]["p50"] > 0 and r["itl_ms"]["p50"] > 0
        assert r["output_tokens_per_s"] * r["duration_s"] == pytest.approx(8 * 8, rel=0.01)


def test_expert_shard_killed_under_load(base):
    kw = {"model": MODEL, "prompt": "Recovery check", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    before = httpx.post(base + "/v1/completions", json=kw, timeout=60).json()["choices"][0]["text"]

    async def load():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            tasks = [asyncio.create_task(_stream_one(client, i, 200)) for i in range(16)]
            await asyncio.sleep(2.0)
            shards = _my_expert_shards()
            assert len(shards) == 2, shards
            os.kill(shards[1], signal.SIGKILL)
            t0 = time.monotonic()
            res = await asyncio.gather(*tasks)
            return res, time.monotonic() - t0

    results, waited = asyncio.run(load())
    assert waited < 60, "in-flight requests hung after the shard died"
    failed = [r for r in results if r[0] != 200]
    assert failed, "killing a shard mid-run failed no in-flight request"
    for status, _, err in failed:  # clean failures: 503 before streaming, or an error event in the stream
        assert status in (500, 503) and ("failed" in err or "recover" in err or "model group" in err), err
    wait_until(lambda: httpx.get(base + "/health", timeout=10).status_code == 200
               and _stats(base)["state"] == "ready", 120, 1.0, "the group to recover")
    after = httpx.post(base + "/v1/completions", json=kw, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == before
    assert len(_my_expert_shards()) == 2


def test_expert_shard_killed_while_idle_is_found_before_a_request_fails(base):
    """Issue 20: the router pings an idle group's workers, so a shard that dies between requests turns /health
    non-200 within seconds (the group is rebuilt at once) and the next request, sent once /health is 200 again,
    succeeds instead of failing on the dead shard."""
    kw = {"model": MODEL, "prompt": "Idle check", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    before = httpx.post(base + "/v1/completions", json=kw, timeout=60)
    assert before.status_code == 200
    wait_until(lambda: _stats(base)["state"] == "ready" and _stats(base)["inflight"] == 0, 60, 0.5, "an idle group")
    shards = _my_expert_shards()
    assert len(shards) == 2, shards
    os.kill(shards[0], signal.SIGKILL)
    t0 = time.monotonic()

    def not_ready():
        r = httpx.get(base + "/health", timeout=10)
        return r.json() if r.status_code != 200 else None

    body = wait_until(not_ready, 15, 0.1, "/health to see the shard that died while idle")
    assert time.monotonic() - t0 < 10
    assert body["status"] in ("recovering", "starting"), body
    assert "pid" not in json.dumps(body).lower()
    wait_until(lambda: httpx.get(base + "/health", timeout=10).status_code == 200
               and _stats(base)["state"] == "ready", 120, 0.5, "the group to be rebuilt")
    after = httpx.post(base + "/v1/completions", json=kw, timeout=60)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    new_shards = _my_expert_shards()
    assert len(new_shards) == 2 and shards[0] not in new_shards
