"""Backend selection and launch-configuration tables shared by the kernels.

``K2RAY_KERNELS`` picks the implementation: ``auto`` (default: Triton when every tensor argument lives on a CUDA
device and Triton imports, the torch twin otherwise), ``triton`` (always Triton; on CPU tensors this only works under
``TRITON_INTERPRET=1``) or ``torch`` (always the torch twin).

The block-size tables below are first guesses from the shapes' arithmetic intensity; they are meant to be replaced by
figures measured with ``bench/kernels.py`` on the target GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

try:  # Triton is optional: the torch twins work without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

ENV_VAR = "K2RAY_KERNELS"
_CHOICES = ("auto", "triton", "torch")


def backend_choice() -> str:
    """The value of ``K2RAY_KERNELS`` (read at every call, so tests and operators can flip it at run time)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_CHOICES)}")
    return value


def use_triton(*tensors) -> bool:
    """Whether a call on these tensors should run the Triton kernel."""
    choice = backend_choice()
    if choice == "torch":
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not importable")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------------------------
# fused MoE (W4A16)


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes for the two grouped GEMMs. ``block_m`` is also the ``moe_align`` block size."""

    block_m: int
    block_n: int  # output columns per program (gate/up: of the intermediate dim; down: of the hidden dim)
    block_k: int  # reduction step; a multiple of 32 keeps one scale group per column slice
    num_warps: int = 4
    num_stages: int = 3


# (max expected routes per expert, config). Decode (few routes per expert) is weight-bandwidth bound: small
# block_m so no tensor-core work is wasted on padding, wide block_k to stream long contiguous runs of packed words.
# Register budgets were checked by compiling for sm_90 (no spills); timings on a GPU are still to be taken.
_MOE_TABLE: tuple[tuple[float, MoEConfig], ...] = (
    (16, MoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)),
    (32, MoEConfig(block_m=32, block_n=64, block_k=128, num_warps=8, num_stages=4)),
    (64, MoEConfig(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3)),
    (float("inf"), MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)),
)


def moe_config(num_routes: int, num_experts: int, hidden: int, intermediate: int) -> MoEConfig:
    """Pick tiles from the expected number of routes per expert (``num_routes / num_experts``)."""
    per_expert = num_routes / max(num_experts, 1)
    cfg = next(c for limit, c in _MOE_TABLE if per_expert <= limit)
    # Never use tiles wider than the problem (small test / tiny-model shapes).
    smallest_n = min(hidden, intermediate)
    block_n = max(16, min(cfg.block_n, next_pow2(smallest_n)))
    block_k = max(32, min(cfg.block_k, next_pow2(smallest_n)))
    return MoEConfig(cfg.block_m, block_n, block_k, cfg.num_warps, cfg.num_stages)


# --------------------------------------------------------------------------------------------------------------------
# MLA decode


@dataclass(frozen=True)
class MLAConfig:
    block_h: int  # query heads per program (all heads share the latent cache: more heads = fewer cache re-reads)
    block_n: int  # cached tokens per inner step
    num_splits: int  # split-K partitions of every sequence's context
    num_warps: int = 8
    num_stages: int = 2


def _sm_count(device) -> int:
    try:
        import torch

        if device is not None and device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
    except Exception:  # pragma: no cover
        pass
    return 132  # H100 SXM / H200


def mla_config(batch: int, num_heads: int, max_context: int, device=None) -> MLAConfig:
    """``max_context`` is a host-side upper bound (block-table width x block size); no device sync is needed.

    The context of each sequence is cut into ``num_splits`` equal parts on the device (from its own length), so the
    split count only has to give the GPU enough programs: about two waves, each split at least ``4 * block_n`` tokens.
    """
    # 32 heads x 16 tokens (K2: 64 heads -> each cache tile is read by 2 programs) or 16 x 32 for few heads;
    # both fit sm_90 registers without spilling at L = 512.
    block_h, block_n = (32, 16) if num_heads >= 32 else (16, 32)
    programs = batch * cdiv(num_heads, block_h)
    want = cdiv(2 * _sm_count(device), max(programs, 1))
    cap = max(1, cdiv(max(max_context, 1), 4 * block_n))
    num_splits = max(1, min(want, cap, 64))
    return MLAConfig(block_h=block_h, block_n=block_n, num_splits=num_splits)
