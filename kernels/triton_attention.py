"""Triton kernels for paged causal attention over the block-table KV cache.

Same signatures and semantics as `kernels.reference` (the torch oracle):

* `paged_attention` - query i of sequence s sits at position p = seq_lens[s] - q_len_s + i and
  attends to keys j <= p (and j > p - W with a sliding window W).  Two kernels:
    - prefill (some sequence has several queries): flash-style tiles.  One program owns one
      tile of up to BLOCK_M query tokens of one sequence and one KV head; the G query heads of
      that KV head's group are packed into the tile rows (row r = token r // G, head r % G), so
      every K/V tile is loaded once per group.  The program -> (sequence, first token) map is
      built on the device with torch ops; the grid is an upper bound on the tile count, so no
      host sync is needed, and surplus programs do nothing.
    - decode (one query per sequence): split-K.  Grid (sequences, KV heads, splits), each
      program covering one slice of the live key range [window start, seq_len) for all G heads
      of its group and writing a partial output plus its log-sum-exp; a merge kernel combines
      the slices.  The grid depends only on shapes (CUDA-graph friendly); a slice with no keys
      writes lse = -inf and is ignored by the merge.
* `store_kv` - one program per new token; slots < 0 are skipped.

Quantized caches (kernels/kvquant.py; the cache dtype tells, constexpr KV_QUANT): int8 codes
with a fp16 scale per (slot, KV head), or fp8 e4m3fn / e5m2 codes with a fp32 scale per KV head.
Both attention kernels load the codes (and int8 row scales) and dequantize each K/V tile to
fp32 in registers, rounded to q's dtype for the dots, which is exactly what the oracle computes
on its gathered rows; `store_kv` quantizes in the kernel, bit for bit like the oracle.  fp8 goes
through the kernels as raw bytes and is decoded / encoded with integer ops (see `_fp8_to_f32`).

Keys outside the window are never loaded (loop bounds start at the tile that holds the first
live key, and loads are masked below it), so blocks freed by sliding-window eviction may hold
anything.  Softmax runs in fp32 in base 2 with scale * log2(e) folded into the scores; fp32
inputs use tf32x3 dots on the GPU.  On CPU run with TRITON_INTERPRET=1 (fp32/fp16 only: the
interpreter's bf16 tl.dot is wrong, triton-lang/triton#11584).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.kvquant import FORMAT_CODES

LOG2E = 1.4426950408889634

# KV_QUANT: how the caches hold K/V
KV_PLAIN = tl.constexpr(0)   # the model dtype
KV_INT8 = tl.constexpr(FORMAT_CODES[torch.int8])  # int8 codes, a fp16 scale per (slot, KV
                                                  # head) beside them
KV_E4M3 = tl.constexpr(FORMAT_CODES[torch.float8_e4m3fn])  # fp8 codes (passed as uint8), a
KV_E5M2 = tl.constexpr(FORMAT_CODES[torch.float8_e5m2])    # fp32 scale per KV head
_KV_QUANT = FORMAT_CODES


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _fp8_to_f32(code, KV_QUANT: tl.constexpr):
    """fp8 code bytes (uint8) -> fp32, exact for all 256 codes, NaN and inf included.  Integer
    ops and a fp16 bitcast rather than Triton's fp8 casts: the interpreter decodes e4m3 NaN as
    480 and e5m2 inf/NaN as finite, so a NaN-poisoned block would not show there; this runs
    the same under the interpreter and on any GPU.  e4m3 comes out 2^-8 times its value
    (callers fold the 2^8 into the head scale: a power of two, so the product is unchanged)."""
    b = code.to(tl.uint16)
    if KV_QUANT == KV_E4M3:
        # S.EEEE.MMM placed at fp16 bits 15 and 13..7 reads with exponent bias 15 instead of 7;
        # e4m3 subnormals land on fp16 subnormals, which no GPU flushes.  No inf: x.1111.111 is NaN.
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        x = h.to(tl.float16, bitcast=True).to(tl.float32)
        return tl.where((b & 0x7F) == 0x7F, float("nan"), x)
    else:
        # e5m2 is the upper byte of a fp16, inf and NaN included
        return (b << 8).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f32_to_fp8(y, KV_QUANT: tl.constexpr):
    """fp32 within the format's finite range (callers clamp) -> fp8 code bytes (uint8), rounded
    to nearest even like torch's .to(float8); NaN -> S.1111.111 like torch.  Integer ops: the
    interpreter's fp32 -> fp8 cast rounds ties away from even, so the codes would differ there."""
    bits = y.to(tl.uint32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    sign = (bits >> 24) & 0x80
    if KV_QUANT == KV_E4M3:
        # normals: round the 23 mantissa bits to 3 (ties to even; a carry rolls into the
        # exponent), then rebias the exponent from 127 to 7
        code = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
        # below 2^-6 the codes step by 2^-9, the ulp of 2^14: the fp32 add rounds |y| to a
        # multiple of it, and the bit patterns differ by the code (8 = 2^-6 when it rounds up)
        sub = (tl.abs(y) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
        code = tl.where(mag < 0x3C800000, sub, code)
    else:
        code = ((mag + 0xFFFFF + ((mag >> 21) & 1)) >> 21) - (112 << 2)
        sub = (tl.abs(y) + 128.0).to(tl.uint32, bitcast=True) - 0x43000000   # step 2^-16
        code = tl.where(mag < 0x38800000, sub, code)                           # below 2^-14
    code = tl.where(mag > 0x7F800000, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def _dequant_tiles(k_t, v, ks, vs, k_mul, v_mul, out_dtype, KV_QUANT: tl.constexpr):
    """Codes -> values in fp32, rounded to the model dtype: K^T [D, N] and V [N, D] with int8
    row scales ks / vs [N] (fp16) or fp8 head scales k_mul / v_mul (fp32, e4m3's x 2^8)."""
    if KV_QUANT == KV_INT8:
        k_t = k_t.to(tl.float32) * ks.to(tl.float32)[None, :]
        v = v.to(tl.float32) * vs.to(tl.float32)[:, None]
    else:
        k_t = _fp8_to_f32(k_t, KV_QUANT) * k_mul
        v = _fp8_to_f32(v, KV_QUANT) * v_mul
    return k_t.to(out_dtype), v.to(out_dtype)


@triton.jit
def _fp8_head_scale(scale_ptr, KV_QUANT: tl.constexpr):
    s = tl.load(scale_ptr)
    if KV_QUANT == KV_E4M3:
        s = s * 256.0          # _fp8_to_f32 reads e4m3 at 2^-8 of its value
    return s


@triton.jit
def _prefill_step(acc, m_i, l_i, q, qk_scale, window, pos, n0, lo, hi, kv_table_row,
                  k_base, v_base, stride_kb, stride_ko, stride_vb, stride_vo,
                  ks_base, vs_base, stride_ksb, stride_kso, stride_vsb, stride_vso, k_mul, v_mul,
                  d, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
                  PRECISION: tl.constexpr, KV_QUANT: tl.constexpr):
    """One KV tile [n0, n0 + BLOCK_N) of the online softmax.  MASKED=False is only used for
    tiles that every row may see in full (no causal, window or range mask needed).  Quantized
    caches: ks_base / vs_base point at this head's int8 row scales, k_mul / v_mul are the fp8
    head scales (see _dequant_tiles); unused ones are None."""
    j = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_ok = (j >= lo) & (j < hi)
        blk = tl.load(kv_table_row + j // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(kv_table_row + j // BLOCK_SIZE).to(tl.int64)
    off = (j % BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_base + blk[None, :] * stride_kb + off[None, :] * stride_ko + d[:, None]
    v_ptrs = v_base + blk[:, None] * stride_vb + off[:, None] * stride_vo + d[None, :]
    if MASKED:
        if HEAD_DIM == HEAD_DIM_PAD:
            k_t = tl.load(k_ptrs, mask=kv_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k_t = tl.load(k_ptrs, mask=kv_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == HEAD_DIM_PAD:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k_t = tl.load(k_ptrs, mask=d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=d[None, :] < HEAD_DIM, other=0.0)
    ks = None
    vs = None
    if KV_QUANT == KV_INT8:
        if MASKED:
            ks = tl.load(ks_base + blk * stride_ksb + off * stride_kso, mask=kv_ok, other=0.0)
            vs = tl.load(vs_base + blk * stride_vsb + off * stride_vso, mask=kv_ok, other=0.0)
        else:
            ks = tl.load(ks_base + blk * stride_ksb + off * stride_kso)
            vs = tl.load(vs_base + blk * stride_vsb + off * stride_vso)
    if KV_QUANT != KV_PLAIN:
        k_t, v = _dequant_tiles(k_t, v, ks, vs, k_mul, v_mul, q.dtype, KV_QUANT)

    s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale          # [ROWS, BLOCK_N], log2
    if MASKED:
        keep = (j[None, :] <= pos[:, None]) & kv_ok[None, :]
        if USE_WINDOW:
            keep = keep & (j[None, :] > pos[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_q_ptr,
                    seq_lens_ptr, tile_seq_ptr, tile_start_ptr, qk_scale, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
                    k_scale_ptr, v_scale_ptr, stride_ksb, stride_kso, stride_ksh,
                    stride_vsb, stride_vso, stride_vsh,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                    KV_QUANT: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    live = seq >= 0                       # the grid is an upper bound; surplus tiles idle
    seq = tl.maximum(seq, 0)
    tile_start = tl.load(tile_start_ptr + tile)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.where(live, tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin, 0)
    seq_len = tl.where(live, tl.load(seq_lens_ptr + seq), 0)
    n_tok = tl.where(live, tl.minimum(q_len - tile_start, BLOCK_M), 0)   # query tokens here
    first_pos = seq_len - q_len + tile_start                              # 0 for idle tiles
    hi = first_pos + n_tok                    # one past the causal limit of the last query

    rows = tl.arange(0, ROWS)
    m_idx = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = m_idx < n_tok
    pos = first_pos + m_idx
    tok = (q_begin + tile_start + m_idx).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_PAD)
    q_mask = row_ok[:, None]
    if HEAD_DIM != HEAD_DIM_PAD:
        q_mask = q_mask & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)

    # KV range: [lo, hi) holds every key some row of this tile can see.  Three loops:
    # masked tiles below the window start of the last row, unmasked tiles that every row sees
    # in full, masked tiles from the causal limit of the first row on.
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
        lo_all = tl.maximum(hi - window, 0)          # window start of the last query
    else:
        lo = first_pos * 0
        lo_all = lo
    end = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    a = (lo // BLOCK_N) * BLOCK_N
    b = tl.maximum(tl.minimum(tl.cdiv(lo_all, BLOCK_N) * BLOCK_N, end), a)
    c = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, b)
    c = tl.where(n_tok > 0, c, b)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    # this head's int8 row-scale bases or fp8 head scales (a jit function cannot return None)
    ks_base = k_scale_ptr
    vs_base = v_scale_ptr
    k_mul = None
    v_mul = None
    if KV_QUANT == KV_INT8:
        ks_base += kvh * stride_ksh
        vs_base += kvh * stride_vsh
    elif KV_QUANT != KV_PLAIN:
        k_mul = _fp8_head_scale(k_scale_ptr + kvh * stride_ksh, KV_QUANT)
        v_mul = _fp8_head_scale(v_scale_ptr + kvh * stride_vsh, KV_QUANT)
    for n0 in range(a, b, BLOCK_N):
        acc, m_i, l_i = _prefill_step(acc, m_i, l_i, q, qk_scale, window, pos, n0, lo, hi,
                                      table_row, k_base, v_base, stride_kb, stride_ko,
                                      stride_vb, stride_vo, ks_base, vs_base, stride_ksb,
                                      stride_kso, stride_vsb, stride_vso, k_mul, v_mul, d,
                                      BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, True,
                                      USE_WINDOW, PRECISION, KV_QUANT)
    for n0 in range(b, c, BLOCK_N):
        acc, m_i, l_i = _prefill_step(acc, m_i, l_i, q, qk_scale, window, pos, n0, lo, hi,
                                      table_row, k_base, v_base, stride_kb, stride_ko,
                                      stride_vb, stride_vo, ks_base, vs_base, stride_ksb,
                                      stride_kso, stride_vsb, stride_vso, k_mul, v_mul, d,
                                      BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, False,
                                      USE_WINDOW, PRECISION, KV_QUANT)
    for n0 in range(c, hi, BLOCK_N):
        acc, m_i, l_i = _prefill_step(acc, m_i, l_i, q, qk_scale, window, pos, n0, lo, hi,
                                      table_row, k_base, v_base, stride_kb, stride_ko,
                                      stride_vb, stride_vo, ks_base, vs_base, stride_ksb,
                                      stride_kso, stride_vsb, stride_vso, k_mul, v_mul, d,
                                      BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, True,
                                      USE_WINDOW, PRECISION, KV_QUANT)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr, qk_scale, window, num_splits,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
                   k_scale_ptr, v_scale_ptr, stride_ksb, stride_kso, stride_ksh,
                   stride_vsb, stride_vso, stride_vsh,
                   NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, DIRECT: tl.constexpr,
                   PRECISION: tl.constexpr, KV_QUANT: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(cu_seqlens_q_ptr + seq)
    has_q = tl.load(cu_seqlens_q_ptr + seq + 1) > row
    hi = tl.where(has_q, tl.load(seq_lens_ptr + seq), 0)   # the query sits at hi - 1
    if USE_WINDOW:
        lo = tl.maximum(hi - window, 0)
    else:
        lo = hi * 0
    # This split's slice of [lo, hi): equal runs of whole tiles, counted from the tile of lo.
    base = (lo // BLOCK_N) * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(hi - base, num_splits), BLOCK_N) * BLOCK_N
    s_lo = base + split * chunk
    s_hi = tl.minimum(s_lo + chunk, hi)

    g = tl.arange(0, GROUP_PAD)
    g_ok = g < tl.where(has_q, GROUP, 0)   # (vector & scalar-bool breaks the interpreter)
    head = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    # this head's int8 row-scale bases or fp8 head scales (a jit function cannot return None)
    ks_base = k_scale_ptr
    vs_base = v_scale_ptr
    k_mul = None
    v_mul = None
    if KV_QUANT == KV_INT8:
        ks_base += kvh * stride_ksh
        vs_base += kvh * stride_vsh
    elif KV_QUANT != KV_PLAIN:
        k_mul = _fp8_head_scale(k_scale_ptr + kvh * stride_ksh, KV_QUANT)
        v_mul = _fp8_head_scale(v_scale_ptr + kvh * stride_vsh, KV_QUANT)
    for n0 in range(s_lo, s_hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (j >= lo) & (j < s_hi)          # causal limit and window in one range
        blk = tl.load(table_row + j // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        off = (j % BLOCK_SIZE).to(tl.int64)
        k_t = tl.load(k_base + blk[None, :] * stride_kb + off[None, :] * stride_ko + d[:, None],
                      mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + blk[:, None] * stride_vb + off[:, None] * stride_vo + d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        if KV_QUANT != KV_PLAIN:
            ks = None
            vs = None
            if KV_QUANT == KV_INT8:
                ks = tl.load(ks_base + blk * stride_ksb + off * stride_kso, mask=kv_ok, other=0.0)
                vs = tl.load(vs_base + blk * stride_vsb + off * stride_vso, mask=kv_ok, other=0.0)
            k_t, v = _dequant_tiles(k_t, v, ks, vs, k_mul, v_mul, q.dtype, KV_QUANT)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        s = tl.where(kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DIRECT:
        tl.store(out_ptr + row.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # partials: out [S, Hq, splits, HEAD_DIM_PAD] fp32, lse [S, Hq, splits] fp32 (base 2)
        idx = (seq.to(tl.int64) * NUM_Q_HEADS + head) * num_splits + split
        # a split with no keys (past seq_len or before the window) only writes lse = -inf
        n_live = tl.where(has_q & (s_hi > s_lo), GROUP, 0)
        tl.store(part_out_ptr + idx[:, None] * HEAD_DIM_PAD + d[None, :], o,
                 mask=(g < n_live)[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(part_lse_ptr + idx, lse, mask=g < GROUP)


@triton.jit
def _merge_kernel(out_ptr, part_out_ptr, part_lse_ptr, cu_seqlens_q_ptr, num_splits,
                  stride_ot, stride_oh, NUM_Q_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(cu_seqlens_q_ptr + seq)
    has_q = tl.load(cu_seqlens_q_ptr + seq + 1) > row
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    idx = (seq.to(tl.int64) * NUM_Q_HEADS + head) * num_splits + sp
    lse = tl.load(part_lse_ptr + idx, mask=sp < num_splits, other=float("-inf"))
    used = lse != float("-inf")            # empty splits never wrote their partial output
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(used, tl.exp2(lse - m), 0.0)
    parts = tl.load(part_out_ptr + idx[:, None] * HEAD_DIM_PAD + d[None, :],
                    mask=used[:, None], other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row.to(tl.int64) * stride_ot + head * stride_oh + d,
             o.to(out_ptr.dtype.element_ty), mask=d < tl.where(has_q, HEAD_DIM, 0))


@triton.jit
def _quantize_rows(x, mask, head_ok, codes_ptrs, scale_ptrs, KV_QUANT: tl.constexpr):
    """Store x [HEADS_PAD, HEAD_DIM_PAD] (model dtype, one token's heads) as codes, the oracle's
    kvquant.quantize bit for bit.  int8: scale_ptrs [HEADS_PAD] receive the row scales; fp8:
    they hold the head scales.  Divisions are IEEE (div_rn): a plain '/' may lower to an
    approximate division on the GPU, and x * (1 / s) rounds differently."""
    x = x.to(tl.float32)
    if KV_QUANT == KV_INT8:
        amax = tl.max(tl.where(mask, tl.abs(x), 0.0), 1)
        scale = tl.math.div_rn(amax, 127.0).to(tl.float16)
        s = scale.to(tl.float32)
        # s == 0 only for rows with max|x| <= 127 * 2^-25, whose x / 1 rounds to code 0 anyway
        y = tl.math.div_rn(x, tl.where(s > 0.0, s, 1.0)[:, None])
        # clamping first gives the same integers and keeps |y| <= 127; adding 2^23 (ulp 1)
        # rounds |y| to an integer, ties to even, and the bit patterns differ by that integer
        a = tl.minimum(tl.abs(y), 127.0)
        n = (a + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
        tl.store(codes_ptrs, tl.where(y < 0.0, -n, n).to(tl.int8), mask=mask)
        tl.store(scale_ptrs, scale, mask=head_ok)
    else:
        head_scale = tl.load(scale_ptrs, mask=head_ok, other=1.0)
        y = tl.math.div_rn(x, head_scale[:, None])
        if KV_QUANT == KV_E4M3:
            y = tl.clamp(y, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        else:
            y = tl.clamp(y, -57344.0, 57344.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(codes_ptrs, _f32_to_fp8(y, KV_QUANT), mask=mask)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ckb, stride_cko, stride_ckh, stride_cvb, stride_cvo, stride_cvh,
                     k_scale_ptr, v_scale_ptr, stride_ksb, stride_kso, stride_ksh,
                     stride_vsb, stride_vso, stride_vsh,
                     NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     KV_QUANT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok = slot >= 0
    slot = tl.maximum(slot, 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = (h < tl.where(ok, NUM_HEADS, 0))[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    if KV_QUANT == KV_PLAIN:
        tl.store(k_cache_ptr + blk * stride_ckb + off * stride_cko + h[:, None] * stride_ckh
                 + d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + blk * stride_cvb + off * stride_cvo + h[:, None] * stride_cvh
                 + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        k_dst = (k_cache_ptr + blk * stride_ckb + off * stride_cko + h[:, None] * stride_ckh
                 + d[None, :])
        v_dst = (v_cache_ptr + blk * stride_cvb + off * stride_cvo + h[:, None] * stride_cvh
                 + d[None, :])
        head_ok = h < tl.where(ok, NUM_HEADS, 0)
        if KV_QUANT == KV_INT8:    # the row scales sit at the slot, like the codes
            k_sc = k_scale_ptr + blk * stride_ksb + off * stride_kso + h * stride_ksh
            v_sc = v_scale_ptr + blk * stride_vsb + off * stride_vso + h * stride_vsh
        else:                      # one scale per head, read
            k_sc = k_scale_ptr + h * stride_ksh
            v_sc = v_scale_ptr + h * stride_vsh
        _quantize_rows(k, mask, head_ok, k_dst, k_sc, KV_QUANT)
        _quantize_rows(v, mask, head_ok, v_dst, v_sc, KV_QUANT)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_NO_SCALES = dict(k_scale_ptr=None, v_scale_ptr=None, stride_ksb=None, stride_kso=None,
                  stride_ksh=None, stride_vsb=None, stride_vso=None, stride_vsh=None)


def _kv_format(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale):
    """(KV_QUANT, caches as the kernels take them, scale kernel arguments).  fp8 caches go in as
    uint8 views (decoded in the kernels, see _fp8_to_f32); the plain format passes None scale
    arguments, so its kernels compile as they did before quantized caches existed."""
    assert k_cache.dtype == v_cache.dtype, "K and V caches must share a dtype"
    kind = _KV_QUANT.get(k_cache.dtype, KV_PLAIN.value)
    if kind == KV_PLAIN.value:
        return kind, k_cache, v_cache, _NO_SCALES
    assert k_scale is not None and v_scale is not None, \
        f"a {k_cache.dtype} KV cache needs k_scale and v_scale"
    if kind == KV_INT8.value:
        for t in (k_scale, v_scale):     # [N, B, Hkv] fp16, the codes' paged layout
            assert t.dtype == torch.float16 and t.shape == k_cache.shape[:3], \
                "int8 KV scales: float16 [num_blocks, block_size, num_kv_heads]"
        return kind, k_cache, v_cache, dict(
            k_scale_ptr=k_scale, v_scale_ptr=v_scale, stride_ksb=k_scale.stride(0),
            stride_kso=k_scale.stride(1), stride_ksh=k_scale.stride(2),
            stride_vsb=v_scale.stride(0), stride_vso=v_scale.stride(1),
            stride_vsh=v_scale.stride(2))
    k_scale = k_scale.to(torch.float32)  # no copy when already fp32 (the pool's scales are)
    v_scale = v_scale.to(torch.float32)
    assert k_scale.shape == v_scale.shape == k_cache.shape[2:3], \
        "fp8 KV scales: one per KV head, [num_kv_heads]"
    return kind, k_cache.view(torch.uint8), v_cache.view(torch.uint8), dict(
        _NO_SCALES, k_scale_ptr=k_scale, v_scale_ptr=v_scale, stride_ksh=k_scale.stride(0),
        stride_vsh=v_scale.stride(0))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so CPU runs exercise the merge too


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 products per dot, close to fp32 accuracy but on the tensor cores
    # ("ieee" falls back to FMA and spills heavily at these tile sizes).  16-bit inputs use the
    # tensor cores natively and ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _prefill_config(num_tokens: int, group: int, head_dim_pad: int, dtype: torch.dtype):
    """(BLOCK_M tokens, ROWS = padded BLOCK_M * group, BLOCK_N, num_warps, num_stages).
    Sized for H100 (sm_90) without register spills (checked with ptxas for 16-bit inputs at
    head_dim 64/128/256 and fp32 at 64/128)."""
    if dtype == torch.float32:
        target, block_n, num_warps = (64, 32, 4) if head_dim_pad <= 64 else (32, 32, 8)
        num_stages = 2
    elif head_dim_pad <= 128:
        target, block_n, num_stages = 128, 64, 3
        num_warps = 8 if head_dim_pad == 128 else 4
    else:
        target, block_n, num_warps, num_stages = 64, 32, 8, 2
    # Few tokens in the whole batch: a smaller tile wastes fewer rows.
    target = min(target, max(16, _pow2(num_tokens * group)))
    block_m = max(1, target // group)          # non-power-of-two groups leave < group rows idle
    rows = max(16, _pow2(block_m * group))
    return block_m, rows, block_n, num_warps, num_stages


def _decode_num_splits(num_seqs: int, num_kv_heads: int, max_keys: int, block_n: int,
                       device: torch.device) -> int:
    """Splits per (sequence, KV head), from shapes only (fixed grid for a given batch shape):
    enough programs for ~2 waves of the SMs, but no split shorter than 2 KV tiles (by the
    widest context the block table can describe).  Rounded down to a power of two, so a
    server sees few distinct grids."""
    programs = num_seqs * num_kv_heads
    want = triton.cdiv(2 * _num_sms(device), programs)
    useful = max(1, max_keys // (2 * block_n))
    splits = max(1, min(want, useful, 64))
    return 1 << (splits.bit_length() - 1)


def decode_plan(num_seqs: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                table_keys: int, sliding_window: int | None, device: torch.device,
                kv_dtype: torch.dtype | None = None):
    """(KV tile, number of splits) of the decode kernel.  table_keys = block-table width x block
    size bounds every context in the batch; with a window only ~window keys are read.  kv_dtype:
    the caches' dtype when it is not the model dtype `dtype`."""
    head_dim_pad = max(16, _pow2(head_dim))
    block_n = 32 if dtype == torch.float32 else 64 if head_dim_pad >= 128 else 128
    if kv_dtype == torch.int8 and head_dim_pad >= 256:
        block_n = 32   # 64 fp32-dequantized rows plus their scales spill (ptxas, sm_90)
    max_keys = table_keys if sliding_window is None else min(table_keys, sliding_window + block_n)
    return block_n, _decode_num_splits(num_seqs, num_kv_heads, max_keys, block_n, device)


def _tile_map(cu_seqlens_q: torch.Tensor, num_tokens: int, block_m: int):
    """tile -> (sequence, first query token within it); -1 marks surplus tiles.  Torch ops on
    the tensors' device, no host sync: the tile count is bounded by shapes alone."""
    num_seqs = cu_seqlens_q.shape[0] - 1
    max_tiles = min(num_tokens, (num_tokens + num_seqs * (block_m - 1)) // block_m)
    cu = cu_seqlens_q.to(torch.int64)
    n = (cu[1:] - cu[:-1] + block_m - 1) // block_m                    # tiles per sequence
    ends = torch.cumsum(n, 0)
    t = torch.arange(max_tiles, device=cu.device)
    seq = torch.searchsorted(ends, t, right=True)                       # == num_seqs: surplus
    live = seq < num_seqs
    seq = seq.clamp(max=num_seqs - 1)
    start = (t - (ends[seq] - n[seq])) * block_m
    tile_seq = torch.where(live, seq, -1).to(torch.int32)
    tile_start = torch.where(live, start, 0).to(torch.int32)
    return tile_seq, tile_start, max_tiles


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    *, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; caches: [N, B, Hkv, D]; block_tables int32 [S, max_blocks];
    cu_seqlens_q int32 [S + 1]; seq_lens int32 [S] -> [T, Hq, D] (q's dtype; `out` if given).
    Quantized caches (int8, float8_e4m3fn, float8_e5m2) need their scales: int8 float16
    [N, B, Hkv], fp8 float32 [Hkv] (kernels/kvquant.py).

    The decode kernel is chosen when T == S, which assumes one query per sequence
    (cu_seqlens_q == arange(S + 1)); anything else goes through the prefill kernel."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert num_q_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert k_cache.shape == v_cache.shape and k_cache.shape[-1] == head_dim
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    q = _inner_contiguous(q)
    k_cache = _inner_contiguous(k_cache)
    v_cache = _inner_contiguous(v_cache)
    kv_quant, k_cache, v_cache, scale_args = _kv_format(k_cache, v_cache, k_scale, v_scale)
    block_tables = block_tables.to(torch.int32)
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    cu_seqlens_q = cu_seqlens_q.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()

    group = num_q_heads // num_kv_heads
    head_dim_pad = max(16, _pow2(head_dim))
    use_window = sliding_window is not None
    window = int(sliding_window) if use_window else 0
    if use_window:
        assert window >= 1, "sliding_window counts the query's own key, so it must be >= 1"
    qk_scale = float(scale) * LOG2E
    precision = _precision(q.dtype)
    strides = dict(stride_qt=q.stride(0), stride_qh=q.stride(1),
                   stride_ot=out.stride(0), stride_oh=out.stride(1),
                   stride_kb=k_cache.stride(0), stride_ko=k_cache.stride(1),
                   stride_kh=k_cache.stride(2), stride_vb=v_cache.stride(0),
                   stride_vo=v_cache.stride(1), stride_vh=v_cache.stride(2),
                   stride_bt=block_tables.stride(0), **scale_args)

    if num_tokens == num_seqs:
        _decode(q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, qk_scale,
                window, use_window, group, head_dim_pad, precision, strides, kv_quant)
        return out

    block_m, rows, block_n, num_warps, num_stages = _prefill_config(
        num_tokens, group, head_dim_pad, q.dtype)
    tile_seq, tile_start, max_tiles = _tile_map(cu_seqlens_q, num_tokens, block_m)
    _prefill_kernel[(max_tiles, num_kv_heads)](
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, out_ptr=out,
        block_tables_ptr=block_tables, cu_seqlens_q_ptr=cu_seqlens_q, seq_lens_ptr=seq_lens,
        tile_seq_ptr=tile_seq, tile_start_ptr=tile_start, qk_scale=qk_scale, window=window,
        **strides, GROUP=group, BLOCK_M=block_m, ROWS=rows, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        USE_WINDOW=use_window, PRECISION=precision, KV_QUANT=kv_quant, num_warps=num_warps,
        num_stages=num_stages)
    return out


def _alloc_partials(num_seqs: int, num_q_heads: int, num_splits: int, head_dim_pad: int,
                    device: torch.device):
    """Split-K scratch: partial outputs [S, Hq, splits, Dpad] and their base-2 lse [S, Hq, splits]
    (fp32).  Empty splits leave their partial output unwritten."""
    part_out = torch.empty(num_seqs, num_q_heads, num_splits, head_dim_pad,
                           dtype=torch.float32, device=device)
    part_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=device)
    return part_out, part_lse


def _decode(q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, qk_scale, window,
            use_window, group, head_dim_pad, precision, strides, kv_quant):
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    wide = q.dtype == torch.float32
    block_n, num_splits = decode_plan(num_seqs, num_kv_heads, head_dim, q.dtype,
                                      block_tables.shape[1] * block_size,
                                      window if use_window else None, q.device, k_cache.dtype)
    direct = num_splits == 1
    if direct:   # the kernel writes `out` itself; the partial buffers are never touched
        part_out = part_lse = out
    else:
        part_out, part_lse = _alloc_partials(num_seqs, num_q_heads, num_splits, head_dim_pad,
                                             q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, out_ptr=out, part_out_ptr=part_out,
        part_lse_ptr=part_lse, block_tables_ptr=block_tables, cu_seqlens_q_ptr=cu_seqlens_q,
        seq_lens_ptr=seq_lens, qk_scale=qk_scale, window=window, num_splits=num_splits,
        **strides, NUM_Q_HEADS=num_q_heads, GROUP=group, GROUP_PAD=max(16, _pow2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        USE_WINDOW=use_window, DIRECT=direct, PRECISION=precision, KV_QUANT=kv_quant,
        # int8 at 3 stages keeps the in-flight row scales in registers: ~250 of them at
        # head_dim 128, spills at 256 (ptxas, sm_90)
        num_warps=4, num_stages=2 if wide or kv_quant == KV_INT8.value else 3)
    if not direct:
        _merge_kernel[(num_seqs, num_q_heads)](
            out_ptr=out, part_out_ptr=part_out, part_lse_ptr=part_lse,
            cu_seqlens_q_ptr=cu_seqlens_q, num_splits=num_splits,
            stride_ot=strides["stride_ot"], stride_oh=strides["stride_oh"],
            NUM_Q_HEADS=num_q_heads, SPLITS_PAD=max(2, _pow2(num_splits)),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, num_warps=4 if head_dim_pad >= 128 else 2)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """k, v: [T, Hkv, D]; caches: [N, B, Hkv, D]; slot_mapping [T] (slot = block * B + offset).
    Writes row slot of the caches for every token; tokens with slot < 0 are skipped.  Quantized
    caches store codes (kernels/kvquant.py): int8 also writes the row scales into k_scale /
    v_scale [N, B, Hkv] at the slot, fp8 divides by the per-head k_scale / v_scale [Hkv]."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    k = _inner_contiguous(k)
    v = _inner_contiguous(v)
    slot_mapping = slot_mapping.contiguous()
    block_size = k_cache.shape[1]
    kv_quant, k_cache, v_cache, scale_args = _kv_format(k_cache, v_cache, k_scale, v_scale)
    _store_kv_kernel[(num_tokens,)](
        k_ptr=k, v_ptr=v, k_cache_ptr=k_cache, v_cache_ptr=v_cache, slot_ptr=slot_mapping,
        stride_kt=k.stride(0), stride_kh=k.stride(1), stride_vt=v.stride(0),
        stride_vh=v.stride(1), stride_ckb=k_cache.stride(0), stride_cko=k_cache.stride(1),
        stride_ckh=k_cache.stride(2), stride_cvb=v_cache.stride(0), stride_cvo=v_cache.stride(1),
        stride_cvh=v_cache.stride(2), NUM_HEADS=num_heads, HEADS_PAD=_pow2(num_heads),
        **scale_args, HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim), BLOCK_SIZE=block_size,
        KV_QUANT=kv_quant, num_warps=1 if num_heads * head_dim <= 1024 else 4)
