"""The block tables of sequences, over the pool of KV blocks (engine/block_pool.py).

KVCacheManager grows, forks, shares and shrinks the tables of sequences:
- prefix caching: every full block gets a hash chained from its parent's; a new sequence
  reuses the longest run of cached blocks whose tokens equal its own (never its last
  token, which must be computed to give logits);
- sliding window: a block whose every position is outside the window of every future query
  goes back to the pool and its table entry becomes the null block;
- copy-on-write: forked sequences share blocks by reference count; a shared, partially
  filled block is copied before a sequence writes into it.
"""
from __future__ import annotations

from engine.block_pool import NULL_BLOCK, BlockPool
from engine.sequence import Sequence

__all__ = ["ADMISSION_WATERMARK", "NULL_BLOCK", "BlockPool", "KVCacheManager", "blocks_spanning"]

# Admitting a new sequence keeps this share of the blocks free, for the running ones' decodes.
ADMISSION_WATERMARK = 0.01


def blocks_spanning(num_positions: int, block_size: int) -> int:
    """Blocks that num_positions consecutive positions can touch at the worst alignment: a
    sliding window's bound on the blocks a sequence holds."""
    return -(-(num_positions - 1) // block_size) + 1


class KVCacheManager:
    """Check, then act: `max_new_tokens` says how many tokens `allocate` can make room for;
    after a step, `advance` publishes and evicts what the computed tokens allow."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = ADMISSION_WATERMARK,
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
        bound = blocks_spanning(self.sliding_window, bs)
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

    def advance(self, seq: Sequence, num_new_tokens: int) -> None:
        """After a step computed num_new_tokens more of seq: they count as computed, the
        blocks they filled are published to the prefix cache, and the blocks no later query
        can see (sliding window) go back to the pool. Computed tokens grow only here (and
        at admission, by prefix-cache hits), so no other place needs to evict."""
        seq.num_computed_tokens += num_new_tokens
        self.cache_blocks(seq)
        self.evict_out_of_window(seq)

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past seq's computed tokens (rejected drafts' blocks)."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        if len(seq.block_ids) > keep:
            self.pool.free(seq.block_ids[keep:][::-1])
            del seq.block_ids[keep:]

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
