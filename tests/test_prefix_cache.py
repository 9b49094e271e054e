"""Prefix caching, sliding-window eviction and copy-on-write of the KV cache manager, on the
CPU without a model."""
from __future__ import annotations

import pytest

from engine import block_manager
from engine.block_manager import NULL_BLOCK, BlockPool, KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def make_seq(tokens, name: str = "r", index: int = 0, max_tokens: int | None = 16) -> Sequence:
    return Sequence(name, index, list(tokens), SamplingParams(max_tokens=max_tokens),
                    arrival_time=0.0)


def make_kv(num_blocks: int = 16, block_size: int = 4, window: int | None = None,
            prefix: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, watermark=0.0, sliding_window=window,
                          enable_prefix_caching=prefix)


def admit(kv: KVCacheManager, seq: Sequence) -> list[int]:
    """What Scheduler._admit does for a prompt that fits: match, then allocate the rest."""
    hits = kv.match_prefix(seq)
    kv.allocate(seq, seq.num_tokens - len(hits) * kv.block_size, hits)
    return hits


def compute(kv: KVCacheManager, seq: Sequence) -> None:
    """LLMEngine.step after the forward: everything scheduled is computed, then published."""
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_blocks(seq)


def decode(kv: KVCacheManager, seq: Sequence, token: int) -> None:
    """Sample `token`, then schedule and compute it (one decode step)."""
    seq.token_ids.append(token)
    kv.allocate(seq, 1)
    compute(kv, seq)


def prefill(kv: KVCacheManager, tokens, name: str = "r") -> Sequence:
    seq = make_seq(tokens, name)
    admit(kv, seq)
    compute(kv, seq)
    return seq


def tables(*seqs: Sequence) -> list[list[int]]:
    return [s.block_ids for s in seqs]


A = list(range(1, 9))     # two full blocks of 4
X = list(range(101, 109))  # two other full blocks


# ---------------------------------------------------------------- hashes and hits


def test_block_hashes_chain_from_the_parent_hash():
    kv = make_kv()
    a = prefill(kv, A + [9])
    assert len(a.block_hashes) == 2 and len(set(a.block_hashes)) == 2
    assert [kv.pool.hash_to_block[h] for h in a.block_hashes] == a.block_ids[:2]

    # a's second block under another (cached) first block is another block: a miss
    y = prefill(kv, [0, 0, 0, 0, 1, 1, 1, 1, 9], "y")
    b = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert kv.match_prefix(b) == y.block_ids[:1]
    assert b.block_hashes[1] != a.block_hashes[1]
    # a shared first block and a different second one: the chain stops after the first
    assert kv.match_prefix(make_seq([1, 2, 3, 4, 0, 6, 7, 8, 9])) == a.block_ids[:1]
    assert kv.match_prefix(make_seq(A + [10, 11])) == a.block_ids[:2]
    assert kv.match_prefix(make_seq([1, 2, 3, 4])) == []  # its last token is in block 0


