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
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
    from kernels import triton_attention as ta  # noqa: E402

    @triton.jit
    def _decode_fp8_bytes(codes_ptr, out_ptr, KV_QUANT: tl.constexpr):
        i = tl.arange(0, 256)
        tl.store(out_ptr + i, ta._fp8_to_f32(tl.load(codes_ptr + i), KV_QUANT))
from kernels import kvquant  # noqa: E402
from kernels.reference import paged_attention_ref, store_kv_ref  # noqa: E402


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
    k, v = case["k_cache"].clone(), case["v_cache"].clone()
    tables, live = readable_slots(case, poison_block)
    k[~live] = float("nan")
    v[~live] = float("nan")
    case.update(k_cache=k, v_cache=v, block_tables=tables)
    return case


def readable_slots(case, poison_block):
    """(block tables redirected as `poison` describes, bool [N, B] of the slots a query may read)"""
    tables = case["block_tables"].clone()
    bs = case["k_cache"].shape[1]
    live = torch.zeros(case["k_cache"].shape[0], bs, dtype=torch.bool)
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
    return tables, live


def to_device(case):
    return {n: t.to(DEVICE) if torch.is_tensor(t) else t for n, t in case.items()}


def check(seed, q_lens, seq_lens, layout, window=None, dtype=torch.float32):
    group, hkv, head_dim, block_size = layout
    clean, poison_block = make_case(seed, q_lens, seq_lens, group, hkv, head_dim, block_size,
                                    window, dtype)
    ref = paged_attention_ref(**to_device({**clean, "q": clean["q"].float(),
                                           "k_cache": clean["k_cache"].float(),
                                           "v_cache": clean["v_cache"].float()}))
    return run_poisoned(to_device(poison(clean, poison_block)), ref, window, dtype)


def run_poisoned(dirty, ref, window, dtype):
    """The kernel on a NaN-poisoned case against the oracle's output on the clean one; with a
    window, the oracle itself must ignore the evicted (NaN) blocks too."""
    out = torch.full_like(dirty["q"], float("nan"))
    res = ta.paged_attention(**dirty, out=out)
    assert res is out and res.dtype == dtype
    assert torch.isfinite(res).all(), "NaN/inf: a row was not written or a dead key was read"
    err = (res.float() - ref).abs().max().item()
    assert err < ATOL[dtype], f"max |err| {err:.3g}"
    if window is not None and dtype == torch.float32:
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


# ----------------------------------------------------------------------------- quantized KV cache

QUANT = ["int8", "fp8_e4m3", "fp8_e5m2"]


def quantize_case(case, kind, seed):
    """The case's caches as `kind` codes plus scales, by the oracle's kvquant.quantize.  fp8 head
    scales are random (not 1), so a kernel that ignored them would fail."""
    storage = kvquant.STORAGE[kind]
    gen = torch.Generator().manual_seed(seed)
    case = dict(case)
    for name in ("k", "v"):
        x = case[f"{name}_cache"]
        head_scale = None if storage == torch.int8 else torch.rand(x.shape[2], generator=gen) + 0.5
        codes, row_scale = kvquant.quantize(x, storage, head_scale)
        case[f"{name}_cache"] = codes
        case[f"{name}_scale"] = row_scale if storage == torch.int8 else head_scale
    return case


def poison_quantized(case, poison_block):
    """`poison` for codes: int8 codes cannot be NaN, so the scales of the dead slots are (and the
    codes extreme); dead fp8 codes are the byte 0x7f, NaN in e4m3fn and in e5m2."""
    case = dict(case)
    tables, live = readable_slots(case, poison_block)
    case["block_tables"] = tables
    for name in ("k", "v"):
        codes = case[f"{name}_cache"].clone()
        if codes.dtype == torch.int8:
            codes[~live] = 127
            scale = case[f"{name}_scale"].clone()
            scale[~live] = float("nan")
            case[f"{name}_scale"] = scale
        else:
            codes.view(torch.uint8)[~live] = 0x7F
        case[f"{name}_cache"] = codes
    return case


