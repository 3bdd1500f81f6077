"""The routed experts on CPU: the grouped-GEMM path (decode-sized batches) gives bit for bit what the per-expert loop
gives, and both equal a per-token reference written from the formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import k2ray.model.moe as moe


def _case(tokens: int, experts: int = 32, hidden: int = 64, inter: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / 8
    w2 = torch.randn(experts, hidden, inter, generator=g) / 8
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:8] for _ in range(tokens)])
    ids[ids >= experts - 6] = -1  # experts held elsewhere; and six experts that get no token here
    w = torch.rand(tokens, 8, generator=g)
    return x, ids, w, w13, w2


def _reference(x, ids, w, w13, w2):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += w[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("tokens", [1, 7, 40, 64, 100, 300])
def test_grouped_and_loop_paths_agree(tokens, monkeypatch):
    x, ids, w, w13, w2 = _case(tokens)
    rows = int((ids >= 0).sum())
    grouped = moe.routed_experts_forward(x, ids, w, w13, w2)
    assert moe._use_grouped_mm(x, rows) == (rows <= moe.GROUPED_MM_MAX_ROWS)
    monkeypatch.setattr(moe, "GROUPED_MM_MAX_ROWS", -1)
    loop = moe.routed_experts_forward(x, ids, w, w13, w2)
    assert torch.equal(grouped, loop)  # bit for bit: the choice of path never changes a token
    torch.testing.assert_close(loop, _reference(x, ids, w, w13, w2), rtol=1e-5, atol=1e-5)


def test_no_local_expert_gives_zeros():
    x, ids, w, w13, w2 = _case(4)
    assert torch.equal(moe.routed_experts_forward(x, torch.full_like(ids, -1), w, w13, w2), torch.zeros_like(x))