def test_a_hit_leaves_the_last_token_to_compute():
    kv = make_kv()
    a = prefill(kv, A + [9])
    b = make_seq(A + [7])
    hits = admit(kv, b)
    assert hits == a.block_ids[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_blocks == 2
    assert b.block_ids[:2] == hits and len(b.block_ids) == 3  # token 8 gets its own block
    assert b.block_ids[2] not in a.block_ids
    assert [kv.pool.ref_counts[i] for i in hits] == [2, 2]
    kv.pool.check_integrity(tables(a, b))


def test_a_prompt_of_exactly_k_full_blocks_hits_at_most_k_minus_1():
    kv = make_kv()
    a = prefill(kv, A)                    # 2 full blocks, both published once computed
    assert [kv.pool.block_hash[i] is not None for i in a.block_ids] == [True, True]
    b = make_seq(A)
    hits = admit(kv, b)
    assert hits == a.block_ids[:1]
    assert b.num_computed_tokens == 4     # the whole second block is recomputed
    assert b.block_ids[1] != a.block_ids[1]
    compute(kv, b)                        # its copy of block 1 is not published: a's is
    assert kv.pool.block_hash[b.block_ids[1]] is None
    assert kv.pool.hash_to_block[b.block_hashes[1]] == a.block_ids[1]
    kv.pool.check_integrity(tables(a, b))


def test_a_partial_last_block_is_never_cached_until_it_is_full():
    kv = make_kv()
    a = prefill(kv, A + [9, 10])          # blocks: [1..4] [5..8] [9, 10]
    assert a.num_cached_blocks == 2 and len(kv.pool.hash_to_block) == 2
    assert kv.pool.block_hash[a.block_ids[2]] is None
    assert kv.match_prefix(make_seq(A + [9, 10, 11, 12, 13])) == a.block_ids[:2]
    decode(kv, a, 11)
    assert kv.pool.block_hash[a.block_ids[2]] is None    # 3 of 4 tokens
    decode(kv, a, 12)
    assert a.num_cached_blocks == 3 and kv.pool.block_hash[a.block_ids[2]] is not None
    assert kv.match_prefix(make_seq(A + [9, 10, 11, 12, 13])) == a.block_ids[:3]
    kv.free(a)                            # all three are published: cached, not empty
    assert kv.pool.num_cached_free == 3 and len(kv.pool.free_ids) == kv.pool.num_usable - 3
    kv.pool.check_integrity([])


def test_counters_count_admitted_tokens_and_hit_tokens():
    kv = make_kv()
    prefill(kv, A + [9])
    assert (kv.prefix_queries, kv.prefix_hits) == (9, 0)
    prefill(kv, A + [1, 2, 3])
    assert (kv.prefix_queries, kv.prefix_hits) == (9 + 11, 8)
    prefill(kv, X)
    assert (kv.prefix_queries, kv.prefix_hits) == (9 + 11 + 8, 8)

    off = make_kv(prefix=False)
    a = prefill(off, A + [9])
    b = make_seq(A + [9])
    assert off.match_prefix(b) == [] and off.pool.hash_to_block == {}
    assert a.num_cached_blocks == 0 and a.block_hashes == []
    assert (off.prefix_queries, off.prefix_hits) == (0, 0)


def test_scheduler_counts_queries_and_hits_at_admission():
    kv = make_kv(num_blocks=32)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq(A + [9])
    sched.add(a)
    out = sched.schedule()
    assert out.num_tokens == [9]
    a.num_computed_tokens += 9
    kv.cache_blocks(a)
    a.token_ids.append(0)                 # a samples
    b = make_seq(A + [9, 10, 11])
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a, b] and out.num_tokens == [1, 11 - 8]
    assert b.block_ids[:2] == a.block_ids[:2]
    assert (kv.prefix_queries, kv.prefix_hits) == (9 + 11, 8)


# ---------------------------------------------------------------- LRU eviction


def test_allocation_takes_empty_blocks_then_evicts_the_least_recently_freed():
    kv = make_kv(num_blocks=9, block_size=2)           # 8 usable
    x, y = prefill(kv, [1, 2, 3, 4, 5], "x"), prefill(kv, [6, 7, 8, 9, 10], "y")
    x_ids, y_ids = list(x.block_ids), list(y.block_ids)  # 2 published + 1 partial each
    kv.free(x)                                          # tail first: x1, x0 cached
    kv.free(y)
    pool = kv.pool
    assert list(pool.cached_free) == [x_ids[1], x_ids[0], y_ids[1], y_ids[0]]
    assert list(pool.free_ids)[-2:] == [x_ids[2], y_ids[2]]  # partial blocks: empty
    assert len(pool.free_ids) == 4 and pool.num_free == 8

    got = pool.allocate(4)                              # the empty ones, nothing evicted
    assert set(got) == {7, 8, x_ids[2], y_ids[2]} and pool.num_evictions == 0
    assert pool.num_cached_free == 4
    order = [pool.allocate(1)[0] for _ in range(4)]
    assert order == [x_ids[1], x_ids[0], y_ids[1], y_ids[0]]
    assert pool.num_evictions == 4 and pool.hash_to_block == {}
    assert all(pool.block_hash[i] is None for i in order)
    pool.check_integrity([got + order])