def check_quantized(kind, seed, q_lens, seq_lens, layout, window=None, dtype=torch.float32):
    """Kernel on NaN-poisoned quantized caches vs the fp32 oracle on the clean ones.  Returns
    (kernel output as fp32, the clean unquantized case)."""
    group, hkv, head_dim, block_size = layout
    clean, poison_block = make_case(seed, q_lens, seq_lens, group, hkv, head_dim, block_size,
                                    window, dtype)
    quant = quantize_case(clean, kind, seed)
    ref = paged_attention_ref(**to_device({**quant, "q": quant["q"].float()}))
    res = run_poisoned(to_device(poison_quantized(quant, poison_block)), ref, window, dtype)
    return res.float(), clean


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", QUANT)
def test_quantized_prefill(kind, dtype):
    """Fresh prompts of several lengths, then chunks on cached prefixes mixed with a decode and a
    fresh prompt; GQA in both."""
    check_quantized(kind, 20, [1, 9, 33, 70], [1, 9, 33, 70], (4, 2, 64, 16), dtype=dtype)
    check_quantized(kind, 21, [5, 3, 1, 20], [150, 77, 40, 20], (3, 1, 128, 32), dtype=dtype)


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", QUANT)
def test_quantized_decode(kind, dtype, splits, num_splits):
    num_splits(splits)
    lens = [1, 5, 17, 100, 200]
    check_quantized(kind, 22, [1] * len(lens), lens, (8, 1, 64, 16), dtype=dtype)


@pytest.mark.parametrize("window", [5, 40])
@pytest.mark.parametrize("kind", QUANT)
def test_quantized_sliding_window(kind, window, num_splits):
    """Evicted blocks hold NaN scales (int8) or NaN codes (fp8): neither kernel may read them."""
    num_splits(4)
    check_quantized(kind, 23, [40, 6, 1, 3], [40, 150, 120, 90], (4, 2, 64, 16), window=window)
    check_quantized(kind, 24, [1] * 4, [7, 45, 129, 200], (3, 1, 128, 32), window=window)


@pytest.mark.parametrize("kind,bound", [("int8", 0.05), ("fp8_e4m3", 0.25), ("fp8_e5m2", 0.5)])
def test_quantized_cache_is_what_is_read(kind, bound):
    """The output follows the codes, not some unquantized copy: it misses the unquantized result
    by far more than the fp32 tolerance, and by no more than the format's error."""
    res, clean = check_quantized(kind, 25, [30, 1], [64, 90], (2, 2, 64, 16))
    plain = paged_attention_ref(**to_device(clean))
    err = (res - plain).abs().max().item()
    assert 10 * ATOL[torch.float32] < err < bound, f"max |quantized - unquantized| {err:.3g}"


def test_quantized_fp16_model_under_interpreter():
    """A 16-bit model: dequantized tiles are rounded to q's dtype for the dots, out is fp16."""
    for kind in QUANT:
        check_quantized(kind, 26, [5, 17, 1], [5, 60, 33], (3, 1, 64, 16), window=20,
                        dtype=torch.float16)
        check_quantized(kind, 27, [1, 1], [5, 90], (3, 1, 64, 16), dtype=torch.float16)


def test_fp8_decode_every_code():
    """All 256 bytes, NaN, inf, zeros and subnormals included, as torch reads them."""
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    for storage, kind, unit in ((torch.float8_e4m3fn, ta.KV_E4M3, 256.0),
                                (torch.float8_e5m2, ta.KV_E5M2, 1.0)):
        out = torch.empty(256, device=DEVICE)
        _decode_fp8_bytes[(1,)](codes, out, kind.value)
        expect = codes.view(storage).float()
        torch.testing.assert_close(out * unit, expect, rtol=0, atol=0, equal_nan=True)
        signed = ~expect.isnan()     # -0.0 too (assert_close equates it with 0.0)
        assert torch.equal(torch.signbit(out[signed]), torch.signbit(expect[signed]))


