"""The KV block pool and the block tables of sequences.

BlockPool: reference counts, free blocks and the prefix cache.  A block is in exactly one
of three states: used (ref count > 0), free and empty (`free_ids`), or free but still
holding a full block of cached KV (`cached_free`, least recently freed first).  Allocation
takes empty blocks first and then evicts the least recently used cached ones.  Block 0 is
the null block: it pads block tables and replaces blocks evicted by a sliding window; it is
never handed out and never read by attention.

KVCacheManager: grows, forks, shares and shrinks the tables of sequences:
- prefix caching: every full block gets a hash chained from its parent's; a new sequence
  reuses the longest run of cached blocks whose tokens equal its own (never its last
  token, which must be computed to give logits);
- sliding window: a block whose every position is outside the window of every future query
  goes back to the pool and its table entry becomes the null block;
- copy-on-write: forked sequences share blocks by reference count; a shared, partially
  filled block is copied before a sequence writes into it.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from engine.sequence import Sequence

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


class KVCacheManager:
    """Check, then act: `can_allocate` says whether `allocate` will succeed."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01,
                 sliding_window: int | None = None, enable_prefix_caching: bool = False):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.copies: list[tuple[int, int]] = []  # (src, dst) block copies for the next step
        self.prefix_queries = 0                 # tokens looked up at admission
        self.prefix_hits = 0                    # of which found in the cache

    # ---------------------------------------------------------------- sizing

    def num_dead_blocks(self, num_computed: int) -> int:
        """Leading blocks that no query at position >= num_computed can see."""
        if self.sliding_window is None:
            return 0
        return max(0, (num_computed - self.sliding_window + 1) // self.block_size)

    def _cow_index(self, seq: Sequence) -> int | None:
        """The table index of a shared block that the next token would be written into."""
        pos = seq.num_computed_tokens
        i = pos // self.block_size
        if pos % self.block_size and i < len(seq.block_ids) \
                and self.pool.ref_counts[seq.block_ids[i]] > 1:
            return i
        return None

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks allocate() takes from the pool for `num_new_tokens` more tokens of seq."""
        bs = self.block_size
        total = -(-(seq.num_computed_tokens + num_new_tokens) // bs)
        held = max(len(seq.block_ids), self.num_dead_blocks(seq.num_computed_tokens))
        return max(0, total - held) + (self._cow_index(seq) is not None)

    def blocks_held(self, num_computed: int, num_new_tokens: int) -> int:
        """Live blocks of a sequence once `num_new_tokens` more follow `num_computed`."""
        total = -(-(num_computed + num_new_tokens) // self.block_size)
        return total - self.num_dead_blocks(num_computed)

    def window_growth(self, seq: Sequence, holds: int | None = None) -> int:
        """Blocks a sequence of a sliding-window model may still take on top of the `holds`
        it has (default: its live blocks): it never holds more than the window's bound."""
        if self.sliding_window is None:
            return 0
        bs = self.block_size
        if holds is None:
            holds = len(seq.block_ids) - seq.num_evicted_blocks
        bound = -(-(self.sliding_window - 1) // bs) + 1
        if seq.params.max_tokens is not None:
            bound = min(bound, -(-(seq.num_prompt_tokens + seq.params.max_tokens) // bs))
        return max(0, bound - holds)

    def max_new_tokens(self, seq: Sequence, admit: bool = False, hits: list[int] = (),
                       reserve: int = 0) -> int:
        """The most tokens of seq that allocate(seq, n, hits) can make room for now, leaving
        `reserve` blocks free.  Admitting a new sequence also keeps a small watermark free
        for running decodes."""
        bs = self.block_size
        if hits:
            computed, held = len(hits) * bs, len(hits)
            revived = sum(1 for i in hits[self.num_dead_blocks(computed):]
                          if self.pool.ref_counts[i] == 0)
        else:
            computed, held, revived = seq.num_computed_tokens, len(seq.block_ids), 0
        avail = self.pool.num_free - revived - reserve - (self.watermark_blocks if admit else 0)
        if not hits and self._cow_index(seq) is not None:
            avail -= 1
        if avail < 0:
            return 0
        return max(0, (max(held, self.num_dead_blocks(computed)) + avail) * bs - computed)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, admit: bool = False,
                     hits: list[int] = ()) -> bool:
        return num_new_tokens <= self.max_new_tokens(seq, admit, hits)

    # ---------------------------------------------------------------- prefix cache

    def _key(self, seq: Sequence, i: int) -> tuple:
        """What block i of seq is: its parent's chained hash and its own tokens."""
        bs = self.block_size
        return (seq.block_hashes[i - 1] if i else None, tuple(seq.token_ids[i * bs:(i + 1) * bs]))

    def _extend_hashes(self, seq: Sequence, n: int) -> None:
        """Chain hashes of the first n full blocks of seq's tokens (computed once each)."""
        hashes = seq.block_hashes
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(hash(self._key(seq, i)))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest block-aligned prefix of seq's tokens, leaving
        at least the last token to compute.  Takes no reference."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        bs = self.block_size
        n = (seq.num_tokens - 1) // bs
        self._extend_hashes(seq, n)
        hits = []
        for i in range(n):
            block = self.pool.lookup(seq.block_hashes[i], self._key(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_blocks(self, seq: Sequence) -> None:
        """Publish the blocks of seq that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n = min(seq.num_computed_tokens // bs, len(seq.block_ids))
        if n <= seq.num_cached_blocks:
            return
        self._extend_hashes(seq, n)
        for i in range(seq.num_cached_blocks, n):
            block = seq.block_ids[i]
            if block != NULL_BLOCK:
                self.pool.register(block, seq.block_hashes[i], self._key(seq, i))
        seq.num_cached_blocks = n

    # ---------------------------------------------------------------- tables

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] | None = None) -> None:
        """Make room for `num_new_tokens` more tokens of seq.  Admission passes `hits` (from
        `match_prefix`, maybe empty) for a sequence that holds nothing yet: those blocks are
        shared and their tokens count as computed."""
        if hits is not None:
            assert not seq.block_ids and seq.num_computed_tokens == 0, seq
            cached = len(hits) * self.block_size
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += cached
            dead = self.num_dead_blocks(cached)
            self.pool.touch(hits[dead:])
            seq.block_ids = [NULL_BLOCK] * dead + hits[dead:]
            seq.num_computed_tokens = cached
            seq.num_cached_blocks = len(hits)
            seq.num_evicted_blocks = dead
        self.evict_out_of_window(seq)
        n = self.blocks_needed(seq, num_new_tokens)
        if n > self.pool.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.pool.num_free} free")
        cow = self._cow_index(seq)
        if cow is not None:
            old = seq.block_ids[cow]
            seq.block_ids[cow] = self.pool.allocate(1)[0]
            self.copies.append((old, seq.block_ids[cow]))
            self.pool.free([old])
            n -= 1
        seq.block_ids += self.pool.allocate(n)

    def evict_out_of_window(self, seq: Sequence) -> int:
        """Free the blocks no future query of seq can see; returns how many."""
        dead = min(self.num_dead_blocks(seq.num_computed_tokens), len(seq.block_ids))
        if dead <= seq.num_evicted_blocks:
            return 0
        ids = seq.block_ids[seq.num_evicted_blocks:dead]
        self.pool.free(ids[::-1])
        seq.block_ids[seq.num_evicted_blocks:dead] = [NULL_BLOCK] * len(ids)
        seq.num_evicted_blocks = dead
        return sum(1 for i in ids if i != NULL_BLOCK)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (copy-on-write happens at the next write)."""
        assert not child.block_ids
        self.pool.incref(parent.block_ids)
        child.block_ids = list(parent.block_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_evicted_blocks = parent.num_evicted_blocks
        child.num_cached_blocks = parent.num_cached_blocks
        child.block_hashes = list(parent.block_hashes)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids[::-1])
        seq.block_ids = []
        seq.num_evicted_blocks = 0
        seq.num_cached_blocks = 0

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_usable