def test_an_evicted_tail_shortens_the_hit_but_keeps_the_head():
    kv = make_kv(num_blocks=7, block_size=2)           # 6 usable
    a = prefill(kv, [1, 2, 3, 4, 5, 6, 7])              # 3 published + 1 partial
    ids = list(a.block_ids)
    kv.free(a)
    probe = [1, 2, 3, 4, 5, 6, 7, 8]
    assert kv.match_prefix(make_seq(probe)) == ids[:3]
    held = kv.pool.allocate(3)                          # 2 empty + a's partial block
    assert kv.pool.num_evictions == 0 and ids[3] in held
    held += kv.pool.allocate(1)
    assert held[-1] == ids[2] and kv.match_prefix(make_seq(probe)) == ids[:2]
    held += kv.pool.allocate(1)
    assert held[-1] == ids[1] and kv.match_prefix(make_seq(probe)) == ids[:1]
    kv.pool.check_integrity([held])


def test_a_hit_revives_a_cached_free_block_and_refreeing_makes_it_most_recent():
    kv = make_kv(num_blocks=9, block_size=2)
    x, a = prefill(kv, [1, 2, 3, 4, 5], "x"), prefill(kv, [6, 7, 8, 9, 10], "a")
    x_ids, a_ids = list(x.block_ids), list(a.block_ids)
    kv.free(a)
    kv.free(x)
    pool = kv.pool
    assert list(pool.cached_free) == [a_ids[1], a_ids[0], x_ids[1], x_ids[0]]
    free_before = pool.num_free

    b = make_seq([6, 7, 8, 9, 11])
    hits = kv.match_prefix(b)
    assert hits == a_ids[:2]
    # the revived blocks are not free for b's own new block
    assert kv.max_new_tokens(b, hits=hits) == (free_before - 2) * 2
    kv.allocate(b, 1, hits)
    assert b.block_ids[:2] == hits and all(pool.ref_counts[i] == 1 for i in hits)
    assert not set(hits) & set(pool.cached_free)
    assert pool.num_free == free_before - 3
    pool.check_integrity(tables(b))

    kv.free(b)                              # now the most recently freed
    assert list(pool.cached_free) == [x_ids[1], x_ids[0], a_ids[1], a_ids[0]]
    pool.check_integrity([])


def test_touch_takes_a_reference_to_used_and_cached_free_blocks():
    kv = make_kv()
    a = prefill(kv, A + [9])
    a0, a1, a2 = a.block_ids
    pool = kv.pool
    pool.touch([a0])                                    # used: one more reference
    assert pool.ref_counts[a0] == 2
    kv.free(a)
    assert pool.ref_counts[a0] == 1 and list(pool.cached_free) == [a1]
    assert a2 in pool.free_ids                          # partial: nothing to cache
    pool.touch([a1])                                    # cached-free: revived
    assert pool.ref_counts[a1] == 1 and pool.num_cached_free == 0
    pool.check_integrity([[a0], [a1]])


# ---------------------------------------------------------------- collisions, register


def test_a_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(block_manager, "hash", lambda key: 42, raising=False)
    kv = make_kv()
    a = prefill(kv, A + [9])
    assert a.block_hashes == [42, 42]
    # block 0 is published under 42; block 1 collides with it and is not published
    assert kv.pool.hash_to_block == {42: a.block_ids[0]}
    assert kv.pool.block_hash[a.block_ids[1]] is None
    assert kv.match_prefix(make_seq(X + [9])) == []            # same hash, other tokens
    assert kv.match_prefix(make_seq(A + [9])) == a.block_ids[:1]  # block 1 collides: stop
    kv.pool.check_integrity(tables(a))


