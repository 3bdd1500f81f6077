"""Elastic pools through the Serve app: the router's own policy grows the attention and expert pools under 16
streaming clients and shrinks them when the load is gone; the admin call resizes within the configured range. No
request fails, greedy outputs are those of the starting layout, every cache block is free at the end."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from .serve_helpers import assert_openai_error, serve_app, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "k2ray-tiny"
ARGS = {
    "model": "k2ray-tiny",
    "served_model_name": MODEL,
    "engine": {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 8, "max_num_batched_tokens": 512},
    "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5,
                 "collective_timeout_s": 30,
                 # Short windows so a test sees the policy act: attention up while sequences wait (16 clients, 8 run
                 # at a time), experts up while the attention workers wait on them, both down once idle.
                 "elastic": {"attention_workers": {"max": 2}, "expert_shards": {"max": 3}, "window_s": 2,
                             "cooldown_s": 2, "expert_wait_high": 0.05, "expert_wait_low": 0.01,
                             "drain_timeout_s": 5}},
    "router_cpus": 0.5,
    "max_queued_requests": 16,
}
PROMPTS = [f"request {i}: the quick brown fox number {i} jumps" for i in range(16)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with serve_app(ARGS, tmp_path_factory.mktemp("k2ray-cache")) as url:
        yield url


def _layout(base) -> dict:
    return httpx.get(base + "/v1/k2ray/layout", timeout=30).json()


def _sizes(base) -> tuple[int, int]:
    p = _layout(base)["parallel"]
    return p["attention_workers"], p["expert_shards"]


async def _stream(client, prompt: str) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return 200, "".join(text)


def test_policy_grows_under_load_and_shrinks_when_idle(base):
    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=180) as client:
            baseline = await asyncio.gather(*(_stream(client, p) for p in PROMPTS))
            results, seen = [], set()
            stop = asyncio.Event()

            async def client_loop(i):
                while not stop.is_set():
                    results.append((i, await _stream(client, PROMPTS[i])))

            async def watch():
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    seen.add(await asyncio.to_thread(_sizes, base))
                    if (2, 3) in seen:
                        break
                    await asyncio.sleep(0.3)
                stop.set()

            await asyncio.gather(watch(), *(client_loop(i) for i in range(len(PROMPTS))))
            return baseline, results, seen

    baseline, results, seen = asyncio.run(run())
    assert all(status == 200 for status, _ in baseline), baseline[:2]
    assert (2, 3) in seen, f"the policy did not grow both pools under load: {seen}"
    failed = [r for r in results if r[1][0] != 200]
    assert not failed, failed[:3]
    assert all(text == baseline[i][1] for i, (_, text) in results)
    # Idle: the policy shrinks both pools back to their minimum.
    wait_until(lambda: _sizes(base) == (1, 2), 180, 0.5, "the pools to shrink when idle")
    lay = _layout(base)
    done = [r for r in lay["resizes"] if r["done"]]
    assert all(r["reason"].startswith("policy") for r in done), done
    ups = [r for r in done if sum(r["to"].values()) > sum(r["from"].values())]
    downs = [r for r in done if sum(r["to"].values()) < sum(r["from"].values())]
    assert len(ups) >= 2 and len(downs) >= 2, done
    print("policy resizes:", [(r["from"], r["to"], round(1e3 * r["pause_s"], 1)) for r in done])
    st = httpx.get(base + "/v1/k2ray/stats", timeout=30).json()
    assert st["num_running"] == 0 and sum(st["num_free_blocks"]) == st["num_kv_blocks"] * len(st["num_free_blocks"])


def test_admin_resize_within_the_range(base):
    r = httpx.post(base + "/v1/k2ray/resize", json={"expert_shards": 4}, timeout=30)
    assert_openai_error(r, 400, "invalid_value", "expert_shards")
    r = httpx.post(base + "/v1/k2ray/resize", json={"expert_shards": "3"}, timeout=30)
    assert r.status_code == 400
    r = httpx.post(base + "/v1/k2ray/resize", json={"expert_shards": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["started"], r.text
    wait_until(lambda: any(x["done"] and x["reason"] == "admin" and x["to"]["expert_shards"] == 3
                           for x in _layout(base)["resizes"]), 120, 0.5, "the admin resize")
    # A request right after is served by whatever layout the group has now (the policy may shrink it again).
    status, text = asyncio.run(_one(base))
    assert status == 200 and text


async def _one(base):
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        return await _stream(client, PROMPTS[0])
