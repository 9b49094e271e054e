"""BlockPool and KVCacheManager on the CPU: no model, no torch tensors."""
from __future__ import annotations

import pytest

from engine.block_manager import NULL_BLOCK, BlockPool, KVCacheManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_seq(num_prompt_tokens: int, name: str = "r") -> Sequence:
    return Sequence(name, 0, list(range(num_prompt_tokens)), SamplingParams(), arrival_time=0.0)


# ------------------------------------------------------------------ BlockPool


def test_pool_rejects_fewer_than_two_blocks():
    with pytest.raises(ValueError):
        BlockPool(1)


def test_pool_starts_with_everything_but_null_free():
    pool = BlockPool(5)
    assert pool.num_usable == 4
    assert pool.num_free == 4 and pool.num_used == 0
    assert NULL_BLOCK not in pool.free_ids
    pool.check_integrity([])


def test_allocate_sets_ref_counts_and_never_hands_out_null():
    pool = BlockPool(5)
    ids = pool.allocate(4)
    assert sorted(ids) == [1, 2, 3, 4]
    assert NULL_BLOCK not in ids
    assert all(pool.ref_counts[i] == 1 for i in ids)
    assert pool.ref_counts[NULL_BLOCK] == 0
    assert pool.num_free == 0 and pool.num_used == 4
    pool.check_integrity([ids])


def test_allocate_zero_is_a_no_op():
    pool = BlockPool(3)
    assert pool.allocate(0) == []
    assert pool.num_free == 2


def test_allocating_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    held = pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check_integrity([held])


def test_freed_blocks_are_reused():
    pool = BlockPool(3)
    a = pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 2
    b = pool.allocate(2)
    assert sorted(b) == sorted(a)
    pool.check_integrity([b])


def test_incref_keeps_block_until_last_holder_frees():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.incref(ids[:1])
    assert pool.ref_counts[ids[0]] == 2
    pool.check_integrity([ids, ids[:1]])  # two tables share the first block

    pool.free(ids)
    assert pool.ref_counts[ids[0]] == 1 and pool.ref_counts[ids[1]] == 0
    assert ids[0] not in pool.free_ids and ids[1] in pool.free_ids
    pool.check_integrity([ids[:1]])

    pool.free(ids[:1])
    assert pool.num_free == pool.num_usable
    pool.check_integrity([])


def test_incref_of_free_block_asserts_and_null_is_ignored():
    pool = BlockPool(3)
    with pytest.raises(AssertionError):
        pool.incref([1])
    pool.incref([NULL_BLOCK])  # forked tables carry null entries of evicted blocks
    assert pool.ref_counts[NULL_BLOCK] == 0


def test_double_free_asserts():
    pool = BlockPool(3)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(ids)
    assert pool.num_free == 2
    pool.check_integrity([])


def test_freeing_null_block_is_ignored():
    pool = BlockPool(3)
    ids = pool.allocate(1)
    pool.free([NULL_BLOCK, *ids, NULL_BLOCK])
    assert pool.num_free == 2
    assert NULL_BLOCK not in pool.free_ids
    pool.check_integrity([])


def test_integrity_ignores_null_padding_in_tables():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.check_integrity([[NULL_BLOCK, *ids, NULL_BLOCK]])


# ------------------------------------------------- check_integrity on corruption


@pytest.fixture
def busy_pool():
    pool = BlockPool(6)
    a, b = pool.allocate(2), pool.allocate(1)
    pool.check_integrity([a, b])
    return pool, a, b


