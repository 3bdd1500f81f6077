"""Kernel benchmark at real Kimi K2 shapes: W4A16 fused MoE and absorbed-MLA decode, Triton vs torch references.

    python bench/kernels.py                      # everything (needs a CUDA GPU; ~45 GB of GPU memory at 384 experts)
    python bench/kernels.py --only moe --batches 1,8,64 --experts 64
    python bench/kernels.py --only mla --contexts 8192 --json mla.json

Per configuration it prints the median time (L2 flushed before every timed call), the achieved bandwidth over the
bytes the operation must move at least (active INT4 expert weights + scales + activations; the used part of the latent
cache + q + out), TFLOP/s and the fraction of the GPU's HBM peak, next to the torch references in the same run:

- MoE: ``bf16-ref`` = experts pre-dequantized to bf16, one torch matmul pair per active expert (routing bookkeeping
  outside the timed region); ``twin`` = ``fused_moe_int4_torch`` (dequantize-then-matmul in fp32, the CPU path).
- MLA: ``twin`` = ``mla_decode_torch`` (gather + fp32 einsum softmax), run while its fp32 gather fits the budget.

Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

# HBM peak (bytes/s) by substring of torch.cuda.get_device_name(); first match wins. Vendor datasheet figures.
HBM_PEAK = (
    ("H200", 4.8e12),
    ("GH200", 4.0e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80GB HBM3
    ("H800", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
)

# Kimi K2 shapes (docs: shared/reference kimi-k2 §1).
HIDDEN, MOE_INTER, TOP_K = 7168, 2048, 8
HEADS, KV_LORA, ROPE = 64, 512, 64
QK_HEAD = 128 + 64
DEVICE = "cuda"


def hbm_peak(name: str, override_gbs: float | None) -> float | None:
    if override_gbs:
        return override_gbs * 1e9
    return next((bw for key, bw in HBM_PEAK if key in name), None)


class Timer:
    """Median of CUDA-event times, flushing L2 (a 256 MiB write) before each call."""

    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self.flush_buf = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def fmt(t: float, nbytes: float, flops: float, peak: float | None) -> str:
    gbs = nbytes / t / 1e9
    frac = f"{100 * nbytes / t / peak:5.1f}%" if peak else "   n/a"
    return f"{t * 1e3:9.3f} ms {gbs:8.1f} GB/s {flops / t / 1e12:7.2f} TFLOP/s {frac} HBM"


# --------------------------------------------------------------------------------------------------------------------
# MoE


def bench_moe(args, timer, peak, results):
    from k2ray.kernels import fused_moe_int4_torch, fused_moe_int4_triton
    from k2ray.checkpoint.int4 import dequantize_int4

    E, H, I = args.experts, HIDDEN, MOE_INTER
    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(0)
    # Random nibbles are as good as real ones for timing; scales keep the outputs finite.
    w13p = torch.randint(-2**31, 2**31 - 1, (E, 2 * I, H // 8), dtype=torch.int32, device=dev, generator=gen)
    w2p = torch.randint(-2**31, 2**31 - 1, (E, H, I // 8), dtype=torch.int32, device=dev, generator=gen)
    w13s = (torch.rand(E, 2 * I, H // 32, device=dev, generator=gen) * 2e-3 + 1e-3).to(torch.bfloat16)
    w2s = (torch.rand(E, H, I // 32, device=dev, generator=gen) * 2e-3 + 1e-3).to(torch.bfloat16)
    per_expert_int4 = (w13p[0].numel() + w2p[0].numel()) * 4 + (w13s[0].numel() + w2s[0].numel()) * 2
    w13_bf16 = w2_bf16 = None
    if not args.no_bf16_ref:
        w13_bf16 = torch.stack([dequantize_int4(w13p[e], w13s[e], dtype=torch.bfloat16) for e in range(E)])
        w2_bf16 = torch.stack([dequantize_int4(w2p[e], w2s[e], dtype=torch.bfloat16) for e in range(E)])
    per_expert_bf16 = 3 * H * I * 2
    print(f"# MoE W4A16: hidden {H}, expert intermediate {I}, {E} experts, top-{TOP_K}; "
          f"{per_expert_int4 / 1e6:.1f} MB per INT4 expert")

    for T in args.batches:
        x = torch.randn(T, H, device=dev, generator=gen).to(torch.bfloat16)
        ids = torch.rand(T, E, device=dev, generator=gen).topk(TOP_K, dim=1).indices
        weights = torch.softmax(torch.randn(T, TOP_K, device=dev, generator=gen), dim=1)
        active = int(torch.unique(ids).numel())
        act_bytes = 2 * T * H * 2  # x in, out
        nbytes = active * per_expert_int4 + act_bytes
        flops = 6.0 * T * TOP_K * H * I
        row = {"kernel": "moe", "batch": T, "active_experts": active, "bytes": nbytes, "flops": flops}

        t_tri = timer(lambda: fused_moe_int4_triton(x, w13p, w13s, w2p, w2s, ids, weights))
        row["triton_s"] = t_tri
        line = f"moe  T={T:4d} experts={active:3d} | triton {fmt(t_tri, nbytes, flops, peak)}"

        if w13_bf16 is not None:
            flat = ids.reshape(-1)
            groups = []
            for e in torch.unique(flat).tolist():
                r = torch.nonzero(flat == e).squeeze(1)
                groups.append((e, r // TOP_K, weights.reshape(-1)[r].unsqueeze(1)))

            def bf16_ref():
                out = torch.zeros(T, H, device=dev, dtype=torch.float32)
                for e, tok, w in groups:
                    h = x[tok] @ w13_bf16[e].T
                    a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
                    out.index_add_(0, tok, (a @ w2_bf16[e].T).float() * w)
                return out.to(torch.bfloat16)

            t_ref = timer(bf16_ref)
            ref_bytes = active * per_expert_bf16 + act_bytes
            row["bf16_ref_s"] = t_ref
            line += f" | bf16-ref {fmt(t_ref, ref_bytes, flops, peak)} | speedup {t_ref / t_tri:5.2f}x"
        if not args.no_twin and T <= args.twin_max_batch:
            t_twin = timer(lambda: fused_moe_int4_torch(x, w13p, w13s, w2p, w2s, ids, weights))
            row["twin_s"] = t_twin
            line += f" | twin {t_twin * 1e3:9.3f} ms"
        if args.check:
            got = fused_moe_int4_triton(x, w13p, w13s, w2p, w2s, ids, weights).float()
            want = fused_moe_int4_torch(x, w13p, w13s, w2p, w2s, ids, weights).float()
            row["max_rel_err"] = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
            line += f" | rel err {row['max_rel_err']:.1e}"
        print(line, flush=True)
        results.append(row)
    del w13p, w2p, w13s, w2s, w13_bf16, w2_bf16
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# MLA decode


def bench_mla(args, timer, peak, results):
    from k2ray.kernels import mla_decode_torch, mla_decode_triton, yarn_softmax_scale

    dev, bs = DEVICE, args.block_size
    L, R, Hq = KV_LORA, ROPE, HEADS
    sm_scale = yarn_softmax_scale(QK_HEAD, 64.0, 1.0)  # K2-Thinking rope_scaling
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"# MLA decode: {Hq} heads, latent {L} + rope {R}, bf16 cache, block size {bs}")
    for ctx in args.contexts:
        for B in args.batches:
            blocks_per_seq = -(-ctx // bs)
            num_blocks = B * blocks_per_seq
            cache_bytes = num_blocks * bs * (L + R) * 2
            if cache_bytes > args.max_cache_gb * 1e9:
                print(f"mla  B={B:4d} ctx={ctx:6d} | skipped: cache {cache_bytes / 1e9:.1f} GB > --max-cache-gb")
                continue
            cache = torch.randn(num_blocks, bs, L + R, device=dev, generator=gen, dtype=torch.bfloat16)
            # Scattered blocks, like a long-running paged cache.
            tables = torch.randperm(num_blocks, device=dev, generator=gen).view(B, blocks_per_seq).to(torch.int32)
            lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            q_l = torch.randn(B, Hq, L, device=dev, generator=gen, dtype=torch.bfloat16)
            q_r = torch.randn(B, Hq, R, device=dev, generator=gen, dtype=torch.bfloat16)
            nbytes = B * ctx * (L + R) * 2 + B * Hq * (L + R) * 2 + B * Hq * L * 2
            flops = 2.0 * B * Hq * ctx * (L + R + L)
            row = {"kernel": "mla", "batch": B, "context": ctx, "bytes": nbytes, "flops": flops}
            fn = lambda: mla_decode_triton(q_l, q_r, cache, tables, lens, sm_scale)  # noqa: E731
            t_tri = timer(fn)
            row["triton_s"] = t_tri
            line = f"mla  B={B:4d} ctx={ctx:6d} | triton {fmt(t_tri, nbytes, flops, peak)}"
            if not args.no_twin and B * ctx * (L + R) * 4 <= args.twin_budget_gb * 1e9:
                ref = lambda: mla_decode_torch(q_l, q_r, cache, tables, lens, sm_scale)  # noqa: E731
                t_ref = timer(ref)
                row["twin_s"] = t_ref
                line += f" | twin {fmt(t_ref, nbytes, flops, peak)} | speedup {t_ref / t_tri:6.2f}x"
                if args.check:
                    got, want = fn().float(), ref().float()
                    row["max_abs_err"] = float((got - want).abs().max())
                    line += f" | abs err {row['max_abs_err']:.1e}"
            print(line, flush=True)
            results.append(row)
            del cache, tables, q_l, q_r
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("moe", "mla"), default=None)
    p.add_argument("--batches", type=ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--contexts", type=ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--experts", type=int, default=384, help="routed experts held (K2: 384)")
    p.add_argument("--block-size", type=int, default=64, help="latent-cache block size")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-bf16-ref", action="store_true", help="skip the bf16 MoE reference (saves ~34 GB at 384)")
    p.add_argument("--no-twin", action="store_true", help="skip the torch twins")
    p.add_argument("--twin-max-batch", type=int, default=64, help="largest MoE batch timed with the slow twin")
    p.add_argument("--twin-budget-gb", type=float, default=8.0, help="largest fp32 gather for the MLA twin")
    p.add_argument("--max-cache-gb", type=float, default=24.0)
    p.add_argument("--check", action="store_true", help="also report the error against the torch twin")
    p.add_argument("--hbm-peak-gbs", type=float, default=None, help="override the HBM peak (GB/s)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; kernel figures need a GPU (nothing run)")
        return 0
    from k2ray.kernels import HAS_TRITON

    if not HAS_TRITON:
        print("bench/kernels.py: triton is not importable; install k2ray[kernels]")
        return 0
    name = torch.cuda.get_device_name()
    peak = hbm_peak(name, args.hbm_peak_gbs)
    peak_txt = f"{peak / 1e9:.0f} GB/s" if peak else "unknown (pass --hbm-peak-gbs)"
    print(f"# device: {name}; HBM peak {peak_txt}; torch {torch.__version__}")
    timer = Timer(args.iters, args.warmup)
    results: list[dict] = []
    if args.only in (None, "moe"):
        bench_moe(args, timer, peak, results)
    if args.only in (None, "mla"):
        bench_mla(args, timer, peak, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "hbm_peak_Bps": peak, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
