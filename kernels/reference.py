"""Plain-torch paged attention: the oracle for the Triton kernels and the CPU backend.

Semantics, the same in every backend: query i of sequence s sits at position
p = seq_lens[s] - q_len_s + i and attends to keys j with j <= p and, with a window W,
j > p - W.  Keys are read through the block table; positions outside [p - W, p] are masked
*and* zeroed, so a block freed by sliding-window eviction (whose table entry may point
anywhere) can never leak into the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import kvquant


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    # k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T];
    # quantized caches (kernels/kvquant.py): int8 scales [num_blocks, block_size, Hkv] are
    # written beside the codes, fp8 head scales [Hkv] are read
    num_kv_heads, head_dim = k_cache.shape[-2:]
    slots = slot_mapping.long()
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if not kvquant.is_quantized(cache):
            cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, x.to(cache.dtype))
            continue
        codes, row_scale = kvquant.quantize(x, cache.dtype, scale)
        kvquant.as_bytes(cache).view(-1, num_kv_heads, head_dim).index_copy_(
            0, slots, kvquant.as_bytes(codes))
        if row_scale is not None:
            scale.view(-1, num_kv_heads).index_copy_(0, slots, row_scale)


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int,
               scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    # cache: [N, B, Hkv, D]; block_table: [..., nb] -> [..., length, Hkv, D] of dtype
    # (a quantized cache's rows dequantized: only the gathered ones)
    block_size = cache.shape[1]
    nb = (length + block_size - 1) // block_size
    table = block_table[..., :nb].long()
    blocks = kvquant.as_bytes(cache).index_select(0, table.reshape(-1)).view(cache.dtype)
    blocks = blocks.view(*table.shape, *cache.shape[1:])
    rows = blocks.flatten(-4, -3)[..., :length, :, :]  # [..., length, Hkv, D]
    if not kvquant.is_quantized(cache):
        return rows
    if cache.dtype == torch.int8:
        scale = scale.index_select(0, table.reshape(-1)).view(*table.shape, *scale.shape[1:])
        scale = scale.flatten(-3, -2)[..., :length, :]  # [..., length, Hkv]
    return kvquant.dequantize(rows, scale, dtype)


def _key_mask(q_pos: torch.Tensor, length: int, seq_len: torch.Tensor,
              sliding_window: int | None) -> torch.Tensor:
    # q_pos: [..., Q]; seq_len broadcastable to [..., 1] -> bool [..., Q, length]
    j = torch.arange(length, device=q_pos.device)
    mask = (j <= q_pos[..., None]) & (j < seq_len[..., None, None])
    if sliding_window is not None:
        mask &= j > q_pos[..., None] - sliding_window
    return mask


def _dequantize_rows(codes, cache_scale, rows, dtype):
    # codes [S, Hkv, L, D] gathered at flat (slot, head) rows [S, Hkv, L] -> values of dtype
    if cache_scale is None:
        return codes
    s = cache_scale.view(-1).index_select(0, rows.view(-1)).view(rows.shape) \
        if codes.dtype == torch.int8 else cache_scale[:, None]  # fp8: [Hkv, 1] per head
    return kvquant.dequantize(codes, s, dtype)


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
            k_scale=None, v_scale=None):
    # q: [S, Hq, D], one query per sequence at position seq_len - 1
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    length = int(seq_lens.max())
    # One gather straight into [S, Hkv, L, D] (row of (slot, head) in the flat cache), so
    # the two matmuls below read K and V without another copy.
    j = torch.arange(length, device=q.device)
    blocks = block_tables[:, j // block_size].long()                     # [S, L]
    rows = (blocks * block_size + j % block_size)[:, None, :] * num_kv_heads \
        + torch.arange(num_kv_heads, device=q.device)[None, :, None]     # [S, Hkv, L]
    # index_select is ~8x faster than advanced indexing for row gathers on CPU
    k, v = (kvquant.as_bytes(c).view(-1, head_dim).index_select(0, rows.view(-1))
            .view(c.dtype).view(*rows.shape, head_dim) for c in (k_cache, v_cache))
    k = _dequantize_rows(k, k_scale, rows, q.dtype)
    v = _dequantize_rows(v, v_scale, rows, q.dtype)
    q_pos = (seq_lens.long() - 1)[:, None]
    mask = _key_mask(q_pos, length, seq_lens.long(), sliding_window)[:, 0]  # [S, L]
    if sliding_window is not None:  # evicted blocks may hold anything, NaN included
        k = torch.where(mask[:, None, :, None], k, 0)
        v = torch.where(mask[:, None, :, None], v, 0)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale      # [S, Hkv, G, L]
    scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)                                         # [S, Hkv, G, D]
    return out.reshape(num_seqs, num_q_heads, head_dim)


def _prefill_one(q, k_cache, v_cache, block_table, seq_len, scale, sliding_window,
                 k_scale=None, v_scale=None):
    # q: [Q, Hq, D] for one sequence whose KV length is seq_len
    q_len = q.shape[0]
    k = _gather_kv(k_cache, block_table, seq_len, k_scale, q.dtype)  # [L, Hkv, D]
    v = _gather_kv(v_cache, block_table, seq_len, v_scale, q.dtype)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    mask = _key_mask(q_pos, seq_len, torch.tensor(seq_len, device=q.device), sliding_window)
    if sliding_window is not None:  # keys evicted from the window may be garbage
        live = mask.any(0)
        k = torch.where(live[:, None, None], k, 0)
        v = torch.where(live[:, None, None], v, 0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=True)  # [1, Hq, Q, D]
    return out[0].transpose(0, 1)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float,
                        sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    # q: [T, Hq, D]; caches: [N, B, Hkv, D]; block_tables: [S, max_blocks];
    # cu_seqlens_q: [S + 1]; seq_lens: [S]  ->  [T, Hq, D]; quantized caches with their
    # scales (kernels/kvquant.py)
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    single = q_lens == 1
    if bool(single.all()):  # pure decode batch
        return _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                       k_scale, v_scale)
    if bool(single.any()):  # the decodes of a mixed batch still go as one batch
        idx = single.nonzero()[:, 0]
        rows = cu_seqlens_q[idx].long()
        out[rows] = _decode(q[rows], k_cache, v_cache, block_tables[idx], seq_lens[idx],
                            scale, sliding_window, k_scale, v_scale)
    # Prefill sequences have very different lengths; padding them into one tensor costs
    # O(S * Qmax * Lmax) memory, so each is one SDPA call over its own keys.
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for s in (~single & (q_lens > 0)).nonzero()[:, 0].tolist():
        out[cu[s]:cu[s + 1]] = _prefill_one(q[cu[s]:cu[s + 1]], k_cache, v_cache,
                                            block_tables[s], lens[s], scale, sliding_window,
                                            k_scale, v_scale)
    return out
