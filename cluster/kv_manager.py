"""Paged KV cache bookkeeping: a pool of fixed-size blocks and a block table per sequence.

This is the one allocation decision for the whole model: every shard applies the same block
table to its own pool (its layers, its KV heads), so block i means the same tokens everywhere.
Reference counts let several sequences share a block later (prefix caching) with no redesign.
"""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        block = self._free.popleft()
        self._ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """Another owner for an allocated block (a shared prefix)."""
        assert self._ref_counts[block] > 0, f"block {block} is not allocated"
        self._ref_counts[block] += 1

    def free(self, block: int) -> None:
        assert self._ref_counts[block] > 0, f"block {block} freed twice"
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free.append(block)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache has no blocks: raise the KV memory budget")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self._tables: dict[int, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def allocate(self, seq_id: int, num_tokens: int, reserve: int = 0) -> bool:
        """Grow seq_id's table to hold num_tokens, leaving at least `reserve` blocks free.
        All or nothing: on False nothing was allocated."""
        table = self._tables.setdefault(seq_id, [])
        needed = self.blocks_for(num_tokens) - len(table)
        if needed > 0 and needed + reserve > self.allocator.num_free:
            if not table:
                del self._tables[seq_id]
            return False
        for _ in range(needed):
            table.append(self.allocator.allocate())
        return True

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Give back the blocks past those num_tokens need (speculative decoding made room
        for drafts that were rejected)."""
        table = self._tables.get(seq_id)
        if table is None:
            return
        keep = self.blocks_for(num_tokens)
        for block in table[keep:]:
            self.allocator.free(block)
        del table[keep:]

    def free(self, seq_id: int) -> None:
        for block in self._tables.pop(seq_id, []):
            self.allocator.free(block)
