"""KV block pool (free list + reference counts) and per-sequence block tables."""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence

NULL_BLOCK = 0  # never handed out: pads block tables, stands in for evicted blocks


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_ids)} free")
        ids = [self.free_ids.popleft() for _ in range(n)]
        for i in ids:
            self.ref_counts[i] = 1
        return ids

    def incref(self, ids: list[int]) -> None:
        for i in ids:
            assert self.ref_counts[i] > 0, f"block {i} is free"
            self.ref_counts[i] += 1

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i == NULL_BLOCK:
                continue
            assert self.ref_counts[i] > 0, f"double free of block {i}"
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self.free_ids.append(i)

    def check_integrity(self, tables: list[list[int]] | None = None) -> None:
        """free + used == total; with the live block tables, ref counts equal the holders."""
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is twice in the free list"
        assert NULL_BLOCK not in free and self.ref_counts[NULL_BLOCK] == 0
        used = {i for i in range(1, self.num_blocks) if self.ref_counts[i] > 0}
        assert not free & used, f"blocks both free and referenced: {sorted(free & used)[:5]}"
        assert len(free) + len(used) == self.num_usable, "blocks neither free nor used"
        if tables is not None:
            holders = [0] * self.num_blocks
            for table in tables:
                for i in table:
                    if i != NULL_BLOCK:
                        holders[i] += 1
            assert holders == self.ref_counts, "reference counts differ from block tables"


class KVCacheManager:
    """Grows and frees the block tables of sequences; check, then act."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, admit: bool = False) -> bool:
        # Admitting a new sequence keeps a small watermark free for running decodes.
        reserve = self.watermark_blocks if admit else 0
        return self.blocks_needed(seq, num_new_tokens) + reserve <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        seq.block_ids += self.pool.allocate(self.blocks_needed(seq, num_new_tokens))

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_usable
