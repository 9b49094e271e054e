"""The KV block pool: reference counts, free blocks and the prefix cache's index.

A block is in exactly one of three states: used (ref count > 0), free and empty (`free_ids`),
or free but still holding a full block of cached KV (`cached_free`, least recently freed
first).  Allocation takes empty blocks first and then evicts the least recently used cached
ones.  Block 0 is the null block: it pads block tables and replaces blocks evicted by a sliding
window; it is never handed out and never read by attention.
"""
from __future__ import annotations

from collections import OrderedDict, deque

NULL_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(1, num_blocks))   # free, nothing cached
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # free, cached, LRU first
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks  # (parent hash, tokens)
        self.hash_to_block: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: empty ones plus evictable cached ones."""
        return len(self.free_ids) + len(self.cached_free)

    @property
    def num_cached_free(self) -> int:
        return len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free} free")
        ids = []
        for _ in range(n):
            if self.free_ids:
                i = self.free_ids.popleft()
            else:
                i, _ = self.cached_free.popitem(last=False)
                self._uncache(i)
                self.num_evictions += 1
            self.ref_counts[i] = 1
            ids.append(i)
        return ids

    def incref(self, ids: list[int]) -> None:
        for i in ids:
            if i == NULL_BLOCK:
                continue
            assert self.ref_counts[i] > 0, f"block {i} is free"
            self.ref_counts[i] += 1

    def touch(self, ids: list[int]) -> None:
        """Take a reference to cached blocks, reviving those that sat free in the cache."""
        for i in ids:
            if self.ref_counts[i] == 0:
                del self.cached_free[i]
            self.ref_counts[i] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference to each block; pass a table tail first so that, in the cache,
        a sequence's last blocks are evicted before its (more shareable) first ones."""
        for i in ids:
            if i == NULL_BLOCK:
                continue
            assert self.ref_counts[i] > 0, f"double free of block {i}"
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                if self.block_hash[i] is None:
                    self.free_ids.append(i)
                else:
                    self.cached_free[i] = None

    # ---------------------------------------------------------------- prefix cache

    def lookup(self, h: int, key: tuple) -> int | None:
        i = self.hash_to_block.get(h)
        if i is None or self.block_key[i] != key:  # a hash collision is a miss
            return None
        return i

    def register(self, i: int, h: int, key: tuple) -> None:
        """Publish a used, full block under its chained hash (first writer wins)."""
        assert self.ref_counts[i] > 0, f"block {i} is free"
        if self.block_hash[i] is not None or h in self.hash_to_block:
            return
        self.block_hash[i] = h
        self.block_key[i] = key
        self.hash_to_block[h] = i

    def _uncache(self, i: int) -> None:
        del self.hash_to_block[self.block_hash[i]]
        self.block_hash[i] = None
        self.block_key[i] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that nobody holds (used blocks stay published)."""
        while self.cached_free:
            i, _ = self.cached_free.popitem(last=False)
            self._uncache(i)
            self.free_ids.append(i)

    # ---------------------------------------------------------------- invariants

    def check_integrity(self, tables: list[list[int]] | None = None) -> None:
        """free + cached + used == total; with the live block tables, ref counts equal the
        number of tables holding each block; the hash index and the blocks agree."""
        free, cached = set(self.free_ids), set(self.cached_free)
        assert len(free) == len(self.free_ids), "a block is twice in the free list"
        assert NULL_BLOCK not in free | cached and self.ref_counts[NULL_BLOCK] == 0, \
            "the null block is free or referenced"
        assert not free & cached, f"blocks both empty and cached: {sorted(free & cached)[:5]}"
        used = {i for i in range(1, self.num_blocks) if self.ref_counts[i] > 0}
        assert not (free | cached) & used, \
            f"blocks both free and referenced: {sorted((free | cached) & used)[:5]}"
        assert all(c >= 0 for c in self.ref_counts), "negative reference count"
        assert len(free) + len(cached) + len(used) == self.num_usable, \
            "blocks neither free, cached nor used"
        for h, i in self.hash_to_block.items():
            assert self.block_hash[i] == h, f"hash index points at block {i} with another hash"
        hashed = {i for i in range(self.num_blocks) if self.block_hash[i] is not None}
        assert hashed == set(self.hash_to_block.values()), "a hashed block is not indexed"
        assert cached <= hashed and not free & hashed, "free lists and hashes disagree"
        if tables is not None:
            holders = [0] * self.num_blocks
            for table in tables:
                for i in table:
                    if i != NULL_BLOCK:
                        holders[i] += 1
            assert holders == self.ref_counts, "reference counts differ from block tables"