def test_integrity_catches_used_block_in_free_list(busy_pool):
    pool, a, b = busy_pool
    pool.free_ids.append(a[0])
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_integrity_catches_used_block_swapped_into_free_list(busy_pool):
    pool, a, b = busy_pool
    pool.free_ids[0] = b[0]  # counts still add up; one block is both free and used
    assert pool.num_free + pool.num_used == pool.num_usable
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_integrity_catches_duplicate_free_entry(busy_pool):
    pool, _, _ = busy_pool
    pool.free_ids.append(pool.free_ids[0])
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_integrity_catches_leaked_block(busy_pool):
    pool, _, _ = busy_pool
    pool.free_ids.pop()  # neither free nor referenced any more
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_integrity_catches_null_block_in_free_list(busy_pool):
    pool, _, _ = busy_pool
    pool.free_ids.append(NULL_BLOCK)
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_integrity_catches_ref_counts_that_differ_from_tables(busy_pool):
    pool, a, b = busy_pool
    pool.check_integrity()          # counts alone are consistent
    with pytest.raises(AssertionError):
        pool.check_integrity([a])   # b's block has a reference but no holder
    pool.incref(b)
    with pytest.raises(AssertionError):
        pool.check_integrity([a, b])  # b's block counted twice, held once
    pool.check_integrity([a, b, b])


# ------------------------------------------------------------ KVCacheManager


@pytest.mark.parametrize("tokens, blocks", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_at_block_boundaries(tokens, blocks):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    assert kv.blocks_needed(make_seq(tokens), tokens) == blocks


def test_blocks_needed_counts_blocks_already_held():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = make_seq(12)
    kv.allocate(seq, 4)                          # tokens 0..3 -> 1 block
    seq.num_computed_tokens = 4
    assert len(seq.block_ids) == 1
    assert kv.blocks_needed(seq, 4) == 1         # 8 tokens -> 2 blocks, 1 held
    assert kv.blocks_needed(seq, 1) == 1         # 5 tokens -> 2 blocks
    assert kv.blocks_needed(seq, 0) == 0
    kv.allocate(seq, 4)
    seq.num_computed_tokens = 8
    assert len(seq.block_ids) == 2
    assert kv.blocks_needed(seq, 0) == 0         # never negative
    assert kv.blocks_needed(seq, 4) == 1         # 12 tokens -> 3 blocks


def test_max_new_tokens_with_and_without_admit_watermark():
    kv = KVCacheManager(num_blocks=21, block_size=4, watermark=0.1)  # 20 usable
    assert kv.watermark_blocks == 2
    filler = make_seq(64)
    kv.allocate(filler, 64)                      # 16 blocks -> 4 free
    assert kv.pool.num_free == 4
    seq = make_seq(16)
    assert 8 <= kv.max_new_tokens(seq, admit=True)   # 2 + 2 <= 4
    assert not 9 <= kv.max_new_tokens(seq, admit=True)  # 3 + 2 > 4
    assert 16 <= kv.max_new_tokens(seq)              # 4 <= 4 without the watermark
    assert not 17 <= kv.max_new_tokens(make_seq(17))  # 5 > 4


def test_usage_fraction_and_free_returns_everything():
    kv = KVCacheManager(num_blocks=9, block_size=4)  # 8 usable
    assert kv.usage == 0.0
    a, b = make_seq(8, "a"), make_seq(5, "b")
    kv.allocate(a, 8)
    kv.allocate(b, 5)
    assert (len(a.block_ids), len(b.block_ids)) == (2, 2)
    assert kv.usage == pytest.approx(4 / 8)
    kv.pool.check_integrity([a.block_ids, b.block_ids])

    kv.free(a)
    assert a.block_ids == [] and kv.usage == pytest.approx(2 / 8)
    kv.free(b)
    assert b.block_ids == [] and kv.usage == 0.0
    assert kv.pool.num_free == kv.pool.num_usable
    kv.pool.check_integrity([])


def test_allocate_beyond_pool_raises_and_keeps_table():
    kv = KVCacheManager(num_blocks=3, block_size=4)  # 2 usable
    seq = make_seq(12)
    assert not 12 <= kv.max_new_tokens(seq)
    with pytest.raises(RuntimeError):
        kv.allocate(seq, 12)
    assert seq.block_ids == [] and kv.pool.num_free == 2
