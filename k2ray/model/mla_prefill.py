"""Prompt-chunk MLA attention at memory linear in the context: softmax over blocks of cached latents, combined.

A prompt chunk of ``q`` new tokens attends to ``ctx`` tokens (the cached ones plus itself; the chunk's queries sit at
positions ``ctx - q .. ctx - 1``). Instead of the naive form's full ``[heads, q, ctx]`` score matrix and the whole
context expanded to per-head keys/values, the context is read in tiles of ``tile`` latents straight from the (paged)
cache and folded into running softmax statistics (flash-attention style), so the extra memory is
``O(heads * q * tile)`` whatever the context length.

Two forms, the same result (up to rounding):

* **expanded** — each tile's latents go through ``kv_b_proj`` to per-head ``k_nope``/``v``; scores on
  ``qk_nope + rope`` dims, output on ``v`` dims.
* **absorbed** — ``W_UK`` is folded into the queries once (``q_latent = q_nope · W_UK``), scores run on the latent
  ``[kv_lora_rank + rope]`` itself (one shared key per token, as in decode), and ``W_UV`` is applied to the attended
  latent at the end.

Two kernels compute either form:

* **flash** (CPU, the default there): PyTorch's fused flash-attention CPU kernel over key blocks of
  :data:`KEY_BLOCK` latents — the cached prefix without a mask, the chunk's own keys as one square causal block —
  whose partial results are merged by their log-sum-exp. Only one block is expanded at a time. Measured on the tiny
  model's shape (4 heads, a 2,048-query chunk, 2 cores): 0.46 s over 16K keys and 1.6 s over 49K, against 1.2 s and
  4.9-5.5 s for the tiled twin.
* **tiled**: the torch twin, online softmax in plain torch ops over tiles of ``tile`` keys; any device and dtype,
  and what the flash kernel is checked against.

:func:`use_absorbed` picks the form per sequence by counting multiply-adds (see its docstring). Shapes in comments:
``H`` heads, ``q`` chunk tokens, ``t`` tile tokens, ``L`` kv_lora_rank, ``R`` rope dims, ``N`` nope dims, ``V`` value
dims.
"""

from __future__ import annotations

import torch

# Scores kept per tile: heads * participating queries * tile keys, in fp32 (16 MiB). Tiles get shorter for long
# chunks so the transient stays fixed. Measured on the tiny model, one thread: a 2048-query chunk over 16K keys takes
# 0.74 s with 512-key tiles, 0.76 s with 1024, 0.94 s with 2048, 1.29 s with 4096 (the tile's scores fall out of
# cache); sdpa with an explicit causal mask 1.79 s, the naive form 0.5 s already at a 2048-key context.
SCORE_BUDGET = 4 << 20
MIN_TILE, MAX_TILE = 256, 1024


