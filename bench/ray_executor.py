"""Decode step time of the Ray executor (A attention workers x E expert shards, gloo) vs the local executor.

Same tiny checkpoint, same prompts, same run. Prints per batch size: ms/step, tokens/s, the Ray/local ratio and the
all-to-all time per MoE layer (dispatch, combine) measured inside the attention workers, for the group with the
shared expert run after the combine (baseline) and overlapped with the dispatch (``parallel.overlap_shared_expert``).

    python bench/ray_executor.py [--model DIR] [--batches 1 8 64] [--steps 20] [--attention-workers 1] [--expert-shards 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch

from k2ray.config import EngineConfig, ParallelConfig
from k2ray.runtime.sampling import SampleRequest, SamplingParams
from k2ray.runtime.step import SeqWork, StepInput
from k2ray.executor.local import LocalExecutor
from k2ray.executor.ray import RayExecutor

PROMPT_LEN = 32
GREEDY = SampleRequest(SamplingParams(temperature=0.0))


def decode_bench(executor, batch: int, steps: int, num_attention_workers: int, block_size: int):
    blocks_per_seq = -(-(PROMPT_LEN + steps + 2) // block_size)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 2000, (batch, PROMPT_LEN), generator=g).tolist()
    last, pos = [None] * batch, [0] * batch

    def step(first: bool):
        seqs = [
            SeqWork(i, prompts[i] if first else [last[i]], pos[i], tables[i], i % num_attention_workers, GREEDY)
            for i in range(batch)
        ]
        out = executor.execute(StepInput(seqs))
        for s in seqs:
            pos[s.seq_id] += len(s.token_ids)
            last[s.seq_id] = out.results[s.seq_id].sample.token_id
        return out.stats

    step(True)
    step(False)  # warm-up
    a2a = {"dispatch_s": 0.0, "combine_s": 0.0}
    t0 = time.perf_counter()
    for _ in range(steps):
        st = step(False)
        for k in a2a:
            a2a[k] += st.get(k, 0.0)
    dt = (time.perf_counter() - t0) / steps
    return dt, {k: v / steps for k, v in a2a.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint dir (default: a fresh tiny checkpoint)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attention-workers", type=int, default=1)
    ap.add_argument("--expert-shards", type=int, default=2)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from k2ray.checkpoint.tiny import random_state_dict, tiny_config, write_checkpoint
        from k2ray.config import ModelArgs

        model = tempfile.mkdtemp(prefix="k2ray-bench-")
        cfg = tiny_config()
        write_checkpoint(model, cfg, random_state_dict(ModelArgs.from_dict(cfg), 0))
    bs = 16
    need = max(args.batches) * -(-(PROMPT_LEN + args.steps + 2) // bs)
    engine = EngineConfig(num_kv_blocks=need, block_size=bs)
    # One torch thread everywhere: each Ray worker runs one, and a second OpenMP thread on a busy 2-core machine
    # makes every small op wait for a descheduled peer.
    torch.set_num_threads(1)
    local = LocalExecutor(model, engine)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    a, e = args.attention_workers, args.expert_shards
    local_dt = {b: decode_bench(local, b, args.steps, 1, bs)[0] for b in args.batches}
    # The same group twice: the shared expert after the combine (the baseline), then overlapped with it.
    ray_dt: dict[tuple[bool, int], tuple[float, dict]] = {}
    for overlap in (False, True):
        par = ParallelConfig(executor="ray", attention_workers=a, expert_shards=e, overlap_shared_expert=overlap)
        remote = RayExecutor(model, engine, par)
        moe_layers = len(remote.args.moe_layers)
        for b in args.batches:
            ray_dt[overlap, b] = decode_bench(remote, b, args.steps, a, bs)
        remote.shutdown()
    print(f"tiny K2, decode after a {PROMPT_LEN}-token prompt, {args.steps} steps; ray layout A={a} E={e} (gloo)")
    print(f"{'batch':>5} {'shared expert':>13} {'local ms/step':>13} {'local tok/s':>11} {'ray ms/step':>11} "
          f"{'ray tok/s':>9} {'ray/local':>9} {'a2a dispatch ms/layer':>21} {'combine ms/layer':>16}")
    for b in args.batches:
        lt = local_dt[b]
        for overlap in (False, True):
            rt, a2a = ray_dt[overlap, b]
            print(f"{b:>5} {'overlapped' if overlap else 'after':>13} {lt * 1e3:>13.2f} {b / lt:>11.1f} "
                  f"{rt * 1e3:>11.2f} {b / rt:>9.1f} {lt / rt:>9.2f} "
                  f"{a2a['dispatch_s'] / moe_layers / a * 1e3:>21.3f} {a2a['combine_s'] / moe_layers / a * 1e3:>16.3f}")
        print(f"{b:>5} overlapped / after: {ray_dt[False, b][0] / ray_dt[True, b][0]:.2f}x tokens/s")
    ray.shutdown()

if __name__ == "__main__":
    main()
