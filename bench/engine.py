"""Offline throughput: k2ray's continuous-batching engine (local executor) vs HuggingFace transformers ``generate``.

Both run the same tiny K2 checkpoint (HF's DeepseekV3ForCausalLM gets k2ray's dequantized weights), in fp32, on the
same requests — mixed prompt lengths and mixed max_tokens, greedy, EOS ignored so both produce exactly the requested
tokens — in the same process, one after the other. At concurrency C:

* k2ray: all requests are submitted to ``LLM.generate`` with ``max_num_seqs=C``; the engine keeps at most C sequences
  running and refills free slots as requests finish (chunked prefill mixed with decode).
* transformers: the requests are cut into consecutive batches of C, each run with one ``generate`` call (left
  padding, ``max_new_tokens`` = the batch's largest max_tokens, outputs truncated to each request's max_tokens) —
  what a user of transformers does to batch.

Throughput = requested output tokens / wall time. Usage::

    python bench/engine.py                       # concurrency 1 8 32 128, fresh tiny checkpoint
    python bench/engine.py --concurrency 32 --threads 1 --model DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from k2ray.config import EngineConfig, ModelArgs
from k2ray.engine.engine import LLMEngine
from k2ray.runtime.sampling import SamplingParams
from k2ray.executor.local import LocalExecutor


def make_requests(n: int, seed: int, vocab: int, prompt_range: tuple[int, int], out_range: tuple[int, int]):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        reqs.append(([rng.randrange(1, vocab) for _ in range(plen)], rng.randint(*out_range)))
    return reqs


def tiny_checkpoint(path: Path) -> Path:
    from k2ray.checkpoint.tiny import random_state_dict, tiny_config, write_checkpoint

    cfg = tiny_config()
    write_checkpoint(path, cfg, random_state_dict(ModelArgs.from_dict(cfg), seed=0))
    return path


def hf_model(model_dir: Path, ours: torch.nn.Module):
    """transformers' DeepseekV3ForCausalLM with k2ray's (dequantized) weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["model_type"] = "deepseek_v3"
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).float().eval()
    names = {"mlp.experts.w13": "mlp.experts.gate_up_proj", "mlp.experts.w2": "mlp.experts.down_proj"}
    sd = {}
    for k, v in ours.state_dict().items():
        for a, b in names.items():
            k = k.replace(a, b)
        sd[k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise RuntimeError(f"weight mapping failed: missing={missing} unexpected={unexpected}")
    return hf


def run_k2ray(executor, reqs, concurrency: int, max_batched_tokens: int) -> tuple[float, list[list[int]], dict]:
    cfg = EngineConfig(block_size=executor.block_size, num_kv_blocks=executor.num_kv_blocks,
                       max_num_seqs=concurrency, max_num_batched_tokens=max_batched_tokens)
    engine = LLMEngine(executor, cfg)
    ids = []
    t = time.perf_counter()
    for prompt, mt in reqs:
        ids.append(engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=mt, ignore_eos=True)))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    dt = time.perf_counter() - t
    return dt, [final[i] for i in ids], engine.metrics()


@torch.inference_mode()
def run_hf(hf, reqs, concurrency: int, pad_id: int) -> tuple[float, list[list[int]]]:
    outs = []
    t = time.perf_counter()
    for s in range(0, len(reqs), concurrency):
        batch = reqs[s : s + concurrency]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        new = max(mt for _, mt in batch)
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=pad_id)
        for i, (_, mt) in enumerate(batch):
            outs.append(gen[i, width : width + mt].tolist())
    return time.perf_counter() - t, outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="tiny checkpoint dir (default: write one to a temp dir)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per concurrency level (default: max(8, 2 * concurrency))")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--max-batched-tokens", type=int, default=EngineConfig().max_num_batched_tokens)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both systems")
    ap.add_argument("--repeat", type=int, default=2, help="runs per system and level, alternating; best time kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="k2ray-bench-")
        model_dir = tiny_checkpoint(Path(tmp.name))
    margs = ModelArgs.from_dir(model_dir)
    biggest = max(args.concurrency)
    blocks = -(-(args.prompt_len[1] + args.max_tokens[1]) // 16) * biggest + 64
    executor = LocalExecutor(model_dir, EngineConfig(block_size=16, num_kv_blocks=blocks))
    hf = None if args.skip_hf else hf_model(Path(model_dir), executor.runner.model)
    pad_id = margs.pad_token_id if margs.pad_token_id is not None else 0

    print(f"# k2ray engine vs transformers generate | tiny K2 ({margs.num_hidden_layers} layers, hidden "
          f"{margs.hidden_size}, {margs.n_routed_experts} experts top-{margs.num_experts_per_tok}) fp32 | "
          f"torch {torch.__version__}, {args.threads} thread(s) | prompts {args.prompt_len[0]}-{args.prompt_len[1]} "
          f"tokens, max_tokens {args.max_tokens[0]}-{args.max_tokens[1]}, greedy, best of {args.repeat}")
    # warm-up (first-touch allocations, kernel selection) for both, on a few small requests
    warm = make_requests(4, args.seed + 1, margs.vocab_size, (8, 64), (4, 8))
    run_k2ray(executor, warm, 4, args.max_batched_tokens)
    if hf is not None:
        run_hf(hf, warm, 4, pad_id)

    header = f"{'conc':>5} {'reqs':>5} {'out_tok':>8} {'k2ray tok/s':>12} {'hf tok/s':>10} {'ratio':>7} {'same':>6}"
    print(header)
    rows = []
    for c in args.concurrency:
        n = args.requests or max(8, 2 * c)
        reqs = make_requests(n, args.seed, margs.vocab_size, tuple(args.prompt_len), tuple(args.max_tokens))
        tokens = sum(mt for _, mt in reqs)
        # Alternate the two systems and keep each one's best time: the machine may be shared, and interleaving keeps
        # load changes from favouring one side.
        k_dt = h_dt = float("inf")
        for _ in range(args.repeat):
            dt, k_out, metrics = run_k2ray(executor, reqs, c, args.max_batched_tokens)
            k_dt = min(k_dt, dt)
            if hf is not None:
                dt, h_out = run_hf(hf, reqs, c, pad_id)
                h_dt = min(h_dt, dt)
        row = {"concurrency": c, "requests": n, "output_tokens": tokens, "k2ray_s": k_dt,
               "k2ray_tok_s": tokens / k_dt, "k2ray_steps": metrics["num_steps"],
               "k2ray_phase_s": metrics["phase_time_s"]}
        if hf is not None:
            same = sum(a == b for a, b in zip(k_out, h_out)) / n
            row.update(hf_s=h_dt, hf_tok_s=tokens / h_dt, ratio=h_dt / k_dt, same_tokens=same)
            print(f"{c:>5} {n:>5} {tokens:>8} {tokens / k_dt:>12.0f} {tokens / h_dt:>10.0f} {h_dt / k_dt:>6.2f}x "
                  f"{same:>6.0%}", flush=True)
        else:
            print(f"{c:>5} {n:>5} {tokens:>8} {tokens / k_dt:>12.0f} {'-':>10} {'-':>7} {'-':>6}", flush=True)
        rows.append(row)
    print("# same = share of requests whose greedy tokens are identical in both systems")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    executor.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
