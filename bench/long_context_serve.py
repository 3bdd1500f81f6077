"""Long prompts through the Serve API (#21): TTFT, the attention worker's memory, streams running beside it, and the
greedy continuation against the offline engine.

Either starts its own app (``--tokens`` sized KV cache, 1 attention worker + 1 expert shard on the Ray executor,
``--chunk`` prompt tokens per step) or targets a running server (``--base``, e.g. ``serve run deploy/config.yaml``).
``--streams`` clients first stream short completions (EOS ignored) to measure their inter-token latency (ITL)
alone; then one ``--tokens``-token prompt (random ids, sent as a token array to ``/v1/completions``, greedy,
``--max-tokens``) arrives while they keep streaming. Printed: its TTFT and prefill tokens/s; the streams' ITL
p50/p99 alone and during the prefill and their ratio, and the longest gap; the attention worker's RSS growth during
the request next to the prompt's latent cache bytes (from ``/v1/k2ray/layout``'s pid, same machine only); and with
``--reference-chunk`` the same prompt's greedy tokens from the offline engine prefilled in chunks of that size
(``0``: the whole prompt as one chunk), which must be equal.

    python bench/long_context_serve.py --tokens 131072 --reference-chunk 0      # the tiny model, own app
    serve run deploy/config.yaml &  python bench/long_context_serve.py --base http://127.0.0.1:8000 \\
        --model k2ray-demo --tokens 49001 --streams 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))] if xs else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RSS:
    """Peak RSS of one process, sampled by a thread."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


async def _stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, stamps: list[float],
                  stop: asyncio.Event) -> None:
    """Stream completions one after another until ``stop``, stamping each token's arrival."""
    while not stop.is_set():
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    stamps.append(time.perf_counter())
                if stop.is_set():
                    break
        stamps.append(float("nan"))  # a new request: no gap across it


def _gaps(stamps: list[float], t0: float, t1: float) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:]) if a == a and b == b and t0 <= a and b <= t1]


async def _run(base: str, model: str, ids: list[int], args) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=None) as client:
        stop = asyncio.Event()
        stamps: list[list[float]] = [[] for _ in range(args.streams)]
        tasks = [asyncio.create_task(_stream(client, model, f"stream {i} says", args.stream_tokens, stamps[i], stop))
                 for i in range(args.streams)]
        await asyncio.sleep(args.baseline_s if args.streams else 0)
        t_alone = time.perf_counter()
        alone = [g for s in stamps for g in _gaps(s, t_alone - args.baseline_s + 2, t_alone)]
        body = {"model": model, "prompt": ids, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        t0 = time.perf_counter()
        ttft, tokens = None, []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise SystemExit(f"the long request got {r.status_code}: {(await r.aread()).decode()[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens.append(chunk["choices"][0]["text"])
        t_first = t0 + ttft
        during = [g for s in stamps for g in _gaps(s, t0, t_first)]
        produced = sum(1 for s in stamps for x in s if x == x and t0 <= x <= t_first)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"ttft": ttft, "text": "".join(tokens), "alone": alone, "during": during, "produced": produced}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a running server (default: start the app here)")
    ap.add_argument("--model", default="k2ray-tiny", help="model name (and, for the own app, the checkpoint)")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=2048, help="own app: engine.max_num_batched_tokens")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--streams", type=int, default=0)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--baseline-s", type=float, default=15.0)
    ap.add_argument("--reference-chunk", type=int, default=None,
                    help="also run the offline engine with this chunk size (0: one chunk) and compare tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from k2ray.checkpoint.builtin import BUILTIN_MODELS, resolve_model
    from k2ray.config import ModelArgs

    os.environ.setdefault("K2RAY_CACHE_DIR", tempfile.mkdtemp(prefix="k2ray-bench-"))
    model_dir = resolve_model(args.model) if args.model in BUILTIN_MODELS else Path(args.model)
    margs = ModelArgs.from_dir(model_dir)
    rng = random.Random(args.seed)
    ids = [rng.randrange(1, margs.vocab_size - 256) for _ in range(args.tokens)]

    started = False
    base = args.base
    if base is None:
        import ray
        from ray import serve

        from k2ray.serve.app import build_app

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        blocks = -(-(args.tokens + args.max_tokens + 64 * (args.streams + 1) * 2) // 16) + 16
        app = {"model": args.model, "engine": {"num_kv_blocks": blocks, "block_size": 16, "max_num_seqs": 16,
                                               "max_num_batched_tokens": args.chunk},
               "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 1, "cpus_per_worker": 1},
               "router_cpus": 0.5, "max_request_bytes": 16 << 20}
        print(f"starting the app ({blocks} KV blocks of 16, chunk {args.chunk}) ...", flush=True)
        serve.run(build_app(app), name="k2ray", route_prefix="/")
        base, started = f"http://127.0.0.1:{port}", True
    while httpx.get(base + "/health", timeout=5).status_code != 200:
        time.sleep(0.5)
    name = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
    layout = httpx.get(base + "/v1/k2ray/layout", timeout=30).json()
    pid = (layout.get("attention_workers") or [{}])[0].get("pid")
    print(f"# {args.tokens}-token prompt to {name} at {base} | streams {args.streams} | attention worker pid {pid}",
          flush=True)

    rss = _RSS(pid) if pid and psutil.pid_exists(pid) else None
    if rss is not None:
        with rss:
            res = asyncio.run(_run(base, name, ids, args))
    else:
        res = asyncio.run(_run(base, name, ids, args))
    print(f"TTFT {res['ttft']:.1f} s ({args.tokens / res['ttft']:.0f} prompt tokens/s); continuation {res['text']!r}")
    if args.streams:
        a50, a99 = _pct(res["alone"], 0.5) * 1e3, _pct(res["alone"], 0.99) * 1e3
        d50, d99 = _pct(res["during"], 0.5) * 1e3, _pct(res["during"], 0.99) * 1e3
        print(f"streams: ITL alone p50 {a50:.0f} ms p99 {a99:.0f} ms | during the prefill p50 {d50:.0f} ms "
              f"p99 {d99:.0f} ms (p99 ratio {d99 / a99:.2f}x), longest gap {max(res['during'] or [0]) * 1e3:.0f} ms, "
              f"{res['produced']} tokens streamed during the prefill")
    if rss is not None:
        fp32 = args.tokens * margs.kv_cache_dim * margs.num_hidden_layers * 4
        growth = rss.peak - rss.base
        print(f"attention worker RSS growth {growth / 2**20:.0f} MB; the prompt's latent cache {fp32 / 2**20:.0f} MB "
              f"in fp32 ({growth / fp32:.2f}x)")
    if started:
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
    if args.reference_chunk is not None:
        from k2ray.llm import LLM
        from k2ray.runtime.sampling import SamplingParams

        chunk = args.reference_chunk or args.tokens
        t0 = time.perf_counter()
        llm = LLM(model=str(model_dir), block_size=16, num_kv_blocks=args.tokens // 16 + 8,
                  max_num_batched_tokens=chunk, enable_prefix_caching=False)
        out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
        text = out[0].outputs[0].text
        llm.shutdown()
        same = text == res["text"]
        print(f"offline engine, chunk {chunk}: {text!r} in {time.perf_counter() - t0:.0f} s -> "
              f"{'same tokens' if same else 'DIFFERENT'}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
