"""Triton paged attention / store_kv against the torch oracle (kernels.reference).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below for
this module only), in fp32 and with small shapes.  With CUDA the same cases also run in
bf16/fp16.  Every case builds a shuffled block table, runs the oracle on a clean cache, then
poisons with NaN everything the kernel must not read (evicted blocks, slots past seq_len,
unused table entries, free blocks) and passes a NaN-filled output buffer.
"""
import contextlib
import os

import pytest
import torch


@contextlib.contextmanager
def interpreter_env():
    """TRITON_INTERPRET=1 (unless set already) without CUDA, restored on exit, so that other
    modules' tests never run with it. @triton.jit picks the interpreter when a kernel is
    defined: kernels.triton_attention is imported inside this; the tests run inside it too
    (a module fixture), for Triton and for the engine, which reads it when built."""
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


with interpreter_env():
    pytest.importorskip("triton")
    from kernels import triton_attention as ta  # noqa: E402
from kernels.reference import paged_attention_ref  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    with interpreter_env():
        yield


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter multiplies bfloat16 dot operands as raw bits (triton-lang/triton#11584),
# so 16-bit inputs are only checked on a GPU (and fp16 once on CPU, see below).
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (group size = Hq / Hkv, Hkv, head_dim, block_size): every group size, both head dims and
# both block sizes appear, without the full cross product (the interpreter is slow).
LAYOUTS = [(1, 2, 64, 16), (3, 1, 128, 32), (4, 2, 64, 32), (8, 1, 128, 16)]
LAYOUT_IDS = [f"g{g}-hkv{h}-d{d}-bs{b}" for g, h, d, b in LAYOUTS]


def make_case(seed, q_lens, seq_lens, group, num_kv_heads, head_dim, block_size,
              window=None, dtype=torch.float32, spare_blocks=5):
    """Random q and caches, shuffled block tables one column wider than needed."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(nblocks) + spare_blocks + 1
    perm = torch.randperm(num_blocks, generator=gen)
    poison_block = int(perm[-1])          # never owned by a sequence
    width = max(nblocks) + 1
    # unused entries point at random (finite) blocks until `poison` redirects them
    tables = torch.randint(0, num_blocks - 1, (len(seq_lens), width), generator=gen)
    tables = perm[tables]
    used = 0
    for s, n in enumerate(nblocks):
        tables[s, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), group * num_kv_heads, head_dim, generator=gen).to(dtype)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables.to(torch.int32),
                cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                scale=head_dim ** -0.5, sliding_window=window), poison_block


def poison(case, poison_block):
    """NaN into everything no query may read; table entries of blocks wholly before the window
    of a sequence's first query, and entries past its last block, point at a NaN block."""
    case = dict(case)
    k, v, tables = case["k_cache"].clone(), case["v_cache"].clone(), case["block_tables"].clone()
    bs = k.shape[1]
    live = torch.zeros(k.shape[0], bs, dtype=torch.bool)
    cu, lens = case["cu_seqlens_q"].tolist(), case["seq_lens"].tolist()
    window = case["sliding_window"]
    for s, seq_len in enumerate(lens):
        first_pos = seq_len - (cu[s + 1] - cu[s])
        lo = 0 if window is None else max(first_pos - window + 1, 0)
        for b in range(tables.shape[1]):
            keys = range(b * bs, min((b + 1) * bs, seq_len))
            if len(keys) == 0 or keys[-1] < lo:
                tables[s, b] = poison_block
            else:
                for j in keys:
                    live[tables[s, b], j % bs] = True
    k[~live] = float("nan")
    v[~live] = float("nan")
    case.update(k_cache=k, v_cache=v, block_tables=tables)
    return case


def to_device(case):
    return {n: t.to(DEVICE) if torch.is_tensor(t) else t for n, t in case.items()}


def check(seed, q_lens, seq_lens, layout, window=None, dtype=torch.float32):
    group, hkv, head_dim, block_size = layout
    clean, poison_block = make_case(seed, q_lens, seq_lens, group, hkv, head_dim, block_size,
                                    window, dtype)
    ref = paged_attention_ref(**to_device({**clean, "q": clean["q"].float(),
                                           "k_cache": clean["k_cache"].float(),
                                           "v_cache": clean["v_cache"].float()}))
    dirty = to_device(poison(clean, poison_block))
    out = torch.full_like(dirty["q"], float("nan"))
    res = ta.paged_attention(**dirty, out=out)
    assert res is out and res.dtype == dtype
    assert torch.isfinite(res).all(), "NaN/inf: a row was not written or a dead key was read"
    err = (res.float() - ref).abs().max().item()
    assert err < ATOL[dtype], f"max |err| {err:.3g}"
    if window is not None and dtype == torch.float32:
        # the oracle itself must ignore evicted (NaN) blocks too
        ref_dirty = paged_attention_ref(**dirty)
        assert torch.isfinite(ref_dirty).all()
        assert (ref_dirty - ref).abs().max().item() < 1e-5
    return res


@pytest.fixture(autouse=True)
def nan_scratch(monkeypatch):
    """Split-K scratch buffers start as NaN, so an unwritten partial that the merge reads shows."""
    alloc = ta._alloc_partials

    def poisoned(*args, **kwargs):
        return tuple(t.fill_(float("nan")) for t in alloc(*args, **kwargs))
    monkeypatch.setattr(ta, "_alloc_partials", poisoned)


@pytest.fixture
def num_splits(monkeypatch):
    """Force the decode split count (None keeps the heuristic)."""
    def force(n):
        if n is not None:
            monkeypatch.setattr(ta, "_decode_num_splits", lambda *a, **k: n)
    return force


# ----------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_prefill_many_lengths(layout, dtype):
    """Fresh prompts of lengths 1..70 packed in one call (tiles straddle sequence ends)."""
    lens = [1, 9, 16, 33, 70, 2, 48]
    check(1, lens, lens, layout, dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_chunked_prefill_long_prefix(layout):
    """A few new queries on long cached prefixes, mixed with a fresh prompt and decodes."""
    check(2, [5, 3, 1, 20, 1], [300, 131, 77, 20, 9], layout)


def test_single_long_prompt():
    """Many query tiles of one sequence: exercises the unmasked interior loop."""
    check(3, [200], [200], (3, 1, 64, 16))


@pytest.mark.parametrize("window", [1, 5, 16, 24, 100, 200])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_prefill_sliding_window(layout, window):
    """Windows below/at/above the block size; evicted blocks are NaN and must not be read."""
    check(4, [40, 6, 1, 70, 3], [40, 250, 180, 70, 150], layout, window=window)


# ----------------------------------------------------------------------------- decode

@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_decode(layout, dtype, splits, num_splits):
    """One query per sequence, lengths 1..333; more splits than some sequences have tiles."""
    num_splits(splits)
    lens = [1, 5, 16, 17, 100, 333, 64]
    check(5, [1] * len(lens), lens, layout, dtype=dtype)


@pytest.mark.parametrize("splits", [None, 1, 4])
@pytest.mark.parametrize("window", [1, 7, 16, 40, 200])
def test_decode_sliding_window(window, splits, num_splits):
    num_splits(splits)
    lens = [1, 7, 30, 129, 300, 45]
    check(6, [1] * len(lens), lens, (4, 2, 64, 16), window=window)
    check(7, [1] * len(lens), lens, (3, 1, 128, 32), window=window)


def test_decode_split_heuristic():
    dev = torch.device(DEVICE)
    lone = ta._decode_num_splits(1, 1, 4096, 64, dev)
    assert lone > 1 and lone & (lone - 1) == 0                    # several, a power of two
    assert ta._decode_num_splits(512, 8, 4096, 64, dev) == 1      # the batch fills the GPU
    assert ta._decode_num_splits(1, 1, 64, 64, dev) == 1          # nothing to split
    _, windowed = ta.decode_plan(1, 1, 128, torch.bfloat16, 1 << 16, 128, dev)
    _, full = ta.decode_plan(1, 1, 128, torch.bfloat16, 1 << 16, None, dev)
    assert windowed <= full


def test_decode_batch_of_one_long_sequence():
    check(8, [1], [700], (8, 1, 64, 32))


# ----------------------------------------------------------------------------- odd shapes

@pytest.mark.parametrize("head_dim", [8, 32, 96])
def test_small_and_odd_head_dims(head_dim):
    """Head dims the tiny test models use (8, 32) and a non-power-of-two one (padded to >=16)."""
    layout = (4, 2, head_dim, 8)     # block size 8, as in the engine's chunked-prefill tests
    check(9, [1] * 3, [3, 40, 17], layout)
    check(10, [9, 1, 30], [9, 40, 30], layout, window=8)


def test_fp16_under_interpreter():
    """16-bit path (p cast to the value dtype) on the CPU too; bf16 dot is unsupported there."""
    check(11, [5, 17, 1], [5, 60, 33], (3, 1, 64, 16), window=20, dtype=torch.float16)
    check(12, [1, 1], [5, 90], (3, 1, 64, 16), dtype=torch.float16)


def test_empty_and_tiny_batches():
    case, _ = make_case(13, [1], [1], 2, 1, 64, 16)
    out = ta.paged_attention(**to_device(case))
    ref = paged_attention_ref(**to_device(case))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    empty = to_device(case)
    empty["q"] = empty["q"][:0]
    empty["cu_seqlens_q"] = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    empty["seq_lens"] = empty["seq_lens"][:0]
    empty["block_tables"] = empty["block_tables"][:0]
    assert ta.paged_attention(**empty).shape == (0, 2, 64)


def test_tile_map():
    cu = torch.tensor([0, 5, 5, 6, 40, 41], dtype=torch.int32, device=DEVICE)
    block_m = 7
    tile_seq, tile_start, max_tiles = ta._tile_map(cu, 41, block_m)
    expect = [(s, st) for s in range(5) for st in range(0, int(cu[s + 1] - cu[s]), block_m)]
    got = [(int(a), int(b)) for a, b in zip(tile_seq, tile_start) if a >= 0]
    assert got == expect
    assert max_tiles >= len(expect) and (tile_seq[len(expect):] == -1).all()


# ----------------------------------------------------------------------------- store_kv

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 128, 32)])
def test_store_kv_writes_exactly_the_slots(num_kv_heads, head_dim, block_size, dtype):
    gen = torch.Generator().manual_seed(14)
    num_blocks, T = 6, 20
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[[3, 11]] = -1                                   # skipped tokens
    k = torch.randn(T, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(T, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype)
    v_cache = torch.full_like(k_cache, -7.0)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    kc, vc = dev(k_cache), dev(v_cache)
    ta.store_kv(dev(k), dev(v), kc, vc, dev(slots))
    keep = slots >= 0
    exp_k = k_cache.view(-1, num_kv_heads, head_dim).clone()
    exp_v = v_cache.view(-1, num_kv_heads, head_dim).clone()
    exp_k[slots[keep]] = k[keep]
    exp_v[slots[keep]] = v[keep]
    assert torch.equal(kc.cpu().view(-1, num_kv_heads, head_dim), exp_k)
    assert torch.equal(vc.cpu().view(-1, num_kv_heads, head_dim), exp_v)


def test_store_kv_into_layer_view_of_shared_cache():
    """The engine hands each layer a view into one [layers, 2, N, B, H, D] allocation."""
    cache = torch.zeros(2, 2, 4, 16, 2, 64, device=DEVICE)
    k = torch.randn(5, 2, 64, device=DEVICE)
    v = torch.randn(5, 2, 64, device=DEVICE)
    slots = torch.tensor([0, 17, 63, -5, 40], device=DEVICE)
    ta.store_kv(k, v, cache[1, 0], cache[1, 1], slots)
    flat = cache.view(2, 2, -1, 2, 64)
    keep = slots >= 0
    assert torch.equal(flat[1, 0, slots[keep]], k[keep])
    assert torch.equal(flat[1, 1, slots[keep]], v[keep])
    assert flat[0].abs().sum() == 0
    rest = torch.ones(64, dtype=torch.bool, device=DEVICE)
    rest[slots[keep]] = False
    assert flat[1, :, rest].abs().sum() == 0
