"""k2ray.kernels: Triton kernels vs their torch twins, and the twins vs naive per-token loops.

The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU. Triton decides interpreter-or-compiler when a kernel is
decorated (at import), so the Triton side runs in ONE child process (this file executed as a script, which sets the
variable before importing anything): it computes every case's Triton output and saves them; the tests here rebuild
the same inputs (seeded), run the torch twins in-process and compare. Nothing in this pytest process changes
``TRITON_INTERPRET``, so other test modules are unaffected.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the interpreter child: must precede every triton import
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["K2RAY_KERNELS"] = "triton"

import math
import subprocess

import pytest
import torch

from k2ray.checkpoint.int4 import pack_int4, quantize_int4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------------------------
# Cases (deterministic builders shared by the child and the tests)


def _routes(gen, T, K, E, skip_frac=0.0, empty=()):
    """Distinct experts per token (like a real top-k), some entries -1, experts in ``empty`` never chosen."""
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    rows = [allowed[torch.randperm(len(allowed), generator=gen)[:K]] for _ in range(T)]
    ids = torch.stack(rows) if T else torch.empty((0, K), dtype=torch.int64)
    if skip_frac:
        ids = torch.where(torch.rand(ids.shape, generator=gen) < skip_frac, torch.full_like(ids, -1), ids)
    return ids


# name -> (T, K, E, block_size, skip_frac, empty experts, dtype)
ALIGN_CASES = {
    "ragged": (13, 4, 9, 4, 0.25, (0, 5)),
    "decode_t1": (1, 8, 32, 16, 0.0, ()),
    "all_skipped": (3, 2, 5, 4, 1.0, ()),
    "many_chunks": (40, 6, 70, 16, 0.3, (3, 69)),
    "no_tokens": (0, 4, 6, 8, 0.0, ()),
}


def align_case(name):
    T, K, E, bs, skip, empty = ALIGN_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    ids = _routes(gen, T, K, E, skip, empty)
    if name == "many_chunks":
        ids = ids.to(torch.int32)
    return ids, E, bs


def _int4_linears(gen, E, out, inp):
    packed, scales = [], []
    for _ in range(E):
        q, s = quantize_int4(torch.randn(out, inp, generator=gen) * inp**-0.5)
        packed.append(pack_int4(q))
        scales.append(s.to(torch.bfloat16))
    return torch.stack(packed), torch.stack(scales)


# name -> (T, K, E, H, I, skip_frac, empty experts, dtype, tiles (block_m, block_n, block_k) or None = table)
MOE_CASES = {
    "fp32_ragged": (9, 3, 6, 64, 32, 0.2, (2,), torch.float32, (16, 16, 32)),
    "fp32_tail_k": (20, 4, 5, 96, 64, 0.1, (), torch.float32, (32, 32, 64)),
    "bf16": (11, 4, 8, 64, 64, 0.15, (7,), torch.bfloat16, (16, 32, 32)),
    "fp16_table": (5, 2, 4, 64, 32, 0.0, (), torch.float16, None),
    "bf16_table_decode": (2, 8, 16, 128, 64, 0.0, (), torch.bfloat16, None),
}


def moe_case(name):
    T, K, E, H, I, skip, empty, dtype, _ = MOE_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(T, H, generator=gen).to(dtype)
    w13p, w13s = _int4_linears(gen, E, 2 * I, H)
    w2p, w2s = _int4_linears(gen, E, H, I)
    ids = _routes(gen, T, K, E, skip, empty)
    if T > 1:
        ids[1] = -1  # a token routed entirely to other shards
    weights = torch.rand(T, K, generator=gen)
    return x, w13p, w13s, w2p, w2s, ids, weights


# name -> (lens, Hq, L, R, block_size, extra blocks, dtype, (block_h, block_n, splits) or None = table)
MLA_CASES = {
    "fp32_split1": ([1, 4, 13, 70], 8, 64, 16, 4, 5, torch.float32, (16, 16, 1)),
    "fp32_split3": ([1, 4, 13, 70], 8, 64, 16, 4, 5, torch.float32, (16, 16, 3)),
    "fp32_split5_heads20": ([7, 0, 66], 20, 32, 16, 8, 3, torch.float32, (16, 16, 5)),
    "bf16_split2": ([50, 0, 17], 4, 64, 16, 16, 2, torch.bfloat16, (16, 32, 2)),
    "bf16_table": ([3, 100], 4, 64, 16, 16, 4, torch.bfloat16, None),
}


def mla_case(name):
    lens, Hq, L, R, bs, extra, dtype, _ = MLA_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    B = len(lens)
    need = [-(-n // bs) for n in lens]
    max_blocks = max(need) + 2  # padding columns past every sequence's blocks
    num_blocks = sum(need) + extra
    perm = torch.randperm(num_blocks, generator=gen)  # blocks in any order, unused blocks in between ("gaps")
    tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[at : at + n].to(torch.int32)
        at += n
        tables[b, n + 1 :] = 10**6  # padding that would fault if it were dereferenced
    cache = torch.randn(num_blocks, bs, L + R, generator=gen).to(dtype)
    q_latent = torch.randn(B, Hq, L, generator=gen).to(dtype)
    q_rope = torch.randn(B, Hq, R, generator=gen).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    sm_scale = (L // 4 + R) ** -0.5
    return q_latent, q_rope, cache, tables, context_lens, sm_scale


# --------------------------------------------------------------------------------------------------------------------
# The interpreter child


def _run_triton_cases(out_path: str) -> None:
    from k2ray import kernels as K
    from k2ray.kernels._config import MLAConfig, MoEConfig
    from k2ray.kernels.mla_decode import _mla_decode_triton_impl
    from k2ray.kernels.w4a16_moe import _fused_moe_int4_triton_impl

    results = {}
    for name in ALIGN_CASES:
        results[f"align/{name}"] = K.moe_align_triton(*align_case(name))
    for name, spec in MOE_CASES.items():
        args = moe_case(name)
        tiles = spec[-1]
        if tiles is None:
            results[f"moe/{name}"] = K.fused_moe_int4_triton(*args)
        else:
            results[f"moe/{name}"] = _fused_moe_int4_triton_impl(*args, MoEConfig(*tiles, num_warps=4, num_stages=1))
    for name, spec in MLA_CASES.items():
        args = mla_case(name)
        tiles = spec[-1]
        if tiles is None:
            results[f"mla/{name}"] = K.mla_decode_triton(*args)
        else:
            results[f"mla/{name}"] = _mla_decode_triton_impl(*args, MLAConfig(*tiles))
    # The dispatcher with K2RAY_KERNELS=triton on CPU tensors must take the Triton path.
    from k2ray.kernels._config import use_triton

    results["dispatch/use_triton"] = torch.tensor(use_triton(torch.zeros(1)))
    results["dispatch/moe_align"] = K.moe_align(*align_case("ragged"))
    results["dispatch/mla_decode"] = K.mla_decode(*mla_case("fp32_split3"))
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def triton_out(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("kernels") / "triton_out.pt"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"interpreter child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return torch.load(path)


# --------------------------------------------------------------------------------------------------------------------
# Naive references: per-token loops, independent of the twins' vectorised code


def naive_moe_align(topk_ids, num_experts, block_size):
    T, K = topk_ids.shape
    groups = {e: [] for e in range(num_experts)}
    for t in range(T):
        for k in range(K):
            e = int(topk_ids[t, k])
            if 0 <= e < num_experts:
                groups[e].append(t * K + k)
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        routes = groups[e]
        if not routes:
            continue
        pad = -len(routes) % block_size
        sorted_ids += routes + [T * K] * pad
        expert_ids += [e] * ((len(routes) + pad) // block_size)
    return sorted_ids, expert_ids


def _naive_dequant(packed, scale):
    """Bit by bit, per element: nibble k of row n is word k // 8, bits 4 * (k % 8)."""
    out, words = packed.shape
    inp = words * 8
    w = torch.empty(out, inp, dtype=torch.float64)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    for k in range(inp):
        nib = (p[:, k // 8] >> (4 * (k % 8))) & 0xF
        w[:, k] = (nib - 8).double() * scale[:, k // 32].double()
    return w


def naive_fused_moe(x, w13p, w13s, w2p, w2s, ids, weights):
    T, K = ids.shape
    H = x.shape[1]
    I = w13p.shape[1] // 2
    cache = {}
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e < 0:
                continue
            if e not in cache:
                cache[e] = (_naive_dequant(w13p[e], w13s[e]), _naive_dequant(w2p[e], w2s[e]))
            w13, w2 = cache[e]
            xt = x[t].double()
            gate, up = w13[:I] @ xt, w13[I:] @ xt
            act = gate / (1 + torch.exp(-gate)) * up
            out[t] += float(weights[t, k]) * (w2 @ act)
    return out


def naive_mla(q_latent, q_rope, cache, tables, lens, sm_scale):
    B, Hq, L = q_latent.shape
    bs = cache.shape[1]
    out = torch.zeros(B, Hq, L, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        rows = torch.stack([cache[int(tables[b, j // bs]), j % bs].double() for j in range(n)])
        for h in range(Hq):
            s = [(q_latent[b, h].double() @ rows[j, :L] + q_rope[b, h].double() @ rows[j, L:]) * sm_scale
                 for j in range(n)]
            m = max(s)
            p = torch.tensor([math.exp(v - m) for v in s], dtype=torch.float64)
            out[b, h] = (p / p.sum()) @ rows[:, :L]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Torch twins vs naive loops


@pytest.mark.parametrize("name", list(ALIGN_CASES))
def test_moe_align_torch_matches_naive(name):
    from k2ray.kernels import moe_align_torch

    ids, E, bs = align_case(name)
    sorted_ids, expert_ids, ntpp = moe_align_torch(ids, E, bs)
    want_sorted, want_experts = naive_moe_align(ids, E, bs)
    n = int(ntpp)
    assert n == len(want_sorted) and n % bs == 0
    assert sorted_ids[:n].tolist() == want_sorted
    assert (sorted_ids[n:] == ids.numel()).all()
    assert expert_ids[: n // bs].tolist() == want_experts
    assert (expert_ids[n // bs :] == -1).all()
    assert sorted_ids.dtype == expert_ids.dtype == ntpp.dtype == torch.int32


@pytest.mark.parametrize("name", ["fp32_ragged", "fp32_tail_k"])
def test_fused_moe_torch_matches_naive(name):
    from k2ray.kernels import fused_moe_int4_torch

    args = moe_case(name)
    got = fused_moe_int4_torch(*args)
    want = naive_fused_moe(*args)
    assert got.dtype == args[0].dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[1] == 0).all()  # the token routed elsewhere contributes nothing here


@pytest.mark.parametrize("name", ["fp32_split1", "fp32_split5_heads20"])
def test_mla_decode_torch_matches_naive(name):
    from k2ray.kernels import mla_decode_torch

    args = mla_case(name)
    got = mla_decode_torch(*args)
    torch.testing.assert_close(got.double(), naive_mla(*args), rtol=1e-5, atol=1e-5)


def test_mla_decode_plan_groups_by_length_and_shares_one_plan():
    """The twin batches sequences of similar length together (little padding), leaves empty ones out, and a plan
    made once serves every call of a step with the same result as planning each time."""
    from k2ray.kernels import mla_decode_plan, mla_decode_torch

    args = mla_case("fp32_split1")  # lens 1, 4, 13, 70
    plan = mla_decode_plan(args[3], args[4], args[2].shape[1])
    assert sorted(int(r) for rows, _, _ in plan for r in rows) == [0, 1, 2, 3]
    for rows, slots, mask in plan:
        longest = int(args[4][rows].max())
        assert slots.shape == (len(rows), longest)
        padded = (len(rows) * longest - int(args[4][rows].sum())) / (len(rows) * longest)
        assert padded <= 0.25 and (mask is None) == (padded == 0)
    empty = mla_case("fp32_split5_heads20")  # lens 7, 0, 66: the empty one is in no group
    assert 1 not in {int(r) for rows, _, _ in mla_decode_plan(empty[3], empty[4], empty[2].shape[1]) for r in rows}
    cache: dict = {}
    first = mla_decode_torch(*args, cache)
    assert len(cache) == 1
    torch.testing.assert_close(mla_decode_torch(*args, cache), first, rtol=0, atol=0)
    torch.testing.assert_close(first.double(), naive_mla(*args), rtol=1e-5, atol=1e-5)
    # A sequence's output does not depend on the others in the batch: any subset, in any order, gives the same.
    for sub in ([3, 1], [2, 0, 3], [1]):
        idx = torch.tensor(sub)
        part = mla_decode_torch(args[0][idx], args[1][idx], args[2], args[3][idx], args[4][idx], args[5])
        torch.testing.assert_close(part, first[idx], rtol=1e-6, atol=1e-6)


def test_yarn_softmax_scale():
    from k2ray.kernels import yarn_softmax_scale

    assert yarn_softmax_scale(192, 1.0, 1.0) == pytest.approx(192**-0.5)
    m = 0.1 * math.log(64) + 1
    assert yarn_softmax_scale(192, 64, 1) == pytest.approx(192**-0.5 * m * m)
    assert yarn_softmax_scale(48, 32, 0.0) == pytest.approx(48**-0.5)


def test_dispatch_env(monkeypatch):
    from k2ray import kernels as K

    args = moe_case("fp32_ragged")
    monkeypatch.setenv("K2RAY_KERNELS", "auto")
    torch.testing.assert_close(K.fused_moe_int4(*args), K.fused_moe_int4_torch(*args), rtol=0, atol=0)
    monkeypatch.setenv("K2RAY_KERNELS", "torch")
    torch.testing.assert_close(K.mla_decode(*mla_case("bf16_split2")), K.mla_decode_torch(*mla_case("bf16_split2")))
    monkeypatch.setenv("K2RAY_KERNELS", "cuda")
    with pytest.raises(ValueError):
        K.moe_align(*align_case("ragged"))


def test_bad_shapes_rejected():
    from k2ray.kernels import fused_moe_int4_torch

    x, w13p, w13s, w2p, w2s, ids, w = moe_case("fp32_ragged")
    with pytest.raises(ValueError):
        fused_moe_int4_torch(x[:, :32], w13p, w13s, w2p, w2s, ids, w)
    with pytest.raises(ValueError):
        fused_moe_int4_torch(x, w13p, w13s[:, :, :1], w2p, w2s, ids, w)


# --------------------------------------------------------------------------------------------------------------------
# Triton (interpreter) vs torch twins


@pytest.mark.parametrize("name", list(ALIGN_CASES))
def test_moe_align_triton(triton_out, name):
    from k2ray.kernels import moe_align_torch

    want = moe_align_torch(*align_case(name))
    got = triton_out[f"align/{name}"]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


_MOE_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_fused_moe_triton(triton_out, name):
    from k2ray.kernels import fused_moe_int4_torch

    args = moe_case(name)
    want = fused_moe_int4_torch(*args)
    got = triton_out[f"moe/{name}"]
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = _MOE_TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


_MLA_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("name", list(MLA_CASES))
def test_mla_decode_triton(triton_out, name):
    from k2ray.kernels import mla_decode_torch

    args = mla_case(name)
    want = mla_decode_torch(*args)
    got = triton_out[f"mla/{name}"]
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = _MLA_TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    lens = args[4]
    assert (got[lens == 0] == 0).all()


def test_dispatch_forced_triton(triton_out):
    from k2ray.kernels import mla_decode_torch, moe_align_torch

    assert bool(triton_out["dispatch/use_triton"])  # K2RAY_KERNELS=triton picked Triton for CPU tensors
    for g, w in zip(triton_out["dispatch/moe_align"], moe_align_torch(*align_case("ragged"))):
        assert torch.equal(g, w)
    torch.testing.assert_close(triton_out["dispatch/mla_decode"], mla_decode_torch(*mla_case("fp32_split3")),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile for a Hopper GPU (sm_90): catches what the interpreter cannot (dot shape limits, layouts,
# register allocation) on a machine without a GPU. Every tile configuration the tables can pick is compiled.


def _aot_compile(fn, pointers: dict, constexprs: dict, floats=(), **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            sig[p.name] = pointers[p.name]
        else:
            sig[p.name] = "fp32" if p.name in floats else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True, **options})


def _aot_cases():
    import importlib

    tl = pytest.importorskip("triton.language")
    align = importlib.import_module("k2ray.kernels.moe_align")
    moe = importlib.import_module("k2ray.kernels.w4a16_moe")
    mla = importlib.import_module("k2ray.kernels.mla_decode")
    cfg = importlib.import_module("k2ray.kernels._config")
    i32 = {n: "*i32" for n in ("sorted_ptr", "expert_ids_ptr", "ntpp_ptr", "w_ptr", "bt_ptr", "lens_ptr")}
    cases = [("moe_align", align._moe_align_kernel, {**i32, "ids_ptr": "*i64"},
              {"BLOCK_SIZE": 16, "E_PAD": 512, "CHUNK": 32}, {"num_warps": 8})]
    for _, c in cfg._MOE_TABLE:
        consts = {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP": 32,
                  "PRECISION": "tf32", "DOT_DTYPE": tl.bfloat16}
        opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
        cases.append((f"gate_up{c}", moe._w4a16_gate_up_kernel,
                      {**i32, "x_ptr": "*bf16", "s_ptr": "*bf16", "act_ptr": "*bf16"}, consts, opts))
        cases.append((f"down{c}", moe._w4a16_down_kernel,
                      {**i32, "act_ptr": "*bf16", "s_ptr": "*bf16", "topk_w_ptr": "*fp32", "out_ptr": "*fp32"},
                      consts, opts))
    for heads in (64, 4):
        c = cfg.mla_config(1, heads, 8192)
        cases.append((f"mla_split{c}", mla._mla_decode_split_kernel,
                      {**i32, "ql_ptr": "*bf16", "qr_ptr": "*bf16", "cache_ptr": "*bf16", "part_ptr": "*fp32",
                       "lse_ptr": "*fp32"},
                      {"NUM_SPLITS": c.num_splits, "BLOCK_H": c.block_h, "BLOCK_L": 512, "BLOCK_R": 64,
                       "BLOCK_N": c.block_n, "DOT_DTYPE": tl.bfloat16, "PRECISION": "tf32"},
                      {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    cases.append(("mla_merge", mla._mla_decode_merge_kernel,
                  {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
                  {"BLOCK_S": 64, "BLOCK_L": 512}, {"num_warps": 4}))
    return cases


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels were decorated for the interpreter in this process")
    for name, fn, pointers, consts, opts in _aot_cases():
        kernel = _aot_compile(fn, pointers, consts, floats=("qk_scale",), **opts)
        assert kernel.asm.get("cubin"), name


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    _run_triton_cases(sys.argv[1])
