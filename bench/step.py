"""One engine step, timed: the fused CPU decode forward against the eager torch model.

    python bench/step.py [--dtypes float32 bfloat16] [--batches 1 16 64] [--context 64]
    python bench/step.py --long 8192          # also: 15 short streams beside one long one
    python bench/step.py --quantization int8  # the fused step reads int8 weights (W8A8)

For each dtype and batch size B it builds B sequences whose KV caches already hold
`--context` tokens (random K/V: timing does not depend on the values), then times, alternating
the two paths in one run (median of `--reps`):
- the model forward + logits of one decode step (B tokens), eager torch vs the fused forward;
- the runner's whole `execute` (batch preparation, forward, logits) on the default path.
With `--long L`, it also times a decode step of 15 short sequences plus one of L tokens
against the 15 short ones alone, and the attention of the long one alone, so the short
streams' extra cost can be compared with the long sequence's own attention cost.
The ratio column is eager / fused (how many times faster the fused step is).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402
from engine.sequence import Sequence  # noqa: E402
from kernels import cpu  # noqa: E402


def make_seqs(engine, lengths: list[int]) -> list[Sequence]:
    """Sequences whose first length-1 tokens are 'in the cache'; the next step decodes one."""
    seqs = []
    for i, n in enumerate(lengths):
        seq = Sequence(f"bench{i}", 0, [(7 * i + j) % 1000 + 1 for j in range(n)],
                       SamplingParams())
        engine.kv.allocate(seq, n)
        seq.num_computed_tokens = n - 1
        seqs.append(seq)
    return seqs


def timeit(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def step_fns(runner, seqs):
    input_ids, positions, meta, _ = runner.prepare(seqs, [1] * len(seqs))
    model = runner.model

    def eager():
        with torch.inference_mode():
            h = model(input_ids, positions, runner.kv_caches, meta)
            return model.compute_logits(h)

    def fused():
        with torch.inference_mode():
            h = runner.fast(model.embed_tokens(input_ids), positions, meta.slot_mapping,
                            meta.block_tables, meta.cu_seqlens_q, meta.seq_lens)
            return runner.fast.logits(h)

    def execute():
        return runner.execute(seqs, [1] * len(seqs))

    return eager, fused, execute


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=64, help="tokens already in each cache")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--long", type=int, default=0, help="length of the long sequence (0: skip)")
    ap.add_argument("--quantization", default=None, choices=[None, "int8", "gguf"],
                    help="int8 / gguf: the fused step (and execute) reads packed weights; eager keeps "
                         "the dtype's")
    args = ap.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, avx512_bf16 kernels: "
          f"{bool(cpu.available() and cpu.library().kvs_has_avx512_bf16())}; "
          f"{time.strftime('%Y-%m-%d')}")
    fused_w = args.quantization or "dtype"
    print(f"\n| dtype | batch | eager ms | fused ({fused_w}) ms | eager/fused | execute ms |")
    print("|---|---|---|---|---|---|")
    longest = max(args.context + 1, args.long + 1)
    for dtype in args.dtypes:
        # room for the widest batch, or for 15 short sequences and the long one
        blocks = (max(max(args.batches), 16) * (args.context + 2) + longest) // 16 + 64
        llm = LLM(dtype=dtype, device="cpu", num_kv_blocks=blocks, max_model_len=longest + 16,
                  enable_prefix_caching=False, quantization=args.quantization)
        engine, runner = llm.engine, llm.engine.runner
        for b in args.batches:
            seqs = make_seqs(engine, [args.context + 1] * b)
            eager, fused, execute = step_fns(runner, seqs)
            te, tf = [], []
            for _ in range(2):  # alternate, so a noisy spell hits both
                te.append(timeit(eager, args.reps))
                tf.append(timeit(fused, args.reps))
            tx = timeit(execute, args.reps)
            e, f = min(te), min(tf)
            print(f"| {dtype} | {b} | {e:.1f} | {f:.1f} | {e / f:.2f}x | {tx:.1f} |", flush=True)
            for s in seqs:
                engine.kv.free(s)
        if args.long:
            short = make_seqs(engine, [args.context + 1] * 15)
            long_seq = make_seqs(engine, [args.long])
            _, fused_short, _ = step_fns(runner, short)
            _, fused_mixed, _ = step_fns(runner, short + long_seq)
            ts = timeit(fused_short, args.reps)
            tm = timeit(fused_mixed, args.reps)
            # the long sequence's own attention: one query against its keys, every layer
            m = engine.config.model
            _, meta_in, meta, _ = runner.prepare(long_seq, [1])
            q = torch.randn(1, m.num_heads, m.head_dim, dtype=engine.config.dtype)
            kc, vc = runner.kv_caches[0][:2]
            ta = timeit(lambda: cpu.paged_attention(q, kc, vc, meta.block_tables,
                                                    meta.cu_seqlens_q, meta.seq_lens,
                                                    m.head_dim ** -0.5), args.reps) * m.num_layers
            print(f"\n{dtype}: 15 short ({args.context} tokens) {ts:.1f} ms; + one of {args.long} "
                  f"tokens {tm:.1f} ms (+{tm - ts:.1f} ms); that sequence's attention alone, "
                  f"{m.num_layers} layers: {ta:.1f} ms; one more short stream costs "
                  f"{(ts / 15):.1f} ms or less\n")
            for s in short + long_seq:
                engine.kv.free(s)
        del llm, engine, runner, seqs, eager, fused, execute
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