def _store_both(kind, k, v, slots, scales_fill, head_scale=None, layers=2, num_blocks=5,
                block_size=16, seed=0):
    """store_kv into layer 1 of a shared [layers, 2, N, B, H, D] pool (random bytes) and its
    scales, store_kv_ref into a copy; returns both (pool bytes, scales) pairs."""
    gen = torch.Generator().manual_seed(seed)
    hkv, head_dim = k.shape[1:]
    storage = kvquant.STORAGE[kind]
    pool = torch.randint(0, 256, (layers, 2, num_blocks, block_size, hkv, head_dim),
                         generator=gen, dtype=torch.uint8)
    scales = kvquant.new_scales(kind, layers, num_blocks, block_size, hkv, "cpu")
    if storage == torch.int8:
        scales.copy_(torch.randn(scales.shape, generator=gen) * scales_fill)
    else:
        scales[:] = head_scale
    ref_pool, ref_scales = pool.clone(), scales.clone()
    keep = slots >= 0
    store_kv_ref(k[keep], v[keep], ref_pool[1, 0].view(storage), ref_pool[1, 1].view(storage),
                 slots[keep], ref_scales[1, 0], ref_scales[1, 1])
    pool, scales = pool.to(DEVICE), scales.to(DEVICE)
    ta.store_kv(k.to(DEVICE), v.to(DEVICE), pool[1, 0].view(storage), pool[1, 1].view(storage),
                slots.to(DEVICE), scales[1, 0], scales[1, 1])
    return (pool.cpu(), scales.cpu()), (ref_pool, ref_scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", QUANT)
def test_store_kv_quantized(kind, dtype):
    """Codes and int8 row scales bit for bit as store_kv_ref's, from each model dtype; skipped
    tokens, other slots and the other layer untouched.  fp8 head scales down to 2e-4 saturate."""
    gen = torch.Generator().manual_seed(28)
    T, hkv, head_dim = 24, 3, 64
    slots = torch.randperm(5 * 16, generator=gen)[:T]
    slots[[2, 9]] = -1
    k = (torch.randn(T, hkv, head_dim, generator=gen) * 4).to(dtype)
    v = (torch.randn(T, hkv, head_dim, generator=gen) * torch.rand(T, hkv, 1, generator=gen))
    v = v.to(dtype)
    k[0, 1] = 0.0                     # an all-zero row: scale 0, codes 0
    v[1, 2] = torch.randn(head_dim, generator=gen) * 1e-6   # not zero, yet its scale is 0
    (pool, scales), (ref_pool, ref_scales) = _store_both(
        kind, k, v, slots, 0.1, torch.tensor([0.37, 1.9, 2e-4]), seed=29)
    assert torch.equal(pool, ref_pool)
    assert torch.equal(scales, ref_scales)


@pytest.mark.parametrize("kind", QUANT)
def test_store_kv_rounds_ties_to_even(kind):
    """Values on and beside every rounding boundary, for scales s of 1 and not a power of two,
    so that x / s lands on or within an ulp of a tie (x * (1 / s) in place of the division
    rounds some of them the other way).  int8: rows whose max is 127 s (fp16 s: the row scale
    is exactly s) holding every (k + 1/2) s and its fp32 neighbours.  fp8 (head scales s): s
    times the midpoints between neighbouring codes, subnormals and the largest finite ones
    included, times every code, times values past the largest finite one, and their
    neighbours."""
    storage = kvquant.STORAGE[kind]
    scales_used = (1.0, 3.0, 1.7529296875)

    def with_neighbours(on):
        return torch.cat([on, torch.nextafter(on, torch.tensor(-1e9)),
                          torch.nextafter(on, torch.tensor(1e9))])

    if storage == torch.int8:
        halves = torch.arange(-127, 127, dtype=torch.float32) + 0.5
        blocks = []
        for scale in scales_used:
            vals = with_neighbours(halves * scale)
            rows = torch.cat([vals, torch.zeros(-vals.numel() % 126)]).view(-1, 63)
            blocks.append(torch.cat([torch.full((rows.shape[0], 1), 127 * scale), rows], 1))
        x = torch.cat(blocks).view(-1, 2, 64)                                  # [T, H, D]
        head_scale = None
    else:
        grid = torch.arange(256, dtype=torch.uint8).view(storage).float()
        grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()              # sorted, 0 first
        mids = (grid[1:] + grid[:-1]) / 2
        big = grid[-1] + (grid[-1] - grid[-2]) * torch.tensor([0.25, 0.5, 0.75, 1.0, 1e3])
        head_scale = torch.tensor(scales_used[:2])
        heads = []
        for scale in head_scale.tolist():
            vals = with_neighbours(torch.cat([mids, grid, big]) * scale)
            vals = torch.cat([vals, torch.tensor([float("inf")])])
            vals = torch.cat([vals, -vals])
            heads.append(torch.cat([vals, torch.zeros(-vals.numel() % 64)]).view(-1, 64))
        x = torch.stack(heads, 1)                                              # [T, H, D]
    slots = torch.arange(x.shape[0])
    (pool, scales), (ref_pool, ref_scales) = _store_both(
        kind, x, -x, slots, 1.0, head_scale, num_blocks=-(-x.shape[0] // 16))
    assert torch.equal(pool, ref_pool)
    assert torch.equal(scales, ref_scales)
    if storage == torch.int8:      # the rows really have those scales
        written = scales[1, 0].view(-1)[:x.shape[0] * 2].float()
        assert set(written.unique().tolist()) == set(scales_used)
