"""Long prompts (#21): prefill throughput, time to first token and memory of k2ray's offline engine vs transformers.

One prompt of N random token ids per size, greedy, ``max_tokens`` 2. k2ray prefills it in chunks of ``--chunk``
tokens through the paged latent cache (a fresh ``LLM`` per size, its cache sized to the prompt); transformers'
``DeepseekV3ForCausalLM`` (sdpa attention) on the same weights runs the whole prompt in one forward, as a user of it
would, and is skipped where its ``[heads, N, N]`` fp32 score matrix alone would pass ``--hf-max-gb`` (its CPU sdpa
falls back to the math kernel for MLA's unequal key/value head sizes).

Memory is the growth of the process RSS during the request (sampled every 20 ms) next to the latent bytes the cache
holds for the prompt (kv_cache_dim × layers × itemsize × N). ``--check-memory`` exits 1 when k2ray's growth passes
1.5 × the fp32 latent bytes + ``--allowance-mb`` (the per-chunk activations, which do not grow with N).

Usage::

    python bench/long_context.py                               # 1K 8K 32K 64K 128K, chunk 2048
    python bench/long_context.py --sizes 1024 8192 --chunk 1024 --skip-hf
    python bench/long_context.py --sizes 131072 --skip-hf --check-memory
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

# Running as a script puts bench/ first on sys.path, where bench/kernels.py would shadow the ``kernels`` package that
# transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


class PeakRSS:
    """Highest RSS seen while the block runs, sampled by a thread (the GIL is free while torch computes)."""

    def __init__(self, period_s: float = 0.02):
        self.period_s, self.proc = period_s, psutil.Process()
        self.base = self.peak = 0

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def run_k2ray(model: str, ids: list[int], chunk: int, dtype: str) -> dict:
    from k2ray.llm import LLM
    from k2ray.runtime.sampling import SamplingParams

    n = len(ids)
    llm = LLM(model=model, dtype=dtype, block_size=16, num_kv_blocks=(n + 2) // 16 + 2,
              max_num_batched_tokens=chunk, enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    engine.add_request(list(range(1, 65)), params)  # warm-up: first-touch allocations, kernel selection
    while engine.has_unfinished_requests():
        engine.step()
    a = llm.engine.executor.args
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        ttft = None
        engine.add_request(ids, params)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if ttft is None and out.outputs[0].token_ids:
                    ttft = time.perf_counter() - t0
                if out.finished:
                    tokens = out.outputs[0].token_ids
        total = time.perf_counter() - t0
    itemsize = torch.finfo(llm.engine_config.torch_dtype).bits // 8
    model_obj = engine.executor.runner.model
    llm.shutdown()
    return {"ttft_s": ttft, "total_s": total, "rss_growth": mem.growth, "tokens": tokens, "model": model_obj,
            "latent_bytes": n * a.kv_cache_dim * a.num_hidden_layers * itemsize,
            "latent_bytes_fp32": n * a.kv_cache_dim * a.num_hidden_layers * 4}


def _bench_engine():
    """bench/engine.py (transformers with k2ray's dequantized weights), loaded by path: putting the checkout on
    sys.path would let its kernels/ folder shadow the ``kernels`` package transformers imports."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_engine", Path(__file__).with_name("engine.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.inference_mode()
def run_hf(hf, ids: list[int]) -> dict:
    hf(input_ids=torch.tensor([ids[:64]]), logits_to_keep=1)  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        logits = hf(input_ids=torch.tensor([ids]), logits_to_keep=1, use_cache=False).logits
        tok = int(logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
    return {"ttft_s": ttft, "rss_growth": mem.growth, "first_token": tok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="k2ray-tiny", help="built-in name or checkpoint dir (default k2ray-tiny)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 32768, 65536, 131072])
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens: prompt tokens per step")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine a second OpenMP thread waits "
                         "for a descheduled peer, measured 6-10x slower)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-max-gb", type=float, default=4.0,
                    help="skip transformers where heads × N² fp32 scores pass this (default 4)")
    ap.add_argument("--check-memory", action="store_true",
                    help="exit 1 if k2ray's RSS growth passes 1.5 × fp32 latent bytes + --allowance-mb")
    ap.add_argument("--allowance-mb", type=float, default=256.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from k2ray.checkpoint.builtin import BUILTIN_MODELS, resolve_model
    from k2ray.config import ModelArgs

    model_dir = resolve_model(args.model) if args.model in BUILTIN_MODELS else Path(args.model)
    margs = ModelArgs.from_dir(model_dir)
    print(f"# long prompts | {args.model} ({margs.num_hidden_layers} layers, {margs.num_attention_heads} heads, "
          f"kv_cache_dim {margs.kv_cache_dim}) {args.dtype} | torch {torch.__version__}, {args.threads} thread(s) | "
          f"chunk {args.chunk}, max_tokens 2, greedy", flush=True)
    print(f"{'tokens':>7} {'k2ray TTFT s':>12} {'k2ray tok/s':>11} {'k2ray RSS+ MB':>13} {'latent MB':>9} "
          f"{'hf TTFT s':>9} {'hf tok/s':>8} {'hf RSS+ MB':>10} {'same 1st':>8}", flush=True)
    hf = None
    failed = False
    for n in args.sizes:
        g = torch.Generator().manual_seed(args.seed + n)
        ids = torch.randint(1, margs.vocab_size - 256, (n,), generator=g).tolist()
        k = run_k2ray(str(model_dir), ids, args.chunk, args.dtype)
        mb = 1 << 20
        line = (f"{n:>7} {k['ttft_s']:>12.2f} {n / k['ttft_s']:>11.0f} {k['rss_growth'] / mb:>13.0f} "
                f"{k['latent_bytes'] / mb:>9.1f}")
        scores_gb = margs.num_attention_heads * n * n * 4 / 1e9
        if args.skip_hf:
            line += f" {'-':>9} {'-':>8} {'-':>10} {'-':>8}"
        elif scores_gb > args.hf_max_gb:
            line += f"   transformers skipped: its {scores_gb:.0f} GB score matrix passes --hf-max-gb {args.hf_max_gb}"
        else:
            if hf is None:
                hf = _bench_engine().hf_model(model_dir, k["model"])
                hf.set_attn_implementation("sdpa")
            h = run_hf(hf, ids)
            same = "yes" if h["first_token"] == k["tokens"][0] else "NO"
            line += f" {h['ttft_s']:>9.2f} {n / h['ttft_s']:>8.0f} {h['rss_growth'] / mb:>10.0f} {same:>8}"
        print(line, flush=True)
        if args.check_memory:
            bound = 1.5 * k["latent_bytes_fp32"] + args.allowance_mb * mb
            ok = k["rss_growth"] <= bound
            failed |= not ok
            print(f"# {n} tokens: RSS growth {k['rss_growth'] / mb:.0f} MB "
                  f"{'<=' if ok else '>'} bound {bound / mb:.0f} MB (1.5 × fp32 latent + {args.allowance_mb:.0f} MB)"
                  f"{'' if ok else '  FAILED'}", flush=True)
        del k
        gc.collect()
    print("# TTFT = request added -> first token (prefill of the whole prompt); tok/s = prompt tokens / TTFT; "
          "RSS+ = peak RSS growth during the request; latent MB = the prompt's latent cache bytes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
