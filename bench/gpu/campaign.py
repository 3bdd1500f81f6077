"""The GPU campaign (#26): k2ray's GPU path proven correct, then measured, in one run on one GPU.

    python bench/gpu/campaign.py --out DIR              # on a CUDA GPU (bench/gpu/campaign.sh is the entry point)
    python bench/gpu/campaign.py --out DIR --dry-run    # the same code at tiny shapes on CPU (CI runs this)
    python bench/gpu/campaign.py --out DIR --only moe,mla

Sections, in order, each in a child process of its own with a time cap (a section that fails or runs out of time
records its error and the campaign goes on; a CUDA fault cannot poison the sections after it):

- ``correctness``: the Triton kernels (moe_align, W4A16 fused MoE, MLA decode) on the device against their torch
  twins on the CPU, on the cases of tests/test_kernels.py plus K2-sized ones; the text model on the device against the
  CPU in fp32 (greedy tokens, the random tiny checkpoint and the trained k2ray-demo).
- ``bandwidth``: a device-to-device copy of a large buffer, counting bytes read + written: the yardstick every other
  fraction is taken against.
- ``moe``: W4A16 fused MoE at K2's shapes (hidden 7168, expert intermediate 2048, group 32, top-8, 384 experts).
- ``mla``: absorbed-MLA decode (64 heads, latent 512 + rope 64, paged bf16 cache) over contexts and batches.
- ``layer``: one K2 decoder layer at real dims (MLA + MoE with 384 INT4 experts + the shared expert) run by k2ray's
  model code, eager and captured in a CUDA graph, against its bandwidth floor.
- ``engine``: the offline engine (``k2ray.llm.LLM``) on the ``k2-mini`` checkpoint against transformers ``generate``
  on the same GPU and weights: output tokens/s, TTFT, greedy tokens compared.

Every figure is one JSON line in ``DIR/results.jsonl`` (``{"record": <type>, "section": ..., fields}``, the types are
the dataclasses below); ``DIR/summary.md`` is the readable report with the targets of docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# --------------------------------------------------------------------------------------------------------------------
# Records: one JSON line each


@dataclass
class Env:
    device: str
    dry_run: bool
    torch: str
    triton: Optional[str]
    transformers: Optional[str]
    python: str
    cuda: Optional[str] = None
    capability: Optional[str] = None
    sm_count: Optional[int] = None
    memory_gb: Optional[float] = None
    datasheet_peak_Bps: Optional[float] = None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    error: Optional[float] = None
    tolerance: Optional[float] = None


@dataclass
class CopyBandwidth:
    buffer_bytes: int
    seconds: float
    bytes_per_s: float  # (read + written) / time
    datasheet_fraction: Optional[float] = None


@dataclass
class MoEPoint:
    tokens: int
    active_experts: int
    bytes: int
    triton_s: float
    gbs: float
    copy_fraction: Optional[float]
    bf16_ref_s: Optional[float] = None
    speedup_vs_bf16: Optional[float] = None
    max_rel_err: Optional[float] = None


@dataclass
class MLAPoint:
    batch: int
    context: int
    bytes: int
    triton_s: float
    gbs: float
    copy_fraction: Optional[float]
    max_abs_err: Optional[float] = None


@dataclass
class LayerPoint:
    batch: int
    context: int
    mode: str  # "eager" | "cuda-graph"
    active_experts: int
    bytes: int
    floor_s: Optional[float]  # bytes / measured copy bandwidth
    seconds: float
    over_floor: Optional[float] = None


@dataclass
class EnginePoint:
    system: str  # "k2ray" | "transformers"
    concurrency: int
    requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    tok_s: float
    ttft_mean_s: Optional[float] = None
    ttft_p50_s: Optional[float] = None
    ttft_max_s: Optional[float] = None
    same_tokens: Optional[float] = None  # share of requests whose greedy tokens equal k2ray's
    common_prefix: Optional[float] = None  # mean share of each request's tokens before the first difference


@dataclass
class Note:
    text: str


@dataclass
class SectionStatus:
    ok: bool
    seconds: float
    error: Optional[str] = None


RECORDS = {cls.__name__: cls for cls in (Env, Check, CopyBandwidth, MoEPoint, MLAPoint, LayerPoint, EnginePoint, Note,
                                          SectionStatus)}

# --------------------------------------------------------------------------------------------------------------------
# Shapes: K2 on the GPU, tiny in the dry run


@dataclass(frozen=True)
class Shapes:
    hidden: int
    moe_inter: int
    experts: int
    top_k: int
    heads: int
    kv_lora: int
    rope: int
    moe_tokens: tuple[int, ...]
    mla_contexts: tuple[int, ...]
    mla_batches: tuple[int, ...]
    layer_batches: tuple[int, ...]
    layer_context: int
    concurrency: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    copy_bytes: int
    iters: int
    warmup: int
    check_prompts: int  # the correctness section's model check: prompts, greedy tokens, checkpoints
    check_tokens: int
    check_models: tuple[str, ...]
    model_overrides: dict = field(default_factory=dict)  # k2-mini config keys replaced (the dry run's tiny dims)


K2 = Shapes(
    hidden=7168, moe_inter=2048, experts=384, top_k=8, heads=64, kv_lora=512, rope=64,
    moe_tokens=(1, 8, 32, 64, 128, 256), mla_contexts=(8192, 1024, 32768, 131072),  # 8K (the target) first
    mla_batches=(1, 2, 4, 8, 16, 32, 64), layer_batches=(1, 8, 32, 64, 128), layer_context=4096,
    concurrency=(1, 32, 128), prompt_len=64, new_tokens=64, copy_bytes=4 * 2**30, iters=20, warmup=3,
    check_prompts=4, check_tokens=16, check_models=("k2ray-tiny", "k2ray-demo"),
)
TINY_DIMS = {
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_routed_experts": 16, "q_lora_rank": 128, "kv_lora_rank": 64,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
}
DRY = Shapes(
    hidden=128, moe_inter=64, experts=8, top_k=4, heads=4, kv_lora=64, rope=16,
    moe_tokens=(1, 4), mla_contexts=(40, 100), mla_batches=(1, 3), layer_batches=(1, 4), layer_context=48,
    concurrency=(1, 4), prompt_len=12, new_tokens=6, copy_bytes=64 * 2**20, iters=1, warmup=0,
    check_prompts=2, check_tokens=8, check_models=("k2ray-tiny",),
    model_overrides=TINY_DIMS,
)

# Per-section time caps (seconds, counted after the section's imports) on the GPU and in the dry run, and the
# campaign's whole budget: each section's cap shrinks to what the budget has left (keeping MIN_SECTION_S for each
# section after it), so the campaign ends within BUDGET_S (+ one kill grace) whatever happens: under 8 minutes.
CAPS = {"correctness": 90, "bandwidth": 15, "moe": 60, "mla": 60, "layer": 55, "engine": 160}
DRY_CAPS = {"correctness": 120, "bandwidth": 60, "moe": 90, "mla": 90, "layer": 90, "engine": 150}
BUDGET_S, DRY_BUDGET_S, MIN_SECTION_S, KILL_GRACE_S = 455, 700, 15, 10

# Targets of #26 (docs/performance.md).
TARGET_MOE_FRACTION, TARGET_MOE_SPEEDUP, TARGET_MLA_FRACTION, TARGET_LAYER_OVER_FLOOR = 0.60, 2.5, 0.50, 1.5

# --------------------------------------------------------------------------------------------------------------------
# The section context


class Ctx:
    """What a section gets: shapes, device, where its records go, its deadline, the measured copy bandwidth."""

    def __init__(self, section: str, dry: bool, out: Path, cap_s: float, copy_bw: Optional[float]):
        self.section, self.dry, self.out = section, dry, out
        self.shapes = DRY if dry else K2
        self.device = "cpu" if dry else "cuda"
        self.t0, self.cap_s = time.monotonic(), cap_s
        self.copy_bw = copy_bw

    def emit(self, rec: Any) -> None:
        line = {"record": type(rec).__name__, "section": self.section, **dataclasses.asdict(rec)}
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def note(self, text: str) -> None:
        print(f"[{self.section}] note: {text}", flush=True)
        self.emit(Note(text))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.cap_s - self.elapsed()

    def out_of_time(self, need_s: float, what: str) -> bool:
        """Whether less than ``need_s`` is left; says so (the rest of the section is skipped by the caller)."""
        if self.left() < need_s:
            self.note(f"skipped from {what} on: {self.left():.0f} s left of the {self.cap_s:.0f} s cap")
            return True
        return False

    def fraction(self, nbytes: float, seconds: float) -> Optional[float]:
        return nbytes / seconds / self.copy_bw if self.copy_bw and seconds > 0 else None

    def timer(self):
        return bench_kernels().Timer(self.shapes.iters, self.shapes.warmup, self.device)

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def _load(path: Path, name: str):
    """Import a file of the checkout by path under a private name (bench/ and tests/ are no packages, and the
    checkout's root must stay off sys.path: its kernels/ folder would shadow an installed package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_kernels():
    return _load(ROOT / "bench" / "kernels.py", "k2ray_bench_kernels")


def kernel_cases():
    return _load(ROOT / "tests" / "test_kernels.py", "k2ray_kernel_cases")


def _engine_llm(model_dir, device: str, dtype: str, **engine_kwargs):
    from k2ray.llm import LLM

    parallel = {"device": device, "gpus_per_worker": 1.0} if device == "cuda" else None
    return LLM(model_dir, dtype=dtype, parallel=parallel, **engine_kwargs)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def _free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# Section: correctness


def section_correctness(ctx: Ctx) -> None:
    """Kernels on the device vs their torch twins on the CPU; then the text model on the device vs the CPU. Every
    check is guarded: one that raises (a kernel that does not compile, say) is a failed Check, the others still run."""
    import torch

    from k2ray import kernels as K
    from k2ray.kernels._config import MLAConfig, MoEConfig
    from k2ray.kernels.mla_decode import _mla_decode_triton_impl
    from k2ray.kernels.w4a16_moe import _fused_moe_int4_triton_impl

    cases = kernel_cases()
    dev = ctx.device
    if ctx.dry:
        ctx.note("dry run: the Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1)")
    align = ("ragged", "decode_t1") if ctx.dry else tuple(cases.ALIGN_CASES)
    moe = ("fp32_ragged", "bf16_table_decode") if ctx.dry else tuple(cases.MOE_CASES)
    mla = ("fp32_split3", "bf16_table") if ctx.dry else tuple(cases.MLA_CASES)

    def to_dev(args):
        return [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]

    def align_check(name):
        args = cases.align_case(name)
        want = K.moe_align_torch(*args)
        got = K.moe_align_triton(*to_dev(args))
        ok = all(g.dtype == w.dtype and torch.equal(g.cpu(), w) for g, w in zip(got, want))
        ctx.emit(Check(f"moe_align/{name}", ok, "bit-identical to the twin" if ok else "differs from the twin"))

    def moe_check(name):
        args = cases.moe_case(name)
        tiles = cases.MOE_CASES[name][-1]
        want = K.fused_moe_int4_torch(*args)
        dargs = to_dev(args)
        got = (K.fused_moe_int4_triton(*dargs) if tiles is None
               else _fused_moe_int4_triton_impl(*dargs, MoEConfig(*tiles)))
        _close(ctx, f"fused_moe/{name}", got.cpu(), want, cases._MOE_TOL[want.dtype])

    def mla_check(name):
        args = cases.mla_case(name)
        tiles = cases.MLA_CASES[name][-1]
        want = K.mla_decode_torch(*args)
        dargs = to_dev(args)
        got = K.mla_decode_triton(*dargs) if tiles is None else _mla_decode_triton_impl(*dargs, MLAConfig(*tiles))
        _close(ctx, f"mla_decode/{name}", got.cpu(), want, cases._MLA_TOL[want.dtype])

    for name in align:
        _guard(ctx, f"moe_align/{name}", lambda: align_check(name))
    for name in moe:
        _guard(ctx, f"fused_moe/{name}", lambda: moe_check(name))
    for name in mla:
        _guard(ctx, f"mla_decode/{name}", lambda: mla_check(name))
    print(f"[correctness] test-suite kernel cases done at {ctx.elapsed():.1f} s", flush=True)

    # K2-sized: real hidden / intermediate / heads / latent, fresh random inputs, the twin on the device in fp32.
    s = ctx.shapes
    bk = bench_kernels()
    gen = torch.Generator(device=dev).manual_seed(1)

    def k2_moe(name):
        w = bk.make_moe_weights(16, s.hidden, s.moe_inter, dev, seed=1, bf16_ref=False)
        x, ids, weights = bk.moe_routing(8, w, s.top_k, gen)
        got = K.fused_moe_int4_triton(x, *w.int4(), ids, weights)
        want = K.fused_moe_int4_torch(x, *w.int4(), ids, weights)
        _close(ctx, name, got.cpu(), want.cpu(), 3e-2)

    def k2_mla(name):
        inputs = bk.make_mla_inputs(3, 1000 if not ctx.dry else 70, gen, dev, s.heads, s.kv_lora, s.rope, 16)
        scale = (s.kv_lora // 4 + s.rope) ** -0.5
        got = K.mla_decode_triton(*inputs, scale)
        want = K.mla_decode_torch(*inputs, scale)
        _close(ctx, name, got.cpu(), want.cpu(), 2e-2)

    _guard(ctx, f"fused_moe/k2_hidden{s.hidden}_T8_E16", k2_moe)
    _guard(ctx, f"mla_decode/k2_heads{s.heads}_latent{s.kv_lora}_B3", k2_mla)
    _free_cuda()
    print(f"[correctness] K2-sized kernel checks done at {ctx.elapsed():.1f} s", flush=True)

    # The text model: device vs CPU fp32, greedy.
    from k2ray.checkpoint.builtin import resolve_model
    from k2ray.checkpoint.tiny import make_tiny
    from k2ray.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=s.check_tokens, temperature=0.0, ignore_eos=True)
    prompts = _prompts(s.check_prompts, 16, 2048, seed=7)
    other = "cpu, INT4 experts (the kernels' twins)" if ctx.dry else "cuda, INT4 experts (Triton)"

    def generate(path, device, dtype, **kw):
        llm = _engine_llm(path, device, dtype, num_kv_blocks=64, **kw)
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
            _free_cuda()

    def model_check(name, path, bf16: bool):
        want = generate(path, "cpu", "float32", expert_format="dequantized")
        got = generate(path, dev, "float32", expert_format="int4")
        same = sum(a == b for a, b in zip(got, want))
        ctx.emit(Check(name, same == len(want),
                       f"{same}/{len(want)} prompts token-identical over {params.max_tokens} greedy tokens"))
        if bf16:  # bf16 on the device: reported, not required to be identical
            same16 = sum(a == b for a, b in zip(generate(path, dev, "bfloat16"), want))
            ctx.emit(Check(f"model/{path.name}/bf16 cuda vs cpu fp32 (informative)", True,
                           f"{same16}/{len(want)} prompts token-identical"))

    tmp = Path(tempfile.mkdtemp(prefix="k2ray-campaign-tiny-"))
    try:
        for label in s.check_models:
            if ctx.out_of_time(15, f"the model check on {label}"):
                break
            name = f"model/{label}/fp32 {other} == cpu fp32"
            _guard(ctx, name, lambda: model_check(
                name, make_tiny(tmp / "tiny", seed=0) if label == "k2ray-tiny" else resolve_model(label),
                bf16=not ctx.dry and label == "k2ray-demo"))
            print(f"[correctness] model check on {label} done at {ctx.elapsed():.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _guard(ctx: Ctx, name: str, fn: Callable) -> None:
    """Run one check (``fn(name)`` or ``fn()``); an exception becomes a failed :class:`Check` named ``name``."""
    import inspect

    try:
        fn(name) if inspect.signature(fn).parameters else fn()
    except Exception as e:
        traceback.print_exc()
        ctx.emit(Check(name, False, f"raised {type(e).__name__}: {' '.join(str(e).split())[:300]}"))


def _close(ctx: Ctx, name: str, got, want, tol: float) -> None:
    import torch

    finite = bool(torch.isfinite(got.float()).all())
    ok = finite and got.shape == want.shape and got.dtype == want.dtype
    err = float((got.float() - want.float()).abs().max()) if got.shape == want.shape else float("inf")
    ok = ok and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    ctx.emit(Check(name, bool(ok), f"max abs err {err:.2e} (tol {tol:g}){'' if finite else ', non-finite output'}",
                   err, tol))


# --------------------------------------------------------------------------------------------------------------------
# Section: copy bandwidth


def section_bandwidth(ctx: Ctx) -> None:
    """Device-to-device copy of a large buffer; bytes read + written over the median time."""
    import torch

    n = ctx.shapes.copy_bytes
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    timer = bench_kernels().Timer(max(ctx.shapes.iters, 10), ctx.shapes.warmup + 2, ctx.device)
    t = timer(lambda: dst.copy_(src))
    assert torch.equal(dst[:4096], src[:4096]) and torch.equal(dst[-4096:], src[-4096:])
    bw = 2 * n / t
    peak = _datasheet_peak()
    ctx.emit(CopyBandwidth(n, t, bw, bw / peak if peak else None))
    print(f"[bandwidth] copy of {n / 2**30:.2f} GiB: {t * 1e3:.3f} ms, {bw / 1e9:.0f} GB/s (read + write)", flush=True)


def _datasheet_peak() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return bench_kernels().hbm_peak(torch.cuda.get_device_name(), None)


def _env(dry: bool) -> Env:
    import torch

    def version(mod: str) -> Optional[str]:
        try:
            return importlib.import_module(mod).__version__
        except Exception:
            return None

    env = Env(device="cpu (dry run)" if dry else "", dry_run=dry, torch=torch.__version__, triton=version("triton"),
              transformers=version("transformers"), python=sys.version.split()[0])
    if not dry and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.device, env.cuda = p.name, torch.version.cuda
        env.capability, env.sm_count = f"{p.major}.{p.minor}", p.multi_processor_count
        env.memory_gb, env.datasheet_peak_Bps = p.total_memory / 1e9, _datasheet_peak()
    return env


# --------------------------------------------------------------------------------------------------------------------
# Section: W4A16 fused MoE at K2 shapes


def section_moe(ctx: Ctx) -> None:
    import torch

    s, bk = ctx.shapes, bench_kernels()
    t = time.monotonic()
    w = bk.make_moe_weights(s.experts, s.hidden, s.moe_inter, ctx.device, seed=0, bf16_ref=True)
    ctx.sync()
    print(f"[moe] {s.experts} experts, hidden {s.hidden}, intermediate {s.moe_inter}, top-{s.top_k}: "
          f"{w.per_expert_int4_bytes / 1e6:.2f} MB per INT4 expert; weights made in {time.monotonic() - t:.1f} s",
          flush=True)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    timer = ctx.timer()
    for T in s.moe_tokens:
        if ctx.out_of_time(8, f"{T} tokens"):
            break
        check = T in (8, 64) or ctx.dry
        row = bk.measure_moe(T, w, timer, gen, top_k=s.top_k, check=check)
        p = MoEPoint(tokens=T, active_experts=row["active_experts"], bytes=row["bytes"], triton_s=row["triton_s"],
                     gbs=row["bytes"] / row["triton_s"] / 1e9, copy_fraction=ctx.fraction(row["bytes"], row["triton_s"]),
                     bf16_ref_s=row.get("bf16_ref_s"), max_rel_err=row.get("max_rel_err"))
        if p.bf16_ref_s:
            p.speedup_vs_bf16 = p.bf16_ref_s / p.triton_s
        ctx.emit(p)
        print(f"[moe] T={T:4d} experts={p.active_experts:3d} {p.triton_s * 1e6:9.1f} us {p.gbs:7.0f} GB/s "
              f"{_pct(p.copy_fraction)} of copy bw | bf16 torch {_us(p.bf16_ref_s)} speedup {_x(p.speedup_vs_bf16)}",
              flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Section: absorbed-MLA decode


def section_mla(ctx: Ctx) -> None:
    import torch

    s, bk = ctx.shapes, bench_kernels()
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    timer = ctx.timer()
    block = 64 if not ctx.dry else 16
    for c in s.mla_contexts:
        for B in s.mla_batches:
            if ctx.out_of_time(4, f"context {c} batch {B}"):
                return
            check = (B, c) in ((4, 1024), (2, 8192)) or (ctx.dry and B == s.mla_batches[-1])
            row = bk.measure_mla(B, c, timer, gen, ctx.device, s.heads, s.kv_lora, s.rope, block, check=check)
            p = MLAPoint(batch=B, context=c, bytes=row["bytes"], triton_s=row["triton_s"],
                         gbs=row["bytes"] / row["triton_s"] / 1e9,
                         copy_fraction=ctx.fraction(row["bytes"], row["triton_s"]),
                         max_abs_err=row.get("max_abs_err"))
            ctx.emit(p)
            print(f"[mla] ctx={c:6d} B={B:3d} {p.triton_s * 1e6:9.1f} us {p.gbs:7.0f} GB/s "
                  f"{_pct(p.copy_fraction)} of copy bw", flush=True)
            _free_cuda()


# --------------------------------------------------------------------------------------------------------------------
# Section: one K2 decoder layer (MLA + MoE) through k2ray's model code


def _k2_layer(ctx: Ctx):
    """k2ray's DecoderLayer for MoE layer 1 of K2 (or the dry run's dims), INT4 experts, bf16, random weights."""
    import torch

    from k2ray.checkpoint.tiny import k2_mini_config
    from k2ray.config import ModelArgs
    from k2ray.model.model import DecoderLayer
    from k2ray.model.moe import Gate, local_experts
    from k2ray.model.rope import RotaryEmbedding

    args = ModelArgs.from_dict(k2_mini_config(ctx.shapes.model_overrides))
    with torch.device("meta"):
        layer = DecoderLayer(args, 1, local_experts(args, dtype=torch.bfloat16, int4=True))
    layer = layer.to(torch.bfloat16).to_empty(device=ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if t.dtype == torch.int32:
                t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, dtype=torch.int32, device=ctx.device,
                                      generator=gen))
            elif name.endswith("_scale"):
                t.copy_(torch.rand(t.shape, device=ctx.device, generator=gen) * 2e-3 + 2e-3)
            elif "norm" in name:
                t.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.01 * torch.randn(t.shape, device=ctx.device, generator=gen))
            else:
                t.copy_(0.02 * torch.randn(t.shape, device=ctx.device, generator=gen))
    for m in layer.modules():
        if isinstance(m, Gate):
            m.e_score_correction_bias = m.e_score_correction_bias.float()
    return args, layer.eval(), RotaryEmbedding(args, device=ctx.device)


def _decode_batch(ctx: Ctx, args, B: int, context: int, block_size: int):
    """Inputs of one decode step of ``B`` sequences with ``context - 1`` cached tokens each: the metadata (decode
    tensors already on the device, so a CUDA graph can capture the step), the cache and the hidden states."""
    import torch

    from k2ray.model.attention_metadata import AttentionMetadata, SeqSlice

    dev = ctx.device
    per_seq = -(-context // block_size)
    gen = torch.Generator(device=dev).manual_seed(B)
    cache = torch.randn(B * per_seq + 1, block_size, args.kv_cache_dim, device=dev, dtype=torch.bfloat16,
                        generator=gen)
    perm = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(B))
    seqs, slots = [], []
    for b in range(B):
        table = perm[b * per_seq:(b + 1) * per_seq].to(torch.long)
        seqs.append(SeqSlice(q_start=b, q_len=1, ctx_len=context, block_table=table))
        pos = context - 1
        slots.append(int(table[pos // block_size]) * block_size + pos % block_size)
    meta = AttentionMetadata(seqs=seqs, slot_mapping=torch.tensor(slots, device=dev), block_size=block_size)
    meta.decode_tensors(torch.device(dev))  # built once, here, outside any capture
    positions = torch.full((B,), context - 1, dtype=torch.long, device=dev)
    x = torch.randn(B, args.hidden_size, device=dev, generator=gen).to(torch.bfloat16)
    return meta, cache, positions, x


def _layer_bytes(layer, args, B: int, context: int, active: int) -> int:
    """The fewest bytes one decode step of the layer must move: every non-expert weight once (attention, norms,
    gate, shared expert), the active experts' INT4 weights and scales, the used latent cache, the new latents, the
    hidden states in and out."""
    experts = layer.mlp.experts
    per_expert = sum(getattr(experts, n)[0].numel() * getattr(experts, n).element_size()
                     for n in ("w13_packed", "w13_scale", "w2_packed", "w2_scale"))
    dense = sum(t.numel() * t.element_size() for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
                if ".experts." not in n)
    cache = B * context * args.kv_cache_dim * 2 + B * args.kv_cache_dim * 2
    return dense + active * per_expert + cache + 2 * B * args.hidden_size * 2


def section_layer(ctx: Ctx) -> None:
    import torch

    from k2ray.config import EngineConfig

    s = ctx.shapes
    args, layer, rope = _k2_layer(ctx)
    block_size = EngineConfig().block_size
    timer = ctx.timer()
    if ctx.dry:
        ctx.note("dry run: eager only on CPU (no CUDA graphs); the INT4 experts run the torch twin")
    # Eager first for every batch, then the CUDA graphs: a capture that goes wrong cannot cost the eager figures.
    modes = ["eager"] + (["cuda-graph"] if ctx.device == "cuda" else [])
    for mode in modes:
        for B in s.layer_batches:
            if ctx.out_of_time(10, f"{mode} batch {B}"):
                return
            meta, cache, positions, x = _decode_batch(ctx, args, B, s.layer_context, block_size)

            def step():
                return layer(x, rope, rope.cos_sin(positions, x.dtype), meta, cache)

            with torch.no_grad():
                ids, _ = layer.mlp.gate(layer.post_attention_layernorm(x))
                active = int(torch.unique(ids).numel())
                secs = timer(step) if mode == "eager" else _graph_time(ctx, step, timer, B)
            del meta, cache, positions, x
            _free_cuda()
            if secs is None:  # k2ray's step could not be captured: no graph figures
                break
            nbytes = _layer_bytes(layer, args, B, s.layer_context, active)
            floor = nbytes / ctx.copy_bw if ctx.copy_bw else None
            p = LayerPoint(B, s.layer_context, mode, active, nbytes, floor, secs, secs / floor if floor else None)
            ctx.emit(p)
            print(f"[layer] {mode:10s} B={B:3d} experts={active:3d} {nbytes / 1e6:8.1f} MB floor {_us(floor)} "
                  f"step {_us(secs)} ({_x(p.over_floor)} the floor)", flush=True)


def _graph_time(ctx: Ctx, step: Callable, timer, B: int) -> Optional[float]:
    """The step captured in a CUDA graph (static inputs: the step's own tensors) and timed by replays; None (with a
    note) when k2ray's code cannot be captured."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        eager_out = step()
        if not torch.allclose(out.float(), eager_out.float(), rtol=2e-2, atol=2e-2):
            ctx.note(f"batch {B}: the graph's output differs from the eager step's")
        return timer(graph.replay)
    except Exception as e:  # capture is not guaranteed for every step of the model code
        ctx.note(f"batch {B}: CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        torch.cuda.synchronize()
        return None


# --------------------------------------------------------------------------------------------------------------------
# Section: the engine end to end on k2-mini vs transformers


def section_engine(ctx: Ctx) -> None:
    import torch

    from k2ray.checkpoint.tiny import make_preset
    from k2ray.runtime.sampling import SamplingParams

    s = ctx.shapes
    where = _scratch_dir(30e9 if not ctx.dry else 1e9)
    model_dir = Path(tempfile.mkdtemp(prefix="k2ray-campaign-k2-mini-", dir=where))
    try:
        t = time.monotonic()
        make_preset(model_dir, "k2-mini", seed=0, overrides=s.model_overrides or None)
        size = sum(f.stat().st_size for f in model_dir.iterdir())
        ctx.note(f"k2-mini checkpoint ({size / 1e9:.2f} GB{', tiny dims' if ctx.dry else ''}) written to {where} in "
                 f"{time.monotonic() - t:.1f} s")
        conc = s.concurrency
        t = time.monotonic()
        llm = _engine_llm(model_dir, ctx.device, "bfloat16", expert_format="int4", max_num_seqs=max(conc),
                          num_kv_blocks=max(conc) * (-(-(s.prompt_len + s.new_tokens) // 16) + 1) + 16)
        ctx.note(f"k2ray loaded k2-mini in {time.monotonic() - t:.1f} s")
        vocab = 2048  # prompt ids from the tiny BPE part of the vocabulary (any id works)
        # Warm-up: one full run at the largest concurrency compiles the kernels' prefill and decode configurations
        # (their tiles depend on the batch and the context, which grows over the run).
        t = time.monotonic()
        _run_k2ray(llm, _prompts(max(conc), s.prompt_len, vocab, seed=99), SamplingParams(
            max_tokens=s.new_tokens, temperature=0.0, ignore_eos=True))
        ctx.note(f"k2ray warm-up (concurrency {max(conc)}, kernels compiled) took {time.monotonic() - t:.1f} s")
        k2_out: dict[int, list[list[int]]] = {}
        for c in conc:
            if ctx.out_of_time(15, f"k2ray at concurrency {c}"):
                break
            prompts = _prompts(c, s.prompt_len, vocab, seed=c)
            params = SamplingParams(max_tokens=s.new_tokens, temperature=0.0, ignore_eos=True)
            secs, outs, ttfts = _run_k2ray(llm, prompts, params)
            k2_out[c] = outs
            p = EnginePoint("k2ray", c, c, c * s.prompt_len, c * s.new_tokens, secs, c * s.new_tokens / secs,
                            ttft_mean_s=sum(ttfts) / len(ttfts), ttft_p50_s=sorted(ttfts)[len(ttfts) // 2],
                            ttft_max_s=max(ttfts))
            ctx.emit(p)
            print(f"[engine] k2ray c={c:3d} {p.tok_s:8.1f} tok/s ttft mean {_ms(p.ttft_mean_s)} max {_ms(p.ttft_max_s)}",
                  flush=True)
        model = llm.engine.executor.runner.model.to("cpu")  # keep the weights for transformers, free the GPU
        llm.shutdown()
        del llm
        _free_cuda()
        if ctx.out_of_time(40, "the transformers reference"):
            return
        hf = _hf_from_k2ray(ctx, model, model_dir)
        del model
        gc.collect()
        if hf is None:
            return
        for c in k2_out:
            if ctx.out_of_time(10, f"transformers at concurrency {c}"):
                break
            prompts = _prompts(c, s.prompt_len, vocab, seed=c)
            try:
                _hf_generate(hf, prompts[:1], 2, ctx)  # warm-up
                prefill_s, _ = _hf_generate(hf, prompts, 1, ctx)
                secs, outs = _hf_generate(hf, prompts, s.new_tokens, ctx)
            except torch.cuda.OutOfMemoryError as e:
                ctx.note(f"transformers at concurrency {c}: out of GPU memory ({str(e).splitlines()[0][:200]})")
                break
            same = sum(a == b for a, b in zip(outs, k2_out[c])) / c
            prefix = sum(_common_prefix(a, b) / s.new_tokens for a, b in zip(outs, k2_out[c])) / c
            p = EnginePoint("transformers", c, c, c * s.prompt_len, c * s.new_tokens, secs,
                            c * s.new_tokens / secs, ttft_mean_s=prefill_s, same_tokens=same, common_prefix=prefix)
            ctx.emit(p)
            print(f"[engine] transformers c={c:3d} {p.tok_s:8.1f} tok/s prefill+1 {_ms(prefill_s)} "
                  f"same greedy tokens {same:.0%} (common prefix {prefix:.0%})", flush=True)
        del hf
        _free_cuda()
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def _scratch_dir(need_bytes: float) -> str:
    """/dev/shm when it has room (the checkpoint is written and read at memory speed), else the temp dir."""
    for d in ("/dev/shm", tempfile.gettempdir()):
        try:
            if os.path.isdir(d) and shutil.disk_usage(d).free > need_bytes:
                return d
        except OSError:
            continue
    return tempfile.gettempdir()


def _run_k2ray(llm, prompts, params):
    """All prompts submitted at once to the engine; (seconds, greedy tokens per prompt, TTFT per request)."""
    engine = llm.engine
    t = time.monotonic()
    reqs = [engine.prepare_request(p, params) for p in prompts]
    for r in reqs:
        engine.add_prepared(r)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    secs = time.monotonic() - t
    ttfts = [r.first_token_time - r.arrival_time for r in reqs if r.first_token_time is not None]
    return secs, [final[r.request_id] for r in reqs], ttfts


def _hf_from_k2ray(ctx: Ctx, model, model_dir: Path):
    """transformers' DeepseekV3ForCausalLM on the device with k2ray's weights (INT4 experts dequantized to bf16),
    built without initialising anything; None (with a note) when it does not fit."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from k2ray.checkpoint.int4 import dequantize_int4

    dev = ctx.device
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["model_type"] = "deepseek_v3"
    config = DeepseekV3Config(**cfg)
    a = model.args
    # bf16: every k2ray parameter (embeddings, attention, dense and shared MLPs, gates, lm_head) + the experts
    need = 2 * (sum(p.numel() for p in model.parameters())
                + len(a.moe_layers) * a.n_routed_experts * 3 * a.hidden_size * a.moe_intermediate_size)
    if dev == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if need > free - 3e9:  # room for generate's cache and activations
            ctx.note(f"transformers reference skipped: its bf16 weights need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB "
                     "free on the GPU")
            return None
    t = time.monotonic()
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(config)
    hf = hf.to(torch.bfloat16).to_empty(device=dev).eval()
    ours = dict(model.state_dict())
    with torch.no_grad():
        for name, p in list(hf.named_parameters()) + list(hf.named_buffers()):
            if name in ours:
                if name.endswith("e_score_correction_bias"):
                    continue
                p.copy_(ours[name])
        for layer in a.moe_layers:
            gate = hf.get_submodule(f"model.layers.{layer}.mlp.gate")
            gate.e_score_correction_bias = ours[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].float().to(dev)
            pre = f"model.layers.{layer}.mlp.experts."
            hf_experts = hf.get_submodule(f"model.layers.{layer}.mlp.experts")
            for e in range(a.n_routed_experts):
                hf_experts.gate_up_proj[e].copy_(dequantize_int4(
                    ours[pre + "w13_packed"][e].to(dev), ours[pre + "w13_scale"][e].to(dev), dtype=torch.bfloat16))
                hf_experts.down_proj[e].copy_(dequantize_int4(
                    ours[pre + "w2_packed"][e].to(dev), ours[pre + "w2_scale"][e].to(dev), dtype=torch.bfloat16))
    rot = hf.model.rotary_emb
    hf.model.rotary_emb = type(rot)(config=config).to(dev)  # its buffers were left uninitialised by to_empty
    covered = set(ours) | {n for n in dict(hf.named_parameters()) if ".mlp.experts." in n}
    missing = [n for n in dict(hf.named_parameters()) if n not in covered]
    if missing:
        raise RuntimeError(f"transformers parameters without k2ray weights: {missing[:5]}")
    ctx.note(f"transformers DeepseekV3ForCausalLM built on {dev} in {time.monotonic() - t:.1f} s "
             f"({need / 1e9:.1f} GB of bf16 weights)")
    return hf


def _hf_generate(hf, prompts, new_tokens: int, ctx: Ctx):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long, device=ctx.device)
    with torch.inference_mode():
        ctx.sync()
        t = time.monotonic()
        gen = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        ctx.sync()
        secs = time.monotonic() - t
    return secs, [row[len(prompts[0]):].tolist() for row in gen]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------------------------------
# The summary


def _us(t: Optional[float]) -> str:
    return f"{t * 1e6:.1f} µs" if t is not None else "—"


def _ms(t: Optional[float]) -> str:
    return f"{t * 1e3:.1f} ms" if t is not None else "—"


def _pct(f: Optional[float]) -> str:
    return f"{100 * f:.1f}%" if f is not None else "—"


def _x(f: Optional[float]) -> str:
    return f"{f:.2f}×" if f is not None else "—"


def read_results(path: Path) -> list[dict]:
    """The JSON lines (a line cut short by a killed section is skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def summary_markdown(rows: list[dict], dry: bool) -> str:
    by = lambda rec: [r for r in rows if r["record"] == rec]  # noqa: E731
    env = next(iter(by("Env")), {})
    out = ["# k2ray GPU campaign (#26)", ""]
    if dry:
        out += ["**DRY RUN on CPU at tiny shapes: these are NOT GPU figures.** They prove the code paths run; the "
                "Triton kernels ran in Triton's interpreter, every time below is a CPU time, and no target is "
                "judged.", ""]
    out += [f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"transformers {env.get('transformers', '?')}, Python {env.get('python', '?')}.", ""]
    out += ["## Sections", "", "| section | ok | seconds | error |", "|---|---|---:|---|"]
    for r in by("SectionStatus"):
        err = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:200]
        out.append(f"| {r['section']} | {'yes' if r['ok'] else '**NO**'} | {r['seconds']:.1f} | {err} |")
    notes = by("Note")
    if notes:
        out += ["", "Notes:", ""] + [f"- {r['section']}: {r['text']}" for r in notes]

    checks = by("Check")
    out += ["", "## Correctness", "", "| check | ok | detail |", "|---|---|---|"]
    out += [f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in checks]

    bw = next(iter(by("CopyBandwidth")), None)
    out += ["", "## Copy bandwidth (the yardstick)", ""]
    if bw:
        frac = f" ({_pct(bw['datasheet_fraction'])} of the datasheet peak)" if bw.get("datasheet_fraction") else ""
        out.append(f"Device-to-device copy of {bw['buffer_bytes'] / 2**30:.2f} GiB: {bw['seconds'] * 1e3:.3f} ms, "
                   f"**{bw['bytes_per_s'] / 1e9:.0f} GB/s** read + written{frac}.")
    else:
        out.append("Not measured: the fractions below are missing.")

    moe = by("MoEPoint")
    out += ["", "## W4A16 fused MoE", "",
            f"Target: ≥ {TARGET_MOE_FRACTION:.0%} of the copy bandwidth at 8–64 tokens and ≥ {TARGET_MOE_SPEEDUP}× "
            "bf16 torch on the same routing.", "",
            "| tokens | active experts | MB moved | time | GB/s | of copy bw | bf16 torch | speedup | rel err |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in moe:
        err = f"{p['max_rel_err']:.1e}" if p.get("max_rel_err") is not None else "—"
        out.append(f"| {p['tokens']} | {p['active_experts']} | {p['bytes'] / 1e6:.1f} | {_us(p['triton_s'])} | "
                   f"{p['gbs']:.0f} | {_pct(p['copy_fraction'])} | {_us(p['bf16_ref_s'])} | "
                   f"{_x(p['speedup_vs_bf16'])} | {err} |")
    band = [p for p in moe if 8 <= p["tokens"] <= 64]
    if not dry and band and all(p["copy_fraction"] is not None and p["speedup_vs_bf16"] is not None for p in band):
        met = all(p["copy_fraction"] >= TARGET_MOE_FRACTION and p["speedup_vs_bf16"] >= TARGET_MOE_SPEEDUP
                  for p in band)
        out += ["", f"Target at 8–64 tokens: **{'met' if met else 'missed'}**."]

    mla = by("MLAPoint")
    out += ["", "## MLA absorbed decode", "",
            f"Target: ≥ {TARGET_MLA_FRACTION:.0%} of the copy bandwidth at 8K context (judged at the largest batch).",
            "", "| context | batch | MB moved | time | GB/s | of copy bw | abs err vs twin |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in mla:
        err = f"{p['max_abs_err']:.1e}" if p.get("max_abs_err") is not None else "—"
        out.append(f"| {p['context']} | {p['batch']} | {p['bytes'] / 1e6:.1f} | {_us(p['triton_s'])} | "
                   f"{p['gbs']:.0f} | {_pct(p['copy_fraction'])} | {err} |")
    at8k = [p for p in mla if p["context"] == 8192 and p["copy_fraction"] is not None]
    if not dry and at8k:
        best = max(at8k, key=lambda p: p["batch"])
        met = best["copy_fraction"] >= TARGET_MLA_FRACTION
        out += ["", f"Target at 8K (batch {best['batch']}): **{'met' if met else 'missed'}** "
                f"({_pct(best['copy_fraction'])})."]

    layer = by("LayerPoint")
    out += ["", "## K2 layer slice (MLA + MoE, k2ray's model code)", "",
            f"Target: within {TARGET_LAYER_OVER_FLOOR}× of the bandwidth floor (bytes / copy bandwidth) at batch 1.",
            "", "| batch | context | active experts | MB moved | floor | eager | ×floor | CUDA graph | ×floor |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_batch: dict[int, dict[str, dict]] = {}
    for p in layer:
        by_batch.setdefault(p["batch"], {})[p["mode"]] = p
    for b, modes in by_batch.items():
        first = next(iter(modes.values()))
        e, g = modes.get("eager", {}), modes.get("cuda-graph", {})
        out.append(f"| {b} | {first['context']} | {first['active_experts']} | {first['bytes'] / 1e6:.1f} | "
                   f"{_us(first['floor_s'])} | {_us(e.get('seconds'))} | {_x(e.get('over_floor'))} | "
                   f"{_us(g.get('seconds'))} | {_x(g.get('over_floor'))} |")
    b1 = [p["over_floor"] for p in layer if p["batch"] == 1 and p["over_floor"] is not None]
    if not dry and b1:
        best = min(b1)
        out += ["", f"Target at batch 1: **{'met' if best <= TARGET_LAYER_OVER_FLOOR else 'missed'}** "
                f"({_x(best)} the floor, best of eager and graph)."]

    eng = by("EnginePoint")
    out += ["", "## Engine end to end (k2-mini) vs transformers generate", "",
            "| system | concurrency | output tokens | seconds | tok/s | TTFT mean | TTFT max | same greedy tokens | "
            "common prefix |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in eng:
        same = _pct(p["same_tokens"]) if p.get("same_tokens") is not None else "—"
        pref = _pct(p["common_prefix"]) if p.get("common_prefix") is not None else "—"
        out.append(f"| {p['system']} | {p['concurrency']} | {p['output_tokens']} | {p['seconds']:.2f} | "
                   f"{p['tok_s']:.1f} | {_ms(p['ttft_mean_s'])} | {_ms(p['ttft_max_s'])} | {same} | {pref} |")
    out += ["", "transformers' TTFT column is the time of `generate(max_new_tokens=1)` on the whole batch "
            "(prefill + one token); k2ray's is per request, from submission to its first token."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Driver


SECTIONS: dict[str, Callable[[Ctx], None]] = {
    "correctness": section_correctness,
    "bandwidth": section_bandwidth,
    "moe": section_moe,
    "mla": section_mla,
    "layer": section_layer,
    "engine": section_engine,
}


def run_section(name: str, dry: bool, out: Path, cap_s: float, copy_bw: Optional[float]) -> int:
    """The child: one section, its records appended to results.jsonl, ending with its SectionStatus."""
    import torch

    if dry:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ctx = Ctx(name, dry, out, cap_s, copy_bw)
    t = time.monotonic()
    try:
        if not dry and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with --dry-run for the CPU check of the code paths")
        if name == "bandwidth":
            ctx.emit(_env(dry))
        SECTIONS[name](ctx)
        ctx.sync()
        status = SectionStatus(True, time.monotonic() - t)
    except Exception:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        last = tb.strip().splitlines()[-1]
        status = SectionStatus(False, time.monotonic() - t, last[:500])
    ctx.emit(status)
    return 0


def run_all(sections: list[str], dry: bool, out: Path) -> int:
    """The parent: each section in a child process under its cap; then the summary."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.write_text("")
    caps, budget = (DRY_CAPS, DRY_BUDGET_S) if dry else (CAPS, BUDGET_S)
    copy_bw: Optional[float] = None
    t_all = time.monotonic()
    for i, name in enumerate(sections):
        left = budget - (time.monotonic() - t_all) - MIN_SECTION_S * (len(sections) - i - 1)
        cap = min(caps[name], left)
        t = time.monotonic()
        error = None
        if cap < MIN_SECTION_S:
            error = f"not run: {left:.0f} s of the campaign's {budget} s budget left for it"
        else:
            print(f"=== {name} (cap {cap:.0f} s) ===", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out),
                   "--cap", f"{cap:.1f}"]
            cmd += ["--dry-run"] if dry else []
            cmd += ["--copy-bw", repr(copy_bw)] if copy_bw else []
            try:
                proc = subprocess.run(cmd, timeout=cap + KILL_GRACE_S, cwd=str(HERE))
                if proc.returncode:
                    error = f"the section's process exited with code {proc.returncode}"
            except subprocess.TimeoutExpired:
                error = f"killed after {cap + KILL_GRACE_S:.0f} s (cap {cap:.0f} s)"
        done = [r for r in read_results(results) if r["record"] == "SectionStatus" and r["section"] == name]
        if not done:
            line = {"record": "SectionStatus", "section": name,
                    **dataclasses.asdict(SectionStatus(False, time.monotonic() - t, error or "no status written"))}
            with open(results, "a") as f:
                f.write(json.dumps(line) + "\n")
        if name == "bandwidth":
            bw = [r for r in read_results(results) if r["record"] == "CopyBandwidth"]
            copy_bw = bw[-1]["bytes_per_s"] if bw else None
    rows = read_results(results)
    (out / "summary.md").write_text(summary_markdown(rows, dry))
    statuses = [r for r in rows if r["record"] == "SectionStatus"]
    failed = [r["section"] for r in statuses if not r["ok"]] + [
        c["name"] for c in rows if c["record"] == "Check" and not c["ok"]]
    print(f"=== campaign done in {time.monotonic() - t_all:.0f} s{' (DRY RUN: not GPU figures)' if dry else ''}; "
          f"{out / 'results.jsonl'}, {out / 'summary.md'} ===")
    for r in statuses:
        print(f"  {r['section']:12s} {'ok' if r['ok'] else 'FAILED'} {r['seconds']:6.1f} s  {r.get('error') or ''}")
    if failed:
        print(f"  failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton under TRITON_INTERPRET=1)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--only", default=None, help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # the child
    p.add_argument("--copy-bw", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (the children inherit it)
    if args.section:
        cap = args.cap or (DRY_CAPS if args.dry_run else CAPS)[args.section]
        return run_section(args.section, args.dry_run, args.out, cap, args.copy_bw)
    sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections: {', '.join(unknown)}")
    needs_bw = [s for s in sections if s in ("moe", "mla", "layer")]
    if needs_bw and "bandwidth" not in sections:  # their fractions and floors need this run's copy bandwidth
        sections.insert(sections.index(needs_bw[0]), "bandwidth")
    sections = [s for s in SECTIONS if s in sections]  # always in the campaign's order
    return run_all(sections, args.dry_run, args.out)


if __name__ == "__main__":
    sys.exit(main())
