"""BlockManager: reference counts, chain hashes, LRU eviction; invariants under random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2ray.engine.kv_cache import BlockManager, NoFreeBlocks, block_hashes, chain_hash


def test_chain_hash_names_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, 2)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4, 2)
    assert a[1] != b[1]  # same second block, different prefix
    assert a[0] == chain_hash(b"k2ray-prefix-root", [1, 2, 3, 4])
    again = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 1, 1], 4, 3, list(a[:1]))
    assert again[:2] == a
    assert chain_hash(a[0], [1]) != chain_hash(a[0], [1], extra=b"salt")


def test_allocate_free_and_refcounts():
    bm = BlockManager(4, 2)
    t = bm.allocate(3)
    assert bm.num_free_blocks == 1 and bm.usage == 0.75
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2)
    bm.publish(t[0], b"h0")
    bm.take([t[0]])
    bm.free(t)
    assert bm.ref_count(t[0]) == 1 and bm.num_free_blocks == 3
    bm.free([t[0]])
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 1
    assert bm.match_prefix([b"h0", b"h1"]) == [t[0]]
    with pytest.raises(RuntimeError):
        bm.free([t[1]])
    bm.check_consistent()


def test_lru_eviction_prefers_never_used_then_oldest_released_tail_first():
    bm = BlockManager(4, 1)
    a = bm.allocate(2)
    for i, b in enumerate(a):
        bm.publish(b, f"a{i}".encode())
    bm.free(a)  # released: tail (a1) becomes least recent
    b = bm.allocate(2)  # the never-used blocks first
    assert set(b).isdisjoint(a) and bm.num_cached_blocks == 2
    c = bm.allocate(1)  # now evict: the tail of the released prefix goes first
    assert c == [a[1]] and bm.match_prefix([b"a0", b"a1"]) == [a[0]]
    assert bm.evictions == 1
    bm.check_consistent()


def test_reviving_a_cached_block_removes_it_from_eviction():
    bm = BlockManager(2, 1)
    (x,) = bm.allocate(1)
    bm.publish(x, b"x")
    bm.free([x])
    bm.take(bm.match_prefix([b"x"]))
    assert bm.ref_count(x) == 1 and bm.num_free_blocks == 1
    assert bm.allocate(1) != [x]
    bm.check_consistent()


def test_duplicate_content_stays_private():
    bm = BlockManager(2, 1)
    x, y = bm.allocate(2)
    bm.publish(x, b"h")
    bm.publish(y, b"h")  # same content computed twice: y is not published
    bm.free([x, y])
    assert bm.num_cached_blocks == 1 and bm.match_prefix([b"h"]) == [x]
    bm.check_consistent()


def test_disabled_prefix_cache():
    bm = BlockManager(2, 1, enable_prefix_caching=False)
    (x,) = bm.allocate(1)
    bm.publish(x, b"h")
    bm.free([x])
    assert bm.match_prefix([b"h"]) == [] and bm.num_cached_blocks == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "publish", "share", "reset"]), st.integers(0, 7)),
                max_size=60))
def test_random_operations_keep_invariants(ops):
    bm = BlockManager(8, 2)
    tables: list[list[int]] = []
    n_hash = 0
    for op, k in ops:
        if op == "alloc":
            n = k % 4 + 1
            if bm.can_allocate(n):
                tables.append(bm.allocate(n))
            else:
                with pytest.raises(NoFreeBlocks):
                    bm.allocate(n)
        elif op == "free" and tables:
            bm.free(tables.pop(k % len(tables)))
        elif op == "publish" and tables:
            t = tables[k % len(tables)]
            bm.publish(t[0], f"h{n_hash}".encode())
            n_hash += 1
        elif op == "share" and n_hash:
            hit = bm.match_prefix([f"h{k % n_hash}".encode()])
            bm.take(hit)
            if hit:
                tables.append(hit)
        elif op == "reset":
            bm.reset_prefix_cache()
        bm.check_consistent()
        held = sum(len(t) for t in tables)
        assert bm.num_used_blocks == len({b for t in tables for b in t}) <= held
    for t in tables:
        bm.free(t)
    assert bm.num_free_blocks == 8
    bm.check_consistent()
