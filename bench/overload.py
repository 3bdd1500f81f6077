"""An overload burst against the Serve app: how fast are the requests beyond capacity refused, and do the admitted
ones complete?

Starts the app on loopback (k2ray-tiny, 1 attention worker + 2 expert shards, ``max_num_seqs`` + ``max_queued_requests``
= the capacity), fires ``--burst`` streaming completions at once, and prints, for the refused (503 ``overloaded``) and
the admitted requests, the latency percentiles as the client sees them (send -> status line), plus how many admitted
requests completed all their tokens. With ``--via both`` (the default) the same burst is fired twice in one run: at
Serve's proxy directly, then through k2ray's nginx edge (``k2ray edge``, its in-flight cap = the capacity).

    python bench/overload.py [--burst 600] [--max-num-seqs 32] [--max-queued 64] [--max-tokens 32] [--via both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
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


async def _one(host: str, port: int, i: int, max_tokens: int) -> tuple[int, float, int]:
    """(status, seconds from connecting to the status line, completion tokens in the final usage chunk).

    A bare asyncio HTTP/1.1 client (one connection per request, ``Connection: close``): an httpx client opening 600
    connections in one Python process spends ~0.7 s of its own before the last request is sent, which the refusal
    times would then include."""
    body = json.dumps({"model": "k2ray-tiny", "prompt": f"burst {i}", "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + body)
    status_line = await reader.readline()
    first = time.monotonic() - t0
    rest = (await reader.read()).decode(errors="replace")
    writer.close()
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/") else 0
    if status == 200 and '"error"' in rest:
        print("  stream error:", rest[rest.index('"error"'):][:200])
    tokens = re.findall(r'"completion_tokens":\s*(\d+)', rest)
    return status, first, int(tokens[-1]) if tokens else 0


async def _burst(base: str, n: int, max_tokens: int) -> list[tuple[int, float, int]]:
    url = httpx.URL(base)
    return await asyncio.gather(*(_one(url.host, url.port, i, max_tokens) for i in range(n)))


def _report(name: str, url: str, args) -> None:
    t0 = time.monotonic()
    results = asyncio.run(_burst(url, args.burst, args.max_tokens))
    wall = time.monotonic() - t0
    refused = [first for status, first, _ in results if status == 503]
    admitted = [(first, chunks) for status, first, chunks in results if status == 200]
    other = [status for status, _, _ in results if status not in (200, 503)]
    complete = sum(1 for _, chunks in admitted if chunks >= args.max_tokens)
    print(f"via {name}: burst of {args.burst} in {wall:.1f}s: {len(refused)} refused, {len(admitted)} admitted "
          f"({complete} complete), {len(other)} other {sorted(set(other))}", flush=True)
    for label, xs in (("refused", refused), ("admitted (first byte)", [f for f, _ in admitted])):
        if xs:
            print(f"  {label:22s} p50 {_pct(xs, .5) * 1e3:7.0f} ms  p99 {_pct(xs, .99) * 1e3:7.0f} ms  "
                  f"max {max(xs) * 1e3:7.0f} ms  mean {statistics.fmean(xs) * 1e3:7.0f} ms", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=600)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-queued", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--via", choices=["serve", "edge", "both"], default="both",
                    help="fire at Serve's proxy, through the nginx edge, or both in turn")
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
    capacity = args.max_num_seqs + args.max_queued
    targets = []
    if args.via in ("serve", "both"):
        targets.append(("Serve's proxy", base))
    edge_proc = None
    if args.via in ("edge", "both"):
        from k2ray import edge

        edge_port = _free_port()
        edge_proc = edge.start(edge.EdgeSettings(listen=f"127.0.0.1:{edge_port}", upstream=f"127.0.0.1:{port}",
                                                 max_requests=capacity, max_per_client=4 * args.burst))
        targets.append(("the nginx edge", f"http://127.0.0.1:{edge_port}"))
    try:
        for name, url in targets:
            while httpx.get(url + "/health", timeout=5).status_code != 200:
                time.sleep(0.5)
            asyncio.run(_burst(url, 4, 4))  # warm the path
            _report(name, url, args)
    finally:
        if edge_proc is not None:
            edge_proc.terminate()
            edge_proc.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