def test_register_is_first_writer_wins_and_lookup_compares_keys():
    pool = BlockPool(6)
    b1, b2 = pool.allocate(2)
    key = (None, (1, 2))
    pool.register(b1, 7, key)
    pool.register(b2, 7, key)                 # same hash: the first writer keeps it
    pool.register(b1, 8, (None, (3, 4)))      # a published block keeps its hash
    assert pool.hash_to_block == {7: b1}
    assert pool.block_hash[b2] is None and pool.block_key[b1] == key
    assert pool.lookup(7, key) == b1
    assert pool.lookup(7, (None, (1, 3))) is None
    assert pool.lookup(8, key) is None
    pool.free([b2, b1])
    assert list(pool.cached_free) == [b1] and b2 in pool.free_ids
    assert pool.lookup(7, key) == b1          # still findable while cached-free
    with pytest.raises(AssertionError):
        pool.register(b2, 9, (None, (5, 6)))  # only used blocks are published
    pool.check_integrity([])


def test_reset_prefix_cache_forgets_free_blocks_and_keeps_used_ones():
    kv = make_kv()
    a, x = prefill(kv, A + [9], "a"), prefill(kv, X + [9], "x")
    kv.free(a)
    pool = kv.pool
    assert pool.num_cached_free == 2
    free_before, evictions = pool.num_free, pool.num_evictions
    pool.reset_prefix_cache()
    assert pool.num_cached_free == 0 and pool.num_free == free_before
    assert pool.num_evictions == evictions
    assert kv.match_prefix(make_seq(A + [9])) == []
    assert kv.match_prefix(make_seq(X + [9])) == x.block_ids[:2]
    assert set(pool.hash_to_block.values()) == set(x.block_ids[:2])
    pool.check_integrity(tables(x))


def test_identical_prompts_admitted_together_both_compute_and_one_publishes():
    kv = make_kv(num_blocks=16)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq(A + [9], "a", max_tokens=1), make_seq(A + [9], "b", max_tokens=1)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a, b] and out.num_tokens == [9, 9]   # nothing cached yet
    assert not set(a.block_ids) & set(b.block_ids)
    sched.update(out, [])  # the engine's bookkeeping after the forward
    pool = kv.pool
    assert a.block_hashes == b.block_hashes
    assert [pool.hash_to_block[h] for h in a.block_hashes] == a.block_ids[:2]
    assert all(pool.block_hash[i] is None for i in b.block_ids)
    assert a.num_cached_blocks == b.num_cached_blocks == 2
    pool.check_integrity(tables(a, b))

    a_ids, b_ids = list(a.block_ids), list(b.block_ids)
    for seq in (a, b):
        seq.token_ids.append(0)
        sched.finish(seq, "length")
    assert list(pool.cached_free) == [a_ids[1], a_ids[0]]   # b's copies are plain free
    assert set(b_ids) | {a_ids[2]} <= set(pool.free_ids)
    assert pool.num_free == pool.num_usable and not any(pool.ref_counts)
    pool.check_integrity([])
    assert kv.match_prefix(make_seq(A + [9])) == a_ids[:2]


# ---------------------------------------------------------------- sliding window


@pytest.mark.parametrize("window, block_size", [(1, 1), (1, 4), (2, 1), (3, 2), (4, 4),
                                                (5, 2), (8, 4), (9, 4)])
