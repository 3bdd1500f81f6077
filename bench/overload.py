"""An overload burst against the Serve app: how fast are the requests beyond capacity refused, and do the admitted
ones complete?

Starts the app on loopback (k2ray-tiny, 1 attention worker + 2 expert shards, ``max_num_seqs`` + ``max_queued_requests``
= the capacity), fires ``--burst`` streaming completions at once, and prints, for the refused (503 ``overloaded``) and
the admitted requests, the latency percentiles as the client sees them (send -> status line), plus how many admitted
requests completed all their tokens.

    python bench/overload.py [--burst 600] [--max-num-seqs 32] [--max-queued 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))] if s else float("nan")


async def _one(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[int, float, int]:
    body = {"model": "k2ray-tiny", "prompt": f"burst {i}", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        first = time.monotonic() - t0
        lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
    errors = [line for line in lines if '"error"' in line[:12]]
    if errors:
        print("  stream error:", errors[0][:200])
    return r.status_code, first, len(lines) - len(errors)


async def _burst(base: str, n: int, max_tokens: int) -> list[tuple[int, float, int]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        return await asyncio.gather(*(_one(client, i, max_tokens) for i in range(n)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=600)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-queued", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from k2ray.serve.app import build_app

    os.environ.setdefault("K2RAY_CACHE_DIR", tempfile.mkdtemp(prefix="k2ray-bench-"))
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"model": "k2ray-tiny", "engine": {"num_kv_blocks": 1024, "max_num_seqs": args.max_num_seqs},
                "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5},
                "router_cpus": 0.5, "max_queued_requests": args.max_queued}
    print(f"starting the app (capacity {args.max_num_seqs + args.max_queued} requests) ...", flush=True)
    serve.run(build_app(app_args), name="k2ray", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    while httpx.get(base + "/health", timeout=5).status_code != 200:
        time.sleep(0.5)
    asyncio.run(_burst(base, 4, 4))  # warm the path
    t0 = time.monotonic()
    results = asyncio.run(_burst(base, args.burst, args.max_tokens))
    wall = time.monotonic() - t0
    refused = [first for status, first, _ in results if status == 503]
    admitted = [(first, chunks) for status, first, chunks in results if status == 200]
    other = [status for status, _, _ in results if status not in (200, 503)]
    complete = sum(1 for _, chunks in admitted if chunks >= args.max_tokens)
    print(f"burst of {args.burst} in {wall:.1f}s: {len(refused)} refused, {len(admitted)} admitted "
          f"({complete} complete), {len(other)} other {sorted(set(other))}")
    for name, xs in (("refused", refused), ("admitted (first byte)", [f for f, _ in admitted])):
        if xs:
            print(f"  {name:22s} p50 {_pct(xs, .5) * 1e3:7.0f} ms  p99 {_pct(xs, .99) * 1e3:7.0f} ms  "
                  f"max {max(xs) * 1e3:7.0f} ms  mean {statistics.fmean(xs) * 1e3:7.0f} ms")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
