"""Paged KV cache bookkeeping: a pool of fixed-size blocks, a block table per sequence, and
the prefix cache.

This is the one allocation decision for the whole model: every shard applies the same block
table to its own pool (its layers, its KV heads), so block i means the same tokens everywhere.

Prefix caching: a full block whose KV has been computed is named by a hash of its tokens
chained to the hash of the block before it, so a name means the same context wherever it
appears. A new sequence starts with the cached blocks of its longest named prefix (shared:
reference counts) and computes only the rest. A block nobody uses any more keeps its KV and
its name until the space is needed: free blocks without a name are handed out first, then
named ones, least recently used first.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable

BlockHash = bytes


def block_hashes(token_ids: list[int], block_size: int, start: int = 0,
                 parent: BlockHash = b"") -> list[BlockHash]:
    """Names of the full blocks of `token_ids` from block `start` on, chained to `parent`
    (the name of block start - 1). 128 bits of blake2b: a collision would serve one
    context's KV to another, so the name must not be Python's 64-bit hash()."""
    names = []
    for begin in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        block = array.array("i", token_ids[begin:begin + block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        names.append(parent)
    return names


class BlockAllocator:
    """Blocks with reference counts. A block at count 0 is free; a free block may still hold
    a named prefix (cached) until it is handed out again."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free_unnamed: deque[int] = deque(range(num_blocks))
        self._free_named: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._name_of: dict[int, BlockHash] = {}
        self._block_named: dict[BlockHash, int] = {}
        self.num_evicted = 0  # named blocks handed out for other contents

    @property
    def num_free(self) -> int:
        return len(self._free_unnamed) + len(self._free_named)

    @property
    def num_named(self) -> int:
        """Blocks holding a named prefix, in use or not."""
        return len(self._name_of)

    def allocate(self) -> int:
        if self._free_unnamed:
            block = self._free_unnamed.popleft()
        else:
            block, _ = self._free_named.popitem(last=False)
            del self._block_named[self._name_of.pop(block)]
            self.num_evicted += 1
        self._ref_counts[block] = 1
        return block

    def lookup(self, name: BlockHash) -> int | None:
        return self._block_named.get(name)

    def share(self, block: int) -> None:
        """Another owner for a block (a cached prefix): taken out of the free pool if idle."""
        if self._ref_counts[block] == 0:
            del self._free_named[block]
        self._ref_counts[block] += 1

    def name(self, block: int, name: BlockHash) -> None:
        """`block` (in use, its KV computed) holds the context `name`. When another block
        already does (two sequences computed the same prefix at once), the first keeps it."""
        if name not in self._block_named and block not in self._name_of:
            self._block_named[name] = block
            self._name_of[block] = name

    def free(self, block: int) -> None:
        assert self._ref_counts[block] > 0, f"block {block} freed twice"
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            if block in self._name_of:
                self._free_named[block] = None
            else:
                self._free_unnamed.append(block)

    def forget_names(self) -> None:
        """Drop every name (the shards' caches were replaced): no block holds a prefix."""
        self._free_unnamed.extend(self._free_named)
        self._free_named.clear()
        self._name_of.clear()
        self._block_named.clear()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache has no blocks: raise the KV memory budget")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.allocator = BlockAllocator(num_blocks)
        self._tables: dict[int, list[int]] = {}
        # seq_id -> names of its leading blocks already in the cache
        self._named: dict[int, list[BlockHash]] = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached prefixes included (they are given up on demand)."""
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a reusable prefix, whether a running sequence holds them or not."""
        return self.allocator.num_named

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    # --- prefix caching ---------------------------------------------------------------------

    def cached_prefix_len(self, token_ids: list[int]) -> int:
        """Tokens at the start of `token_ids` whose KV a cached block holds; at least one
        token is left to compute (its logits give the next token). Safe to call from another
        thread (the router reads it to pick a replica): it only looks names up."""
        if not self.enable_prefix_caching:
            return 0
        hits = 0
        for name in block_hashes(token_ids[:len(token_ids) - 1], self.block_size):
            if self.allocator.lookup(name) is None:
                break
            hits += 1
        return hits * self.block_size

    def share_cached_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Start seq_id (which holds no blocks) with the cached blocks of its longest cached
        prefix; returns the tokens they hold (0 without a hit). At least one token is left
        to compute."""
        assert seq_id not in self._tables, f"sequence {seq_id} already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        names, table = [], []
        for name in block_hashes(token_ids[:len(token_ids) - 1], self.block_size):
            block = self.allocator.lookup(name)
            if block is None:
                break
            self.allocator.share(block)
            names.append(name)
            table.append(block)
        if table:
            self._tables[seq_id], self._named[seq_id] = table, names
        return len(table) * self.block_size

    def cache_computed_blocks(self, seq_id: int, num_computed: int,
                              token_ids: Callable[[int, int], list[int]]) -> None:
        """Name seq_id's full blocks among its first num_computed tokens, whose KV is now in
        every shard's cache; token_ids(start, end) gives the sequence's tokens."""
        if not self.enable_prefix_caching:
            return
        named = self._named.setdefault(seq_id, [])
        full = min(num_computed // self.block_size, len(self._tables.get(seq_id, ())))
        if full <= len(named):
            return
        start = len(named)
        new = block_hashes(token_ids(start * self.block_size, full * self.block_size),
                           self.block_size, parent=named[-1] if named else b"")
        table = self._tables[seq_id]
        for i, name in enumerate(new, start):
            self.allocator.name(table[i], name)
        named.extend(new)

    def drop_prefix_cache(self) -> None:
        """Forget every cached prefix (the shards' KV caches were replaced)."""
        self.allocator.forget_names()
        self._named.clear()

    # --- allocation -------------------------------------------------------------------------

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
        # Last block first: the least recently used cached blocks are then a prefix's tail,
        # and what an eviction leaves is still a usable (shorter) prefix.
        for block in reversed(self._tables.pop(seq_id, [])):
            self.allocator.free(block)
        self._named.pop(seq_id, None)
