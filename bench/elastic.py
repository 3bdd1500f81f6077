"""Live pool resizes under load: the pause of each switch, how long the new workers took to prepare, and what the
streaming clients saw, next to the same clients on a fixed layout in the same run.

A Ray model group (gloo, one node) on the tiny checkpoint serves ``--clients`` streaming requests in a loop. First
``--seconds`` on the fixed starting layout (1 attention worker + 2 expert shards); then the same load while the group
is resized ``--cycles`` times 1+2 -> 2+3 -> 1+2 (admin resizes, one after the other). Prints per switch: the pause
(no step ran) and the preparation time (reserve, start, load, stage: the old layout kept stepping), and for both
phases the tokens/s and the inter-token latency p50/p99 over all streams, with the ratios.

    python bench/elastic.py [--clients 16] [--cycles 3] [--seconds 20] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import ray

from k2ray.checkpoint.tiny import random_state_dict, tiny_config, write_checkpoint
from k2ray.config import EngineConfig, ModelArgs, ParallelConfig
from k2ray.engine.engine import LLMEngine
from k2ray.executor.ray import RayExecutor
from k2ray.runtime.sampling import SamplingParams

ENGINE = EngineConfig(num_kv_blocks=256, block_size=8, max_num_seqs=16, enable_prefix_caching=False)


async def _stream(engine, prompt, params, gaps: list[float]) -> int:
    last_t, n = None, 0
    async for out in engine.stream(prompt, params, request_id=f"b{time.monotonic_ns()}"):
        if out.error is not None:
            raise RuntimeError(out.error)
        now = time.perf_counter()
        k = len(out.outputs[0].token_ids)
        if last_t is not None and k > n:
            gaps.extend([(now - last_t) / (k - n)] * (k - n))
        last_t, n = now, k
    return n


async def _load(engine, clients: int, params, until) -> tuple[int, list[float], float]:
    """``clients`` streams, each asking again until ``until()`` is true; (tokens, inter-token gaps, seconds)."""
    gaps: list[float] = []
    tokens = 0

    async def client(i):
        nonlocal tokens
        prompt = [5 + i, 6 * i + 1, 7, 8 + i, 9, 10 * i + 3, 11, 12]
        while not until():
            tokens += await _stream(engine, prompt, params, gaps)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return tokens, gaps, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="the fixed-layout phase")
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        cfg = tiny_config()
        write_checkpoint(d, cfg, random_state_dict(ModelArgs.from_dict(cfg), seed=0))
        par = ParallelConfig(executor="ray", attention_workers=1, expert_shards=2,
                             elastic={"attention_workers": {"max": 2}, "expert_shards": {"max": 3},
                                      "drain_timeout_s": 5})
        ex = RayExecutor(d, ENGINE, par)
        engine = LLMEngine(ex, ENGINE)
        try:
            asyncio.run(_stream(engine, [1, 2, 3], params, []))  # warm-up
            deadline = time.monotonic() + a.seconds
            print(f"fixed layout 1+2: {a.clients} streaming clients for {a.seconds:.0f}s ...", flush=True)
            fixed = asyncio.run(_load(engine, a.clients, params, lambda: time.monotonic() > deadline))

            async def resizing():
                done = asyncio.Event()

                async def driver():
                    await asyncio.sleep(1.0)
                    for c in range(a.cycles):
                        for target in ((2, 3), (1, 2)):
                            await asyncio.to_thread(engine.resize, *target)
                            while (ex.layout.attention_workers, ex.layout.expert_shards) != target or \
                                    ex.pending_layout() is not None:
                                await asyncio.sleep(0.05)
                            r = ex.resizes[-1]
                            print(f"  cycle {c + 1}: -> {target[0]}+{target[1]}: prepared in {r['prepared_s']:.1f}s, "
                                  f"pause {1e3 * r['pause_s']:.0f} ms", flush=True)
                            await asyncio.sleep(1.0)
                    done.set()

                print(f"resizing 1+2 -> 2+3 -> 1+2 x {a.cycles} under the same load ...", flush=True)
                out, _ = await asyncio.gather(_load(engine, a.clients, params, done.is_set), driver())
                return out

            moving = asyncio.run(resizing())
        finally:
            engine.shutdown()
            ray.shutdown()
    switches = [r for r in ex.resizes if r["done"]]
    pauses = [1e3 * r["pause_s"] for r in switches]
    print()
    grow = ", ".join(f"{1e3 * r['pause_s']:.0f}" for r in switches if r["to"]["expert_shards"] == 3)
    shrink = ", ".join(f"{1e3 * r['pause_s']:.0f}" for r in switches if r["to"]["expert_shards"] == 2)
    prepared = statistics.median(r["prepared_s"] for r in switches)
    print(f"switches: {len(switches)}; pause ms p50 {statistics.median(pauses):.0f}, max {max(pauses):.0f} "
          f"(grow: {grow}; shrink: {shrink}); prepared in s p50 {prepared:.1f}")
    print(f"{'phase':<22} {'tok/s':>8} {'ITL p50 ms':>11} {'ITL p99 ms':>11}")
    rows = {"fixed 1+2": fixed, "resizing": moving}
    for name, (tokens, gaps, secs) in rows.items():
        print(f"{name:<22} {tokens / secs:8.1f} {1e3 * _pct(gaps, 0.5):11.1f} {1e3 * _pct(gaps, 0.99):11.1f}")
    (t0, g0, s0), (t1, g1, s1) = fixed, moving
    print(f"ratio resizing/fixed: tok/s {(t1 / s1) / (t0 / s0):.2f}, ITL p99 {_pct(g1, 0.99) / _pct(g0, 0.99):.2f}")


if __name__ == "__main__":
    main()
