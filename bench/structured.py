"""Decode throughput with grammar-constrained requests mixed in, vs none (same engine, same run).

At concurrency C (default 32) the engine runs C requests on the tiny model (make-tiny checkpoint: weights and
tokenizer); in the "mixed" run every other request is constrained to a JSON schema (xgrammar masks computed each
step), in the "free" run none is. All requests generate exactly ``--max-tokens`` tokens (EOS ignored; the constrained
ones stop early only if their grammar completes, and are counted by the tokens they produced). Prints output
tokens/s of both and the ratio, and the grammar-mask time per step.

    python bench/structured.py [--concurrency 32] [--max-tokens 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from k2ray.checkpoint.tiny import make_tiny
from k2ray.config import EngineConfig
from k2ray.engine.engine import LLMEngine
from k2ray.engine.input_processor import load_eos_token_ids, load_tokenizer
from k2ray.runtime.sampling import SamplingParams
from k2ray.engine.structured import GuidedDecoding
from k2ray.executor.local import LocalExecutor

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "temperature_c": {"type": "integer"},
                   "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]}},
    "required": ["city", "temperature_c", "condition"],
}


def run(engine: LLMEngine, prompts, params) -> tuple[float, int, float]:
    mask0 = engine.grammar_mask_time_s
    steps0 = engine.num_steps
    t0 = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += sum(len(o.token_ids) for o in out.outputs)
    dt = time.perf_counter() - t0
    steps = max(1, engine.num_steps - steps0)
    assert len(ids) == len(prompts)
    return dt, tokens, (engine.grammar_mask_time_s - mask0) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = make_tiny(tempfile.mkdtemp(prefix="k2ray-bench-"), seed=0)
    cfg = EngineConfig(max_num_seqs=a.concurrency, num_kv_blocks=a.concurrency * 8)
    engine = LLMEngine(LocalExecutor(model, cfg), cfg, load_tokenizer(model), load_eos_token_ids(model))
    tok = engine.tokenizer
    prompts = [tok.encode(f"Report the weather in city number {i} as JSON.") for i in range(a.concurrency)]
    free = SamplingParams(temperature=1.0, seed=1, max_tokens=a.max_tokens, ignore_eos=True)
    guided = free.model_copy(update={"guided_decoding": GuidedDecoding(json_schema=SCHEMA)})
    mixed_params = [guided if i % 2 == 0 else free for i in range(a.concurrency)]
    best = {}
    for _ in range(a.repeat):
        for name, params in (("free", [free] * a.concurrency), ("mixed", mixed_params)):
            dt, n, mask = run(engine, prompts, params)
            if name not in best or n / dt > best[name][0]:
                best[name] = (n / dt, n, dt, mask)
    print(f"tiny K2, local executor, concurrency {a.concurrency}, up to {a.max_tokens} tokens each, "
          f"best of {a.repeat}, {a.threads} torch thread(s)")
    print(f"{'run':>6} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'mask ms/step':>12}")
    for name in ("free", "mixed"):
        tps, n, dt, mask = best[name]
        print(f"{name:>6} {n:>7} {dt:>8.2f} {tps:>8.1f} {mask * 1e3:>12.3f}")
    print(f"mixed (50% constrained) / free throughput: {best['mixed'][0] / best['free'][0]:.2f}x")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
