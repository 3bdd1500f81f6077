"""Long-context fairness (#21): do running streams keep producing tokens while a long prompt prefills?

Offline engine (local executor), one process. ``--streams`` requests with short prompts decode (EOS ignored); their
inter-token latencies (ITL: time between consecutive tokens of one stream, as the engine hands them out) are measured
for ``--baseline-steps`` steps, then a ``--prompt-len``-token prompt arrives and they are measured again until its
first token (its TTFT). Printed: ITL p50/p99 without and during the long prefill, their ratio, the TTFT, the number
of steps the prefill took and the longest step.

    python bench/fairness.py                                   # 64K-token prompt + 8 streams (long on 2 CPU cores)
    python bench/fairness.py --prompt-len 8192 --attention-cost-tokens 256 --max-step-ms 60
    python bench/fairness.py --prompt-len 8192 --attention-cost-tokens 1000000000   # ~ token-count budget only

Engine settings not given take EngineConfig's defaults (``max_num_batched_tokens`` 1024 and block size 16 here, as in
deploy/config.yaml); the cache is sized to hold everything.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from k2ray.checkpoint.builtin import BUILTIN_MODELS, resolve_model
from k2ray.config import EngineConfig
from k2ray.engine.engine import LLMEngine
from k2ray.runtime.sampling import SamplingParams


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def run(args: argparse.Namespace) -> dict:
    model = resolve_model(args.model) if args.model in BUILTIN_MODELS else args.model
    rng = random.Random(args.seed)
    stream_len = args.stream_prompt_len + args.stream_max_tokens
    tokens = args.prompt_len + 8 + args.streams * stream_len
    cfg = EngineConfig(
        block_size=args.block_size, num_kv_blocks=-(-tokens // args.block_size) + 8,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=max(64, args.streams + 1),
        attention_cost_tokens=args.attention_cost_tokens, max_step_ms=args.max_step_ms,
        max_step_cost=args.max_step_cost, enable_prefix_caching=False,
    )
    engine = LLMEngine.from_model(model, cfg)
    vocab = engine.args.vocab_size - 300  # below the special tokens
    stream_params = SamplingParams(max_tokens=args.stream_max_tokens, ignore_eos=True, temperature=0.0)
    streams = [engine.add_request([rng.randrange(1, vocab) for _ in range(args.stream_prompt_len)], stream_params,
                                  request_id=f"s{i}") for i in range(args.streams)]
    last: dict[str, float] = {}
    itl: dict[str, list[float]] = {"baseline": [], "prefill": []}
    step_ms: dict[str, list[float]] = {"baseline": [], "prefill": []}
    phase = "warmup"

    def step() -> list:
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if phase in step_ms:
            step_ms[phase].append((now - t0) * 1e3)
        for o in outs:
            if o.request_id in last and o.outputs[0].delta_token_ids and phase in itl:
                itl[phase].append((now - last[o.request_id]) * 1e3)
            if o.outputs[0].delta_token_ids:
                last[o.request_id] = now
        return outs

    while len(last) < args.streams:  # every stream has its first token
        step()
    for _ in range(3):
        step()
    phase = "baseline"
    for _ in range(args.baseline_steps):
        step()
    phase = "prefill"
    long_params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    t_arrive = time.perf_counter()
    engine.add_request([rng.randrange(1, vocab) for _ in range(args.prompt_len)], long_params, request_id="long")
    ttft = None
    while ttft is None:
        if not any(engine.get_request(s) for s in streams):
            raise SystemExit("the streams finished before the long prompt: raise --stream-max-tokens")
        for o in step():
            if o.request_id == "long":
                ttft = time.perf_counter() - t_arrive
    for s in streams:
        engine.abort_request(s)
    engine.shutdown()
    res = {
        "prompt_len": args.prompt_len, "streams": args.streams,
        "attention_cost_tokens": args.attention_cost_tokens, "max_step_ms": args.max_step_ms,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "itl_ms_baseline_p50": percentile(itl["baseline"], 50), "itl_ms_baseline_p99": percentile(itl["baseline"], 99),
        "itl_ms_prefill_p50": percentile(itl["prefill"], 50), "itl_ms_prefill_p99": percentile(itl["prefill"], 99),
        "ttft_s": ttft, "prefill_steps": len(step_ms["prefill"]), "max_step_ms_seen": max(step_ms["prefill"]),
        "stream_tokens_during_prefill": len(itl["prefill"]),
    }
    res["p99_ratio"] = res["itl_ms_prefill_p99"] / res["itl_ms_baseline_p99"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="k2ray-tiny", help="built-in name or checkpoint directory")
    ap.add_argument("--prompt-len", type=int, default=65536)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-prompt-len", type=int, default=64)
    ap.add_argument("--stream-max-tokens", type=int, default=100_000)
    ap.add_argument("--baseline-steps", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--attention-cost-tokens", type=int, default=EngineConfig().attention_cost_tokens)
    ap.add_argument("--max-step-ms", type=float, default=None)
    ap.add_argument("--max-step-cost", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args)
    print(f"{res['streams']} streams, {res['prompt_len']}-token prompt (attention_cost_tokens="
          f"{res['attention_cost_tokens']}, max_step_ms={res['max_step_ms']})")
    print(f"  ITL without the long prompt  p50 {res['itl_ms_baseline_p50']:8.1f} ms   p99 "
          f"{res['itl_ms_baseline_p99']:8.1f} ms")
    print(f"  ITL during its prefill       p50 {res['itl_ms_prefill_p50']:8.1f} ms   p99 "
          f"{res['itl_ms_prefill_p99']:8.1f} ms   (p99 ratio {res['p99_ratio']:.2f}x, "
          f"{res['stream_tokens_during_prefill']} stream tokens)")
    print(f"  long prompt TTFT {res['ttft_s']:.1f} s over {res['prefill_steps']} steps; longest step "
          f"{res['max_step_ms_seen']:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