def test_window_frees_exactly_the_blocks_out_of_every_future_querys_reach(window, block_size):
    kv = make_kv(num_blocks=64, block_size=block_size, window=window, prefix=False)
    seq = make_seq(range(1, 8))
    kv.allocate(seq, 7)
    compute(kv, seq)
    assert NULL_BLOCK not in seq.block_ids        # freed at the next allocation, not before
    bound = -(-(window - 1) // block_size) + 1
    evicted = 0
    for step in range(40):
        nc = seq.num_computed_tokens
        dead = [j for j in range(len(seq.block_ids))
                if (j + 1) * block_size - 1 <= nc - window]  # every position p <= nc - W
        newly = len(dead) - seq.num_evicted_blocks
        free_before = kv.pool.num_free
        assert kv.evict_out_of_window(seq) == newly
        assert kv.pool.num_free == free_before + newly
        assert kv.evict_out_of_window(seq) == 0
        evicted += newly
        assert [j for j, b in enumerate(seq.block_ids) if b == NULL_BLOCK] == dead
        assert seq.num_evicted_blocks == len(dead)
        decode(kv, seq, 100 + step)                # allocate evicts nothing more
        live = [b for b in seq.block_ids if b != NULL_BLOCK]
        assert len(live) <= bound, (step, seq.block_ids)
        assert kv.pool.num_used == len(live)
        kv.pool.check_integrity(tables(seq))
    assert evicted == len(seq.block_ids) - len(live) > 0
    kv.free(seq)
    assert kv.pool.num_free == kv.pool.num_usable


def test_window_blocks_are_freed_at_the_next_schedule():
    kv = make_kv(num_blocks=16, block_size=2, window=3, prefix=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seq = make_seq(range(1, 10))                   # 9 tokens: 5 blocks
    sched.add(seq)
    out = sched.schedule()
    assert out.num_tokens == [9] and NULL_BLOCK not in seq.block_ids
    seq.num_computed_tokens = 9
    seq.token_ids.append(0)
    assert kv.pool.num_used == 5
    out = sched.schedule()                         # queries from 9 on see positions >= 7
    assert out.num_tokens == [1]
    assert seq.block_ids[:3] == [NULL_BLOCK] * 3 and NULL_BLOCK not in seq.block_ids[3:]
    assert seq.num_evicted_blocks == 3 and kv.pool.num_used == 2
    kv.pool.check_integrity(tables(seq))


def test_window_prefix_hit_does_not_revive_dead_blocks():
    kv = make_kv(num_blocks=16, block_size=2, window=4)
    prompt = list(range(1, 14))                    # 13 tokens: 6 full blocks + 1
    a = prefill(kv, prompt)
    a_ids = list(a.block_ids)
    assert kv.evict_out_of_window(a) == 5          # (13 - 4 + 1) // 2: all but the last 2
    kv.free(a)
    pool = kv.pool
    assert set(pool.cached_free) == set(a_ids[:6]) and pool.num_free == pool.num_usable

    b = make_seq(prompt + [20])
    hits = kv.match_prefix(b)
    assert hits == a_ids[:6]
    dead = kv.num_dead_blocks(12)
    assert dead == (12 - 4 + 1) // 2 == 4
    assert kv.max_new_tokens(b, hits=hits) == (pool.num_usable - 2) * 2
    kv.allocate(b, 2, hits)
    assert b.block_ids[:6] == [NULL_BLOCK] * 4 + a_ids[4:6]
    assert b.num_computed_tokens == 12 and b.num_evicted_blocks == 4
    assert b.num_cached_blocks == 6 and len(b.block_ids) == 7
    assert all(pool.ref_counts[i] == 0 and i in pool.cached_free for i in a_ids[:4])
    assert all(pool.ref_counts[i] == 1 for i in a_ids[4:6])
    assert (kv.prefix_queries, kv.prefix_hits) == (13 + 14, 12)
    pool.check_integrity(tables(b))


def test_window_frees_dead_blocks_of_sequences_the_budget_does_not_reach():
    """Spec: a block out of every future query's reach is freed at the next schedule.  A
    running sequence the token budget does not reach this step keeps its dead blocks (here a
    forked child, starved by two older decodes, for as long as they run)."""
    kv = make_kv(num_blocks=20, block_size=1, window=2, prefix=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=2)
    params = SamplingParams(n=2, max_tokens=50)
    parent, child = (Sequence("a", i, [1, 2, 3], params) for i in range(2))
    child.status = SequenceStatus.PENDING
    parent.pending_children = [child]
    other = make_seq([7], "b", max_tokens=50)
    sched.add(parent)
    sched.add(other)
    for _ in range(5):
        out = sched.schedule()
        sampling = [seq for seq, n in zip(out.seqs, out.num_tokens)
                    if seq.num_computed_tokens + n == seq.num_tokens]
        for seq in sched.update(out, sampling)[0]:  # the parent forks its child here
            seq.token_ids.append(5)
        kv.pool.check_integrity(tables(parent, child, other))
    assert sched.running == [parent, other, child] and child.num_computed_tokens == 3
    dead = kv.num_dead_blocks(child.num_computed_tokens)
    out = sched.schedule()
    assert child not in out.seqs
    assert child.block_ids[:dead] == [NULL_BLOCK] * dead, child.block_ids


# ---------------------------------------------------------------- fork and copy-on-write


def forked(kv: KVCacheManager, prompt, n: int) -> list[Sequence]:
    parent = prefill(kv, prompt, "p")
    children = [make_seq(prompt, "p", i) for i in range(1, n)]
    for child in children:
        kv.fork(parent, child)
    return [parent, *children]


def test_fork_shares_every_block_by_reference():
    kv = make_kv()
    parent, child = forked(kv, A + [9, 10], 2)
    assert child.block_ids == parent.block_ids and child.block_ids is not parent.block_ids
    assert [kv.pool.ref_counts[i] for i in parent.block_ids] == [2, 2, 2]
    assert child.num_computed_tokens == 10 and child.num_cached_blocks == 2
    assert child.block_hashes == parent.block_hashes
    assert kv.pool.num_used == 3
    kv.pool.check_integrity(tables(parent, child))


def test_first_write_into_a_shared_partial_block_copies_it_and_the_last_holder_writes_in_place():
    kv = make_kv()
    parent, child = forked(kv, A + [9, 10], 2)
    p0, p1, p2 = parent.block_ids
    free_before = kv.pool.num_free
    parent.token_ids.append(11)
    child.token_ids.append(12)
    assert kv.blocks_needed(parent, 1) == 1 and kv.max_new_tokens(parent) == (free_before - 1) * 4 + 2
    kv.allocate(parent, 1)
    d = parent.block_ids[2]
    assert parent.block_ids == [p0, p1, d] and d not in (p0, p1, p2)
    assert kv.copies == [(p2, d)]
    assert [kv.pool.ref_counts[i] for i in (p0, p1, p2, d)] == [2, 2, 1, 1]
    assert kv.pool.num_free == free_before - 1
    assert kv.blocks_needed(child, 1) == 0
    kv.allocate(child, 1)                          # the last holder: in place, no copy
    assert child.block_ids == [p0, p1, p2] and kv.copies == [(p2, d)]
    assert kv.take_copies() == [(p2, d)] and kv.copies == []
    kv.pool.check_integrity(tables(parent, child))
    for seq in (parent, child):
        seq.num_computed_tokens = 11
        decode(kv, seq, 13)                        # fills block 2: no copy, nothing shared
    for seq in (parent, child):
        decode(kv, seq, 14)                        # block 3: fresh, full blocks never copied
    assert kv.copies == [] and parent.block_ids[:2] == child.block_ids[:2] == [p0, p1]
    assert kv.pool.ref_counts[p0] == kv.pool.ref_counts[p1] == 2
    kv.pool.check_integrity(tables(parent, child))
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_free == kv.pool.num_usable


def test_fork_at_a_block_boundary_never_copies():
    kv = make_kv()
    parent, child = forked(kv, A, 2)
    for seq, t in ((parent, 1), (child, 2)):
        decode(kv, seq, t)
    assert kv.copies == []
    assert parent.block_ids[:2] == child.block_ids[:2] and parent.block_ids[2] != child.block_ids[2]
    kv.pool.check_integrity(tables(parent, child))


def test_scheduler_reports_copies_for_n_equals_3_and_the_last_holder_writes_in_place():
    kv = make_kv(num_blocks=16)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(n=3, max_tokens=4)
    seqs = [Sequence("p", i, A + [9, 10], params) for i in range(3)]
    for child in seqs[1:]:
        child.status = SequenceStatus.PENDING
    seqs[0].pending_children = seqs[1:]
    sched.add(seqs[0])
    out = sched.schedule()
    assert out.seqs == seqs[:1] and out.copies == []
    seqs[0].num_computed_tokens = 10
    for child in seqs[0].pending_children:
        sched.fork(seqs[0], child)
    seqs[0].pending_children = []
    for i, seq in enumerate(seqs):
        seq.token_ids.append(20 + i)
    p0, p1, p2 = seqs[0].block_ids
    assert [kv.pool.ref_counts[i] for i in (p0, p1, p2)] == [3, 3, 3]

    out = sched.schedule()
    assert out.seqs == seqs and out.num_tokens == [1, 1, 1]
    d0, d1 = seqs[0].block_ids[2], seqs[1].block_ids[2]
    assert out.copies == [(p2, d0), (p2, d1)] and kv.copies == []
    assert seqs[2].block_ids == [p0, p1, p2]
    assert [kv.pool.ref_counts[i] for i in (p0, p1, p2, d0, d1)] == [3, 3, 1, 1, 1]
    kv.pool.check_integrity(tables(*seqs))
    for seq in seqs:
        seq.num_computed_tokens += 1
        seq.token_ids.append(30)
    assert sched.schedule().copies == []           # no block is shared and partial now


# ---------------------------------------------------------------- check_integrity


def test_integrity_catches_a_corrupted_hash_index():
    kv = make_kv()
    a = prefill(kv, A + [9])
    a0, a1, _ = a.block_ids
    pool = kv.pool
    pool.check_integrity(tables(a))
    h0, h1 = a.block_hashes
    for corrupt in (lambda: pool.hash_to_block.__setitem__(h0, a1),   # points at the wrong block
                    lambda: pool.hash_to_block.pop(h1),                # a hashed block not indexed
                    lambda: pool.block_hash.__setitem__(a0, None),     # index without a hash
                    lambda: pool.hash_to_block.__setitem__(12345, a0)):  # two hashes, one block
        saved = dict(pool.hash_to_block), list(pool.block_hash)
        corrupt()
        with pytest.raises(AssertionError):
            pool.check_integrity(tables(a))
        pool.hash_to_block, pool.block_hash = saved[0], saved[1]
        pool.check_integrity(tables(a))


def test_integrity_catches_a_block_both_cached_free_and_used():
    kv = make_kv()
    a, x = prefill(kv, A + [9], "a"), prefill(kv, X + [9], "x")
    kv.free(a)
    pool = kv.pool
    cached = next(iter(pool.cached_free))
    pool.ref_counts[cached] = 1                    # used but still in the cached-free list
    with pytest.raises(AssertionError):
        pool.check_integrity(tables(x) + [[cached]])
    pool.ref_counts[cached] = 0
    pool.check_integrity(tables(x))
    pool.cached_free[x.block_ids[0]] = None        # a used, published block listed as free
    with pytest.raises(AssertionError):
        pool.check_integrity(tables(x))
    del pool.cached_free[x.block_ids[0]]
    moved, _ = pool.cached_free.popitem()
    pool.free_ids.append(moved)                    # still hashed, but in the empty list
    with pytest.raises(AssertionError, match="free lists and hashes disagree"):
        pool.check_integrity(tables(x))
