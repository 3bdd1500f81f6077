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

The pieces (:class:`Timer`, :func:`make_moe_weights`, :func:`measure_moe`, :func:`make_mla_inputs`,
:func:`measure_mla`, the byte counts) take their shapes and device as arguments, so ``bench/gpu/campaign.py`` runs
the same code at K2 shapes on a GPU and at tiny shapes on CPU (its dry run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

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
GROUP = 32
DEVICE = "cuda"


def hbm_peak(name: str, override_gbs: float | None) -> float | None:
    if override_gbs:
        return override_gbs * 1e9
    return next((bw for key, bw in HBM_PEAK if key in name), None)


class Timer:
    """Median time of a call. On CUDA: CUDA events, L2 flushed (a 256 MiB write) before each call. Elsewhere (the
    campaign's dry run on CPU): the host clock around the call."""

    def __init__(self, iters: int, warmup: int, device: str = DEVICE):
        self.iters, self.warmup = iters, warmup
        self.cuda = torch.device(device).type == "cuda"
        self.flush_buf = torch.empty(256 * 2**20 if self.cuda else 1, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if not self.cuda:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                continue
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


@dataclass
class MoEWeights:
    """Random INT4 experts (``[E, out, in/8]`` int32 + bf16 scales per 32) and optionally their bf16 dequantization."""

    w13p: torch.Tensor
    w13s: torch.Tensor
    w2p: torch.Tensor
    w2s: torch.Tensor
    w13_bf16: torch.Tensor | None = None
    w2_bf16: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w13p.shape[0]

    @property
    def hidden(self) -> int:
        return self.w2p.shape[1]

    @property
    def inter(self) -> int:
        return self.w13p.shape[1] // 2

    @property
    def per_expert_int4_bytes(self) -> int:
        return (self.w13p[0].numel() + self.w2p[0].numel()) * 4 + (self.w13s[0].numel() + self.w2s[0].numel()) * 2

    @property
    def per_expert_bf16_bytes(self) -> int:
        return 3 * self.hidden * self.inter * 2

    def int4(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w13p, self.w13s, self.w2p, self.w2s


def make_moe_weights(E: int, H: int, I: int, device: str = DEVICE, seed: int = 0, bf16_ref: bool = True) -> MoEWeights:
    from k2ray.checkpoint.int4 import dequantize_int4

    gen = torch.Generator(device=device).manual_seed(seed)
    # Random nibbles are as good as real ones for timing; scales keep the outputs finite.
    w13p = torch.randint(-2**31, 2**31 - 1, (E, 2 * I, H // 8), dtype=torch.int32, device=device, generator=gen)
    w2p = torch.randint(-2**31, 2**31 - 1, (E, H, I // 8), dtype=torch.int32, device=device, generator=gen)
    w13s = (torch.rand(E, 2 * I, H // GROUP, device=device, generator=gen) * 2e-3 + 1e-3).to(torch.bfloat16)
    w2s = (torch.rand(E, H, I // GROUP, device=device, generator=gen) * 2e-3 + 1e-3).to(torch.bfloat16)
    w = MoEWeights(w13p, w13s, w2p, w2s)
    if bf16_ref:  # filled expert by expert: no second copy of ~34 GB at K2's 384 experts
        w.w13_bf16 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=device)
        w.w2_bf16 = torch.empty(E, H, I, dtype=torch.bfloat16, device=device)
        for e in range(E):
            w.w13_bf16[e] = dequantize_int4(w13p[e], w13s[e], dtype=torch.bfloat16)
            w.w2_bf16[e] = dequantize_int4(w2p[e], w2s[e], dtype=torch.bfloat16)
    return w


def moe_routing(T: int, w: MoEWeights, top_k: int, gen: torch.Generator, dtype=torch.bfloat16):
    """``(x [T, H], topk_ids [T, K], topk_weights [T, K])``: distinct uniformly random experts per token."""
    dev = w.w13p.device
    x = torch.randn(T, w.hidden, device=dev, generator=gen).to(dtype)
    ids = torch.rand(T, w.num_experts, device=dev, generator=gen).topk(top_k, dim=1).indices
    weights = torch.softmax(torch.randn(T, top_k, device=dev, generator=gen), dim=1)
    return x, ids, weights


def moe_bytes(active_experts: int, w: MoEWeights, T: int) -> int:
    """The fewest bytes the fused W4A16 MoE must move: the active experts' INT4 weights and scales, x in, out."""
    return active_experts * w.per_expert_int4_bytes + 2 * T * w.hidden * 2


def bf16_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w: MoEWeights) -> Callable[[], torch.Tensor]:
    """One torch bf16 matmul pair per active expert on pre-dequantized weights (the routing bookkeeping is done here,
    outside the returned call)."""
    T, K = ids.shape
    I = w.inter
    flat = ids.reshape(-1)
    groups = []
    for e in torch.unique(flat).tolist():
        r = torch.nonzero(flat == e).squeeze(1)
        groups.append((e, r // K, weights.reshape(-1)[r].unsqueeze(1)))

    def run() -> torch.Tensor:
        out = torch.zeros(T, w.hidden, device=x.device, dtype=torch.float32)
        for e, tok, wt in groups:
            h = x[tok] @ w.w13_bf16[e].T
            a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
            out.index_add_(0, tok, (a @ w.w2_bf16[e].T).float() * wt)
        return out.to(x.dtype)

    return run


def measure_moe(T: int, w: MoEWeights, timer: Timer, gen: torch.Generator, top_k: int = TOP_K, twin: bool = False,
                check: bool = False, moe_fn: Callable | None = None) -> dict:
    """One batch size: the Triton kernel's median time (``triton_s``), the bf16 reference's (``bf16_ref_s``, when
    ``w`` holds bf16 weights), optionally the torch twin's and the relative error against the twin."""
    from k2ray.kernels import fused_moe_int4_torch, fused_moe_int4_triton

    fn = moe_fn or fused_moe_int4_triton
    x, ids, weights = moe_routing(T, w, top_k, gen)
    active = int(torch.unique(ids).numel())
    row = {"batch": T, "active_experts": active, "bytes": moe_bytes(active, w, T),
           "flops": 6.0 * T * top_k * w.hidden * w.inter}
    row["triton_s"] = timer(lambda: fn(x, *w.int4(), ids, weights))
    if w.w13_bf16 is not None:
        row["bf16_ref_s"] = timer(bf16_reference(x, ids, weights, w))
        row["bf16_ref_bytes"] = active * w.per_expert_bf16_bytes + 2 * T * w.hidden * 2
    if twin:
        row["twin_s"] = timer(lambda: fused_moe_int4_torch(x, *w.int4(), ids, weights))
    if check:
        got = fn(x, *w.int4(), ids, weights).float()
        want = fused_moe_int4_torch(x, *w.int4(), ids, weights).float()
        row["max_rel_err"] = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
    return row


def bench_moe(args, timer, peak, results):
    E, H, I = args.experts, HIDDEN, MOE_INTER
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w = make_moe_weights(E, H, I, DEVICE, bf16_ref=not args.no_bf16_ref)
    print(f"# MoE W4A16: hidden {H}, expert intermediate {I}, {E} experts, top-{TOP_K}; "
          f"{w.per_expert_int4_bytes / 1e6:.1f} MB per INT4 expert")
    for T in args.batches:
        row = measure_moe(T, w, timer, gen, twin=not args.no_twin and T <= args.twin_max_batch, check=args.check)
        nbytes, flops, t_tri = row["bytes"], row["flops"], row["triton_s"]
        line = f"moe  T={T:4d} experts={row['active_experts']:3d} | triton {fmt(t_tri, nbytes, flops, peak)}"
        if "bf16_ref_s" in row:
            t_ref = row["bf16_ref_s"]
            line += f" | bf16-ref {fmt(t_ref, row['bf16_ref_bytes'], flops, peak)} | speedup {t_ref / t_tri:5.2f}x"
        if "twin_s" in row:
            line += f" | twin {row['twin_s'] * 1e3:9.3f} ms"
        if "max_rel_err" in row:
            line += f" | rel err {row['max_rel_err']:.1e}"
        print(line, flush=True)
        results.append({"kernel": "moe", **row})
    del w
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# MLA decode


def mla_cache_bytes(B: int, ctx: int, block_size: int, L: int = KV_LORA, R: int = ROPE) -> int:
    """Bytes of the bf16 paged latent cache holding ``B`` sequences of ``ctx`` tokens (whole blocks)."""
    return B * -(-ctx // block_size) * block_size * (L + R) * 2


def make_mla_inputs(B: int, ctx: int, gen: torch.Generator, device: str = DEVICE, heads: int = HEADS,
                    L: int = KV_LORA, R: int = ROPE, block_size: int = 64):
    """``(q_latent, q_rope, cache, block_tables, context_lens)``: bf16, every sequence ``ctx`` tokens long, its cache
    blocks scattered (a random permutation), like a long-running paged cache."""
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = B * blocks_per_seq
    cache = torch.randn(num_blocks, block_size, L + R, device=device, generator=gen, dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device=device, generator=gen).view(B, blocks_per_seq).to(torch.int32)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    q_l = torch.randn(B, heads, L, device=device, generator=gen, dtype=torch.bfloat16)
    q_r = torch.randn(B, heads, R, device=device, generator=gen, dtype=torch.bfloat16)
    return q_l, q_r, cache, tables, lens


def mla_bytes(B: int, ctx: int, heads: int = HEADS, L: int = KV_LORA, R: int = ROPE) -> int:
    """The fewest bytes one absorbed decode step must move: the used latent cache, q (latent + rope), out."""
    return B * ctx * (L + R) * 2 + B * heads * (L + R) * 2 + B * heads * L * 2


def measure_mla(B: int, ctx: int, timer: Timer, gen: torch.Generator, device: str = DEVICE, heads: int = HEADS,
                L: int = KV_LORA, R: int = ROPE, block_size: int = 64, sm_scale: float | None = None,
                twin: bool = False, check: bool = False, mla_fn: Callable | None = None) -> dict:
    """One (batch, context): the Triton kernel's median time, optionally the torch twin's and the max abs error."""
    from k2ray.kernels import mla_decode_torch, mla_decode_triton, yarn_softmax_scale

    fn = mla_fn or mla_decode_triton
    scale = sm_scale if sm_scale is not None else yarn_softmax_scale(QK_HEAD, 64.0, 1.0)  # K2-Thinking rope_scaling
    inputs = make_mla_inputs(B, ctx, gen, device, heads, L, R, block_size)
    row = {"batch": B, "context": ctx, "bytes": mla_bytes(B, ctx, heads, L, R),
           "flops": 2.0 * B * heads * ctx * (L + R + L)}
    row["triton_s"] = timer(lambda: fn(*inputs, scale))
    if twin:
        row["twin_s"] = timer(lambda: mla_decode_torch(*inputs, scale))
    if check:
        got, want = fn(*inputs, scale).float(), mla_decode_torch(*inputs, scale).float()
        row["max_abs_err"] = float((got - want).abs().max())
    del inputs
    return row


def bench_mla(args, timer, peak, results):
    bs = args.block_size
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    print(f"# MLA decode: {HEADS} heads, latent {KV_LORA} + rope {ROPE}, bf16 cache, block size {bs}")
    for ctx in args.contexts:
        for B in args.batches:
            cache_bytes = mla_cache_bytes(B, ctx, bs)
            if cache_bytes > args.max_cache_gb * 1e9:
                print(f"mla  B={B:4d} ctx={ctx:6d} | skipped: cache {cache_bytes / 1e9:.1f} GB > --max-cache-gb")
                continue
            twin = not args.no_twin and B * ctx * (KV_LORA + ROPE) * 4 <= args.twin_budget_gb * 1e9
            row = measure_mla(B, ctx, timer, gen, block_size=bs, twin=twin, check=twin and args.check)
            nbytes, flops, t_tri = row["bytes"], row["flops"], row["triton_s"]
            line = f"mla  B={B:4d} ctx={ctx:6d} | triton {fmt(t_tri, nbytes, flops, peak)}"
            if "twin_s" in row:
                t_ref = row["twin_s"]
                line += f" | twin {fmt(t_ref, nbytes, flops, peak)} | speedup {t_ref / t_tri:6.2f}x"
            if "max_abs_err" in row:
                line += f" | abs err {row['max_abs_err']:.1e}"
            print(line, flush=True)
            results.append({"kernel": "mla", **row})
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
