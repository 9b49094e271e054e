"""Microbenchmark of the Triton paged-attention kernels (GPU only; prints "no CUDA" otherwise).

1. correctness of prefill / chunked prefill / decode (with and without a window) in bf16 against
   the torch oracle (kernels.reference, fp32);
2. prefill TFLOP/s, causal, head_dim 64 and 128, 1k..16k tokens (one sequence or four), next to
   torch SDPA (is_causal, flash backend) on the same shapes with contiguous K/V;
3. decode bandwidth: bytes of K/V the kernel has to read / time, as a fraction of the
   device-to-device copy bandwidth measured in the same run (clone of a 1 GiB tensor, counted
   as read + write), batch x context 1x1k..256x4k, with and without a 1k window.

    python bench/kernels.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK_SIZE = 16
DTYPE = torch.bfloat16


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50)


def paged_inputs(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, gen, shuffle=True):
    """Random q and caches, each sequence's blocks scattered over the pool."""
    nblocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    total = sum(nblocks)
    ids = torch.randperm(total, device="cuda", generator=gen) if shuffle else \
        torch.arange(total, device="cuda")
    width = max(nblocks)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device="cuda")
    start = 0
    for s, n in enumerate(nblocks):
        tables[s, :n] = ids[start:start + n].to(torch.int32)
        start += n
    shape = (total, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, device="cuda", dtype=DTYPE, generator=gen)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(torch.tensor(q_lens, device="cuda"), 0)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, cu, seq


def check_correctness(gen) -> bool:
    from kernels.reference import paged_attention_ref
    from kernels.triton_attention import paged_attention
    cases = [  # (name, q_lens, seq_lens, Hq, Hkv, D, window)
        ("prefill mixed", [1, 17, 100, 300], [1, 17, 100, 300], 9, 3, 64, None),
        ("chunked prefill", [7, 64, 1], [900, 64, 500], 32, 8, 128, None),
        ("prefill window", [7, 200, 33], [900, 200, 400], 32, 8, 128, 96),
        ("decode", [1] * 6, [1, 15, 16, 300, 2000, 4100], 32, 8, 128, None),
        ("decode window", [1] * 6, [1, 15, 16, 300, 2000, 4100], 12, 4, 64, 1000),
        ("decode 1 seq", [1], [8192], 32, 4, 128, None),
    ]
    ok = True
    for name, q_lens, seq_lens, hq, hkv, d, window in cases:
        q, kc, vc, bt, cu, sl = paged_inputs(q_lens, seq_lens, hq, hkv, d, gen)
        out = paged_attention(q, kc, vc, bt, cu, sl, d ** -0.5, window)
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), bt, cu, sl, d ** -0.5, window)
        err = (out.float() - ref).abs().max().item()
        good = err < 2e-2 and bool(torch.isfinite(out).all())
        ok &= good
        print(f"  {name:16s} max|err| {err:.2e}  {'ok' if good else 'FAIL'}")
    return ok


def prefill_table(gen):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.triton_attention import paged_attention
    print("\nprefill (causal, bf16, block size 16, Hq/Hkv = 32/8)")
    print(f"  {'D':>4} {'seqs x len':>12} | {'triton ms':>9} {'TFLOP/s':>8} | "
          f"{'sdpa ms':>8} {'TFLOP/s':>8} | {'ratio':>5}")
    hq, hkv = 32, 8
    for d in (64, 128):
        for total in (1024, 4096, 16384):
            for nseq in (1, 4):
                length = total // nseq
                q, kc, vc, bt, cu, sl = paged_inputs([length] * nseq, [length] * nseq, hq, hkv,
                                                     d, gen)
                flops = nseq * 4 * hq * d * length * (length + 1) / 2   # causal, QK^T + PV
                scale = d ** -0.5
                t_tri = bench_ms(lambda: paged_attention(q, kc, vc, bt, cu, sl, scale))
                # the same tokens as dense [B, H, L, D] tensors, K/V expanded to all heads
                qd = q.view(nseq, length, hq, d).transpose(1, 2).contiguous()
                kd = torch.randn(nseq, hq, length, d, device="cuda", dtype=DTYPE, generator=gen)
                vd = torch.randn_like(kd)
                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(
                            qd, kd, vd, is_causal=True, scale=scale))
                except RuntimeError as exc:  # flash backend unavailable
                    print(f"  sdpa flash failed: {exc}")
                    t_sdpa = float("nan")
                tf_tri = flops / t_tri * 1e-9
                tf_sdpa = flops / t_sdpa * 1e-9
                print(f"  {d:>4} {f'{nseq} x {length}':>12} | {t_tri:9.3f} {tf_tri:8.1f} | "
                      f"{t_sdpa:8.3f} {tf_sdpa:8.1f} | {tf_tri / tf_sdpa:5.2f}")
                del q, kc, vc, qd, kd, vd


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    ms = bench_ms(lambda: x.clone())
    del x
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9   # read + write, GB/s


def decode_table(gen, copy_gbs):
    from kernels import triton_attention as ta
    print(f"\ndecode (bf16, block size 16, Hq/Hkv = 32/8, D = 128); device copy {copy_gbs:.0f} GB/s"
          " (clone of 1 GiB, read + write)")
    print(f"  {'batch x ctx':>12} {'window':>6} {'splits':>6} | {'us':>8} {'GB/s':>7} "
          f"{'of copy':>7}")
    hq, hkv, d = 32, 8, 128
    for batch, ctx in ((1, 1024), (1, 4096), (16, 1024), (16, 4096), (64, 2048), (256, 1024),
                       (256, 4096)):
        q, kc, vc, bt, cu, sl = paged_inputs([1] * batch, [ctx] * batch, hq, hkv, d, gen)
        for window in (None, 1024):
            keys = min(ctx, window or ctx)
            nbytes = batch * keys * hkv * d * kc.element_size() * 2   # K and V
            _, splits = ta.decode_plan(batch, hkv, d, q.dtype, bt.shape[1] * BLOCK_SIZE,
                                       window, q.device)
            ms = bench_ms(lambda: ta.paged_attention(q, kc, vc, bt, cu, sl, d ** -0.5, window))
            gbs = nbytes / (ms * 1e-3) / 1e9
            print(f"  {f'{batch} x {ctx}':>12} {str(window):>6} {splits:>6} | {ms * 1e3:8.1f} "
                  f"{gbs:7.0f} {gbs / copy_gbs:7.0%}")
        del q, kc, vc


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA")
        return 0
    import triton
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("correctness vs kernels.reference (bf16 kernel, fp32 oracle, atol 2e-2)")
    if not check_correctness(gen):
        print("correctness check FAILED")
        return 1
    prefill_table(gen)
    decode_table(gen, copy_bandwidth())
    return 0


if __name__ == "__main__":
    sys.exit(main())
