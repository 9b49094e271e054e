"""A copy of the KV cache's state for the inspector (`GET /v1/kv/state`, the page at `/kv`):
every block's state and reference count, each live sequence's block table, and the prefix
cache's and the scheduler's counters.

`KVSnapshot.take` runs on the engine thread between two steps, so it must cost next to nothing:
it only copies (the ref-count list, the ids of the cached-free and of the hashed blocks, each
live sequence's table: ~0.2 ms at 10k blocks, bench/kv_state.py). What is derived from the
copies (per-block states, counts, the JSON form) is `to_dict`'s, on whichever thread serves
it. A sequence is shown by its request id and token counts: never its tokens or its text.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from engine.block_manager import NULL_BLOCK, KVCacheManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence

# One character per block in `to_dict()["blocks"]["state"]`: a string of 10k characters
# costs ~20 us to encode as JSON where a list of 10k codes costs ~500 us.
NULL, FREE, CACHED_FREE, USED = "n", "f", "c", "u"
STATE_NAMES = {NULL: "null", FREE: "free", CACHED_FREE: "cached_free", USED: "used"}

# The waiting queue can be long and its sequences hold no blocks: the snapshot lists its
# head (preempted sequences re-enter there) and counts the rest.
MAX_WAITING_SHOWN = 64


@dataclass(frozen=True, slots=True)
class SeqState:
    request_id: str
    index: int                 # which of the request's n outputs (or beams)
    status: str                # "prefill" | "decode" (running) | "waiting"
    num_prompt_tokens: int
    num_tokens: int
    num_computed_tokens: int
    num_cached_blocks: int     # leading blocks published to the prefix cache
    num_evicted_blocks: int    # leading blocks freed by the sliding window
    num_preemptions: int
    block_table: list[int]     # NULL_BLOCK where evicted

    @classmethod
    def of(cls, seq: Sequence, running: bool) -> "SeqState":
        if not running:
            status = "waiting"
        elif seq.num_computed_tokens < seq.num_tokens - 1:
            status = "prefill"
        else:
            status = "decode"
        return cls(seq.request_id, seq.index, status, seq.num_prompt_tokens, seq.num_tokens,
                   seq.num_computed_tokens, seq.num_cached_blocks, seq.num_evicted_blocks,
                   seq.num_preemptions, list(seq.block_ids))

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "index": self.index, "status": self.status,
                "num_prompt_tokens": self.num_prompt_tokens, "num_tokens": self.num_tokens,
                "num_computed_tokens": self.num_computed_tokens,
                "num_cached_blocks": self.num_cached_blocks,
                "num_evicted_blocks": self.num_evicted_blocks,
                "num_preemptions": self.num_preemptions,
                "block_table": _with_nulls(self.block_table)}


def _with_nulls(table: list[int]) -> list[int | None]:
    """Evicted entries as None (JSON null); most tables have none (a C-speed scan)."""
    if NULL_BLOCK not in table:
        return table
    return [None if b == NULL_BLOCK else b for b in table]


@dataclass(frozen=True)
class KVSnapshot:
    number: int                # which snapshot this is (the taker counts them)
    time: float                # time.time() when taken
    num_steps: int             # engine steps so far
    block_size: int
    sliding_window: int | None
    enable_prefix_caching: bool
    ref_counts: list[int]      # per block, block 0 included
    cached_free: list[int]     # free blocks that keep their KV for reuse, LRU first
    hashed: list[int]          # blocks published to the prefix cache (cached-free or used)
    seqs: list[SeqState]       # running, then the head of the waiting queue
    num_waiting: int
    prefix_cache_queries: int  # tokens looked up at admission
    prefix_cache_hits: int     # of which found in the cache
    prefix_cache_evictions: int
    num_preemptions: int

    @classmethod
    def take(cls, kv: KVCacheManager, scheduler: Scheduler, num_steps: int = 0,
             number: int = 0) -> "KVSnapshot":
        """Copies only (module docstring); call it between two steps, on the thread that
        steps."""
        pool = kv.pool
        waiting = scheduler.waiting
        shown = itertools.islice(waiting, MAX_WAITING_SHOWN)
        return cls(number, time.time(), num_steps, kv.block_size, kv.sliding_window,
                   kv.enable_prefix_caching, pool.ref_counts.copy(), list(pool.cached_free),
                   list(pool.hash_to_block.values()),
                   [SeqState.of(s, True) for s in scheduler.running]
                   + [SeqState.of(s, False) for s in shown],
                   len(waiting), kv.prefix_queries, kv.prefix_hits, pool.num_evictions,
                   scheduler.num_preemptions)

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    def to_dict(self) -> dict:
        """The JSON form (`GET /v1/kv/state` adds the model and the capacity plan). Per-block
        facts are strings of one character per block id, and ref counts are sent only where
        they exceed 1 (a used block has 1 otherwise, any other 0): at 10k blocks a list of
        10k numbers would cost ~0.5 ms to encode, more than everything else together."""
        n = self.num_blocks
        ref = np.asarray(self.ref_counts, dtype=np.int32)
        state = np.where(ref > 0, ord(USED), ord(FREE)).astype(np.uint8)
        state[np.asarray(self.cached_free, dtype=np.int64)] = ord(CACHED_FREE)
        state[NULL_BLOCK] = ord(NULL)
        hashed = np.full(n, ord("0"), dtype=np.uint8)
        hashed[np.asarray(self.hashed, dtype=np.int64)] = ord("1")
        shared = np.flatnonzero(ref > 1)
        used, cached = int(np.count_nonzero(ref)), len(self.cached_free)
        usable = n - 1  # block 0 is the null block
        queries, hits = self.prefix_cache_queries, self.prefix_cache_hits
        return {
            "object": "kv.state", "snapshot": self.number, "time": self.time,
            "num_steps": self.num_steps, "block_size": self.block_size,
            "sliding_window": self.sliding_window,
            "enable_prefix_caching": self.enable_prefix_caching,
            "num_blocks": n,
            "counts": {"total": usable, "free": usable - used - cached, "cached_free": cached,
                       "used": used, "shared": len(shared)},
            "usage": used / usable,
            "blocks": {"state": state.tobytes().decode("ascii"),
                       "hashed": hashed.tobytes().decode("ascii"),
                       "shared": dict(zip(map(str, shared.tolist()), ref[shared].tolist()))},
            "states": STATE_NAMES,
            "sequences": [s.to_dict() for s in self.seqs],
            "num_running": sum(s.status != "waiting" for s in self.seqs),
            "num_waiting": self.num_waiting,
            "prefix_cache": {"queries": queries, "hits": hits,
                             "hit_rate": hits / queries if queries else None,
                             "evictions": self.prefix_cache_evictions},
            "num_preemptions": self.num_preemptions,
        }
