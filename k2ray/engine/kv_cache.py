"""Block accounting for the paged latent cache of one attention worker, with prefix caching.

The cache itself (``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`` per layer) lives with the model, in the
executor; here the engine keeps only which block holds what. A sequence owns a *block table*: the ids of the blocks
holding its positions ``[i * block_size, (i + 1) * block_size)`` in order.

Prefix caching: once a block is full its content is identified by a *chain hash* — the hash of the previous block's
hash and this block's tokens — so a hash names the whole prefix up to the end of the block, not only the block. Full
blocks are published under their hash; a new sequence whose prefix hashes match takes those blocks (reference count
+1) instead of recomputing them. A block nobody references any more keeps its content and its hash and waits in an LRU
list; it is reused for new data only when no never-used block is left, least recently released first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Sequence

# The chain starts from a fixed root so that equal first blocks of any two sequences hash alike.
ROOT_HASH = b"k2ray-prefix-root"


def chain_hash(parent: bytes, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """Hash of a full block given its parent's hash: 128-bit BLAKE2b over (parent, extra, tokens as int64)."""
    h = hashlib.blake2b(parent, digest_size=16)
    if extra:
        h.update(extra)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(tokens: Sequence[int], block_size: int, num_blocks: int, known: list[bytes] | None = None,
                 extra: bytes = b"", extra_of: Optional[Callable[[int, int], bytes]] = None) -> list[bytes]:
    """Chain hashes of the first ``num_blocks`` full blocks of ``tokens``; extends ``known`` (already computed
    leading hashes) in place and returns it. ``extra_of(lo, hi)`` adds what else the block of positions
    ``[lo, hi)`` depends on besides its tokens (the content hashes of the images whose placeholders it holds)."""
    out = known if known is not None else []
    parent = out[-1] if out else ROOT_HASH
    for i in range(len(out), num_blocks):
        more = extra + extra_of(i * block_size, (i + 1) * block_size) if extra_of is not None else extra
        parent = chain_hash(parent, tokens[i * block_size : (i + 1) * block_size], more)
        out.append(parent)
    return out


class NoFreeBlocks(RuntimeError):
    """Raised by :meth:`BlockManager.allocate` when the attention worker's cache cannot hold more blocks."""


class BlockManager:
    """Free list, reference counts and the prefix cache of one attention worker's ``num_blocks`` cache blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never used (or emptied); pop() from the end
        self._ref = [0] * num_blocks
        self._hash_of: list[Optional[bytes]] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # chain hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks with content, LRU first
        # counters for metrics
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found
        self.evictions = 0

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take: never used plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (cached-but-unreferenced blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # -- prefix cache ----------------------------------------------------------------------------------------------
    def match_prefix(self, hashes: Iterable[bytes]) -> list[int]:
        """Blocks holding the longest cached prefix named by ``hashes`` (nothing is taken)."""
        if not self.enable_prefix_caching:
            return []
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def take(self, blocks: Iterable[int]) -> None:
        """Add a reference to each (cached) block, e.g. the result of :meth:`match_prefix`."""
        for b in blocks:
            if self._ref[b] == 0:
                self._evictable.pop(b, None)
            self._ref[b] += 1

    def publish(self, block: int, h: bytes) -> None:
        """Announce that ``block`` is full and holds the prefix named ``h``. If another block already holds that
        prefix, ``block`` stays private (it is freed as plain memory)."""
        if not self.enable_prefix_caching or self._hash_of[block] is not None:
            return
        if h in self._cached:
            return
        self._cached[h] = block
        self._hash_of[block] = h

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached block; returns how many were dropped."""
        n = 0
        for b in list(self._evictable):
            self._drop_hash(b)
            self._free.append(b)
            n += 1
        self._evictable.clear()
        return n

    # -- allocation ------------------------------------------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with reference count 1; never-used blocks first, then the least recently released cached."""
        if n > self.num_free_blocks:
            raise NoFreeBlocks(f"need {n} cache blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._drop_hash(b)
                self.evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block. Released blocks with a published hash stay cached (LRU); the others
        return to the free list. Release the *last* block of a table first so that, on eviction, a prefix's tail
        goes before its head: pass tables in order, they are walked backwards."""
        for b in reversed(list(blocks)):
            r = self._ref[b] - 1
            if r < 0:
                raise RuntimeError(f"cache block {b} freed more often than taken")
            self._ref[b] = r
            if r == 0:
                if self._hash_of[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def _drop_hash(self, b: int) -> None:
        h = self._hash_of[b]
        if h is not None:
            self._hash_of[b] = None
            if self._cached.get(h) == b:
                del self._cached[h]

    def check_consistent(self) -> None:
        """Internal invariants (used by tests): every block is exactly one of free / evictable / referenced."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate block in free list"
        assert not (free & evictable), "block both free and evictable"
        for b in range(self.num_blocks):
            referenced = self._ref[b] > 0
            assert referenced + (b in free) + (b in evictable) == 1, f"block {b} in an inconsistent state"
            if b in free:
                assert self._hash_of[b] is None, f"free block {b} still has a hash"
        for h, b in self._cached.items():
            assert self._hash_of[b] == h
