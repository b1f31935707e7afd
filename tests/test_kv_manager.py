"""The block pool and block tables (pure Python, no model)."""

from __future__ import annotations

import pytest

from shardserve.cluster.kv_manager import BlockAllocator, KVCacheManager


def test_blocks_are_allocated_as_tokens_arrive_and_freed_at_the_end():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate(seq_id=1, num_tokens=5)  # 2 blocks
    assert len(kv.block_table(1)) == 2 and kv.num_free_blocks == 8
    assert kv.allocate(1, 8)  # still 2 blocks
    assert kv.num_free_blocks == 8
    assert kv.allocate(1, 9)  # a third block
    assert kv.num_free_blocks == 7
    kv.free(1)
    assert kv.num_free_blocks == 10 and kv.block_table(1) == []


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate(1, 8)
    assert not kv.allocate(2, 8)  # needs 2, only 1 free
    assert kv.num_free_blocks == 1 and kv.block_table(2) == []
    assert not kv.allocate(2, 4, reserve=1)  # would leave no block free
    assert kv.allocate(2, 4)


def test_shared_blocks_are_freed_by_their_last_owner():
    alloc = BlockAllocator(4)
    block = alloc.allocate()
    alloc.share(block)
    alloc.free(block)
    assert alloc.num_free == 3
    alloc.free(block)
    assert alloc.num_free == 4
    with pytest.raises(AssertionError):
        alloc.free(block)


def test_a_pool_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no blocks"):
        KVCacheManager(num_blocks=0, block_size=16)