def tile_size(heads: int, q_len: int) -> int:
    """Keys per tile for a chunk of ``q_len`` queries: fills :data:`SCORE_BUDGET`, a multiple of 256."""
    t = SCORE_BUDGET // max(1, heads * q_len)
    return max(MIN_TILE, min(MAX_TILE, t // 256 * 256))


# Latents per flash block: bounds the expanded keys/values held at once (8K x heads x (N+R) x 2 values).
KEY_BLOCK = 8192
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def flash_available(q: torch.Tensor) -> bool:
    """Whether the fused kernel takes these queries: a CPU tensor in fp32 or bf16 (the kernel's dtypes here)."""
    return _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)


def use_absorbed(q_len: int, ctx_len: int, heads: int, kv_lora_rank: int, rope: int, nope: int, v: int) -> bool:
    """Whether the absorbed form costs fewer multiply-adds than the expanded one for this sequence's chunk.

    expanded = ctx·H·L·(N+V)          expand every context latent to per-head keys and values (kv_b_proj)
             + q·ctx·H·(N+R+V)        scores on nope+rope dims, weighted sum of V-dim values
    absorbed = q·H·L·(N+V)            fold W_UK into the queries, W_UV into the outputs
             + q·ctx·H·(L+R+L)        scores and weighted sum on the latent itself

    The expansion is paid once per context token, the absorption once per query, but absorbed attention runs on
    ``2L+R`` dims instead of ``N+R+V``: short chunks over a long cache (q below about
    ``L·(N+V) / (2L+R - (N+R+V))``: 64 on the tiny model, ~170 on K2) take the absorbed form; full prompts and long
    chunks the expanded one. The same trade-off as vLLM's and FlashMLA's choice of absorbed MLA for decode and
    short chunks.
    """
    expanded = ctx_len * heads * kv_lora_rank * (nope + v) + q_len * ctx_len * heads * (nope + rope + v)
    absorbed = q_len * heads * kv_lora_rank * (nope + v) + q_len * ctx_len * heads * (2 * kv_lora_rank + rope)
    return absorbed < expanded


def mla_prefill(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latents: torch.Tensor,
    slots: torch.Tensor | None,
    ctx_len: int,
    kv_b_weight: torch.Tensor,
    scale: float,
    absorbed: bool,
    tile: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Causal attention of one sequence's chunk over its context: ``[q, H, V]`` in ``q_nope.dtype``.

    ``q_nope [q, H, N]`` and roped ``q_pe [q, H, R]`` are the chunk's queries; context token ``j`` is
    ``latents[slots[j]]`` (``latents [*, L + R]``, e.g. the flattened paged cache), or ``latents[j]`` when ``slots``
    is None. ``kv_b_weight [H * (N + V), L]`` is ``kv_b_proj``'s weight. ``kernel``: ``"flash"``, ``"tiled"`` or
    ``"auto"`` (flash where :func:`flash_available`); ``tile`` sizes the tiled kernel's key tiles.
    """
    if kernel == "flash" or (kernel == "auto" and flash_available(q_nope)):
        return _flash(q_nope, q_pe, latents, slots, ctx_len, kv_b_weight, scale, absorbed)
    return _tiled(q_nope, q_pe, latents, slots, ctx_len, kv_b_weight, scale, absorbed, tile)


def _flash(q_nope, q_pe, latents, slots, ctx_len: int, kv_b_weight, scale: float, absorbed: bool) -> torch.Tensor:
    """The flash kernel (module docstring). The kernel wants one head size for q, k and v: expanded values are
    zero-padded to the key size, absorbed ones are the latents themselves; the extra output dims are dropped."""
    q, H, N = q_nope.shape
    R = q_pe.shape[-1]
    L = latents.shape[-1] - R
    V = kv_b_weight.shape[0] // H - N
    dtype = q_nope.dtype
    offset = ctx_len - q
    w = kv_b_weight.view(H, N + V, L)
    if absorbed:
        q_lat = torch.einsum("qhn,hnl->hql", q_nope, w[:, :N])  # [H, q, L]
        query = torch.cat([q_lat, q_pe.transpose(0, 1)], dim=-1).unsqueeze(0)  # [1, H, q, L+R]
    else:
        query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1).unsqueeze(0)  # [1, H, q, N+R]
    D = query.shape[-1]
    w_t = w.transpose(1, 2)  # [H, L, N+V]

    def block(k0: int, k1: int, causal: bool):
        lat = (latents[k0:k1] if slots is None else latents[slots[k0:k1]]).to(dtype)  # [t, L+R]
        t = k1 - k0
        if absorbed and not causal:
            # Keys are shared by the heads and no query is masked: the heads fold into the queries of ONE head, so the
            # cached latents are read as they are instead of copied per head. The latents serve as the values too:
            # their rope part only adds output dims past L, which are dropped.
            kv = lat.view(1, 1, t, D)
            out, lse = _FLASH_CPU(query.view(1, 1, H * q, D), kv, kv, 0.0, False, scale=scale)
            return out.view(1, H, q, D).float(), lse.view(1, H, q).float()
        if absorbed:  # the chunk's own square block: the causal mask needs the heads apart, keys shared
            keys = lat.expand(1, H, t, D).contiguous()
            out, lse = _FLASH_CPU(query, keys, keys, 0.0, causal, scale=scale)
            return out.float(), lse.float()
        keys = torch.empty(1, H, t, D, dtype=dtype, device=lat.device)
        vals = torch.zeros(1, H, t, D, dtype=dtype, device=lat.device)
        kv = torch.matmul(lat[:, :L], w_t)  # [H, t, N+V]: the block's per-head keys and values
        keys[0, :, :, :N] = kv[..., :N]
        keys[0, :, :, N:] = lat[:, L:]  # the shared rope key
        vals[0, :, :, :V] = kv[..., N:]
        out, lse = _FLASH_CPU(query, keys, vals, 0.0, causal, scale=scale)
        return out.float(), lse.float()  # [1, H, q, D], [1, H, q]

    # Every query sees the whole cached prefix (no mask) and the chunk itself causally (a square block).
    out, lse = block(offset, ctx_len, True)
    for k0 in range(0, offset, KEY_BLOCK):
        o_b, lse_b = block(k0, min(k0 + KEY_BLOCK, offset), False)
        m = torch.maximum(lse, lse_b)
        a, b = torch.exp(lse - m), torch.exp(lse_b - m)  # [1, H, q]
        out = (out * a.unsqueeze(-1) + o_b * b.unsqueeze(-1)) / (a + b).unsqueeze(-1)
        lse = m + torch.log(a + b)
    out = out[0].to(dtype)  # [H, q, D]
    if absorbed:
        return torch.einsum("hql,hvl->qhv", out[..., :L], w[:, N:])
    return out[..., :V].transpose(0, 1)


def _tiled(q_nope, q_pe, latents, slots, ctx_len: int, kv_b_weight, scale: float, absorbed: bool,
           tile: int | None) -> torch.Tensor:
    """The torch twin: online softmax over tiles of keys (fp32 statistics and accumulator; matmuls in the
    queries' dtype)."""
    q, H, N = q_nope.shape
    R = q_pe.shape[-1]
    L = latents.shape[-1] - R
    V = kv_b_weight.shape[0] // H - N
    dtype = q_nope.dtype
    offset = ctx_len - q
    tile = tile or tile_size(H, q)
    w = kv_b_weight.view(H, N + V, L)
    w_uk, w_uv = w[:, :N], w[:, N:]  # [H, N, L], [H, V, L]

    if absorbed:
        q_lat = torch.einsum("qhn,hnl->hql", q_nope, w_uk)  # [H, q, L]
        q_cat = torch.cat([q_lat, q_pe.transpose(0, 1)], dim=-1) * scale  # [H, q, L+R]
        acc_dim = L
    else:
        q_cat = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1) * scale  # [H, q, N+R]
        acc_dim = V
    m = torch.full((H, q, 1), float("-inf"), dtype=torch.float32, device=q_nope.device)  # running max
    l = torch.zeros((H, q, 1), dtype=torch.float32, device=q_nope.device)  # running sum of exp
    acc = torch.zeros((H, q, acc_dim), dtype=torch.float32, device=q_nope.device)  # running weighted sum

    for k0 in range(0, ctx_len, tile):
        k1 = min(k0 + tile, ctx_len)
        # Queries before position k0 see nothing of this tile: skip their rows (each row left sees key k0).
        r0 = max(0, k0 - offset)
        lat = (latents[k0:k1] if slots is None else latents[slots[k0:k1]]).to(dtype)  # [t, L+R]
        if absorbed:
            keys = lat.t()  # [L+R, t], shared by all heads
            vals = lat[:, :L]  # [t, L]
        else:
            kv = torch.nn.functional.linear(lat[:, :L], kv_b_weight).view(k1 - k0, H, N + V)
            k_pe = lat[:, L:].unsqueeze(1).expand(-1, H, -1)  # [t, H, R]
            keys = torch.cat([kv[..., :N], k_pe], dim=-1).permute(1, 2, 0)  # [H, N+R, t]
            vals = kv[..., N:].transpose(0, 1)  # [H, t, V]
        s = torch.matmul(q_cat[:, r0:], keys).float()  # [H, q', t]
        if k1 - 1 > offset + r0:  # the tile reaches past the first participating query: causal mask
            qpos = torch.arange(offset + r0, ctx_len, device=s.device).unsqueeze(1)
            kpos = torch.arange(k0, k1, device=s.device).unsqueeze(0)
            s.masked_fill_(kpos > qpos, float("-inf"))
        m_old = m[:, r0:]
        m_new = torch.maximum(m_old, s.amax(dim=-1, keepdim=True))  # [H, q', 1], finite
        alpha = torch.exp(m_old - m_new)  # rescales what was accumulated under the old max (0 on the first tile)
        p = s.sub_(m_new).exp_()  # [H, q', t]
        l[:, r0:] = l[:, r0:] * alpha + p.sum(dim=-1, keepdim=True)
        acc[:, r0:] = acc[:, r0:] * alpha + torch.matmul(p.to(dtype), vals).float()
        m[:, r0:] = m_new

    out = (acc / l).to(dtype)  # [H, q, L] or [H, q, V]
    if absorbed:
        return torch.einsum("hql,hvl->qhv", out, w_uv)
    return out.transpose(0, 1)
