"""The CPU decode-attention twin (``mla_decode_torch``): length-grouped batches against one batch padded to the
longest context, in one run (#27).

For each case (batch, context lengths), times one call with a plan that groups sequences of similar length (the
default, made once per step and reused by every layer), the same planned inside the call, and one group padded to the
longest context (``max_padding=1``: what the twin did before), and prints the ratios. Four heads, latent 64 + 16,
block 16, fp32, one thread.

    python bench/mla_decode_twin.py [--calls 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from k2ray.kernels import mla_decode_plan, mla_decode_torch

CASES = [("32 x 100-193", [100 + 3 * i for i in range(32)]), ("32 x 40-350", [40 + 10 * i for i in range(32)]),
         ("one 2000 + seven 50", [2000] + [50] * 7), ("64 x 150", [150] * 64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    heads, latent, rope, bs = 4, 64, 16, 16
    print(f"{'case':<22} {'padded ms':>10} {'grouped ms':>11} {'grouped, planned in call':>25} {'padded / grouped':>17}")
    for name, lens_list in CASES:
        b, lens = len(lens_list), torch.tensor(lens_list, dtype=torch.int32)
        nb = -(-max(lens_list) // bs)
        cache = torch.randn(b * nb + 4, bs, latent + rope, generator=g)
        tables = torch.randperm(b * nb, generator=g).view(b, nb).to(torch.int32)
        ql, qr = torch.randn(b, heads, latent, generator=g), torch.randn(b, heads, rope, generator=g)
        args = (ql, qr, cache, tables, lens, 0.1)
        padded = {("mla_decode_plan", bs): mla_decode_plan(tables, lens, bs, max_padding=1.0)}
        grouped = {("mla_decode_plan", bs): mla_decode_plan(tables, lens, bs, token_macs=heads * (latent + rope))}
        torch.testing.assert_close(mla_decode_torch(*args, padded), mla_decode_torch(*args, grouped))

        def ms(cache_):
            mla_decode_torch(*args, cache_)
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    mla_decode_torch(*args, cache_)
                best = min(best, 1e3 * (time.perf_counter() - t0) / a.calls)
            return best

        p, q, r = ms(padded), ms(grouped), ms(None)
        print(f"{name:<22} {p:10.3f} {q:11.3f} {r:25.3f} {p / q:17.2f}")


if __name__ == "__main__":
    main()
