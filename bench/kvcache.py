"""KV cache features on SmolLM2 (CPU): what prefix caching costs and what it saves.

1. Decode cost of hashing: a workload with no shared prefixes (nothing to hit) runs with
   prefix caching on and off, alternating on the same engine; prints the throughput ratio
   and the share of step time spent hashing/looking up blocks (measured directly).
2. Shared prefix: requests that share a long system prompt, caching on vs off; prints the
   speedup and the hit rate.

    python bench/kvcache.py [--rounds 3] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

# bench/kernels.py would shadow the `kernels` package: put the repository root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402
from engine.block_manager import KVCacheManager  # noqa: E402


class Timed:
    """Accumulates the wall time spent in a few KVCacheManager methods."""

    def __init__(self, names):
        self.total = 0.0
        for name in names:
            original = getattr(KVCacheManager, name)
            setattr(KVCacheManager, name, self._wrap(original))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
        return timed


def run(llm, prompts, params, caching: bool):
    engine = llm.engine
    engine.kv.enable_prefix_caching = caching
    engine.kv.pool.reset_prefix_cache()
    before = engine.stats
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    after = engine.stats
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    return elapsed, tokens, hits, queries, [o.outputs[0].token_ids for o in outs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, {args.dtype}")
    timer = Timed(["match_prefix", "cache_blocks"])
    llm = LLM(dtype=args.dtype, device="cpu", max_num_seqs=64)
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)

    # 1. nothing to hit: 32 distinct prompts, 64 decode steps each
    distinct = [f"Request {i}: write a long story about the number {i * 7919 % 1000}."
                for i in range(32)]
    on, off = [], []
    for _ in range(args.rounds):
        for caching, times in ((True, on), (False, off)):
            t_hash = timer.total
            elapsed, tokens, *_ = run(llm, distinct, greedy, caching)
            times.append((elapsed, tokens, timer.total - t_hash))
    rate_on = statistics.median(t / e for e, t, _ in on)
    rate_off = statistics.median(t / e for e, t, _ in off)
    hash_share = statistics.median(h / e for e, _, h in on)
    print("\n1. no shared prefix (32 prompts x 64 tokens), median of", args.rounds, "rounds")
    print(f"   caching off {rate_off:8.1f} tok/s")
    print(f"   caching on  {rate_on:8.1f} tok/s   ratio on/off = {rate_on / rate_off:.3f}")
    print(f"   time in match_prefix + cache_blocks: {100 * hash_share:.2f}% of the run")

    # 2. a shared ~500-token system prompt, 32 short questions
    system = " ".join(f"Rule {i}: answer politely, cite fact {i}, and keep it short."
                      for i in range(40))
    shared = tok.encode(system)[:500]
    questions = [shared + tok.encode(f" Question {i}: what is {i} plus {i}?") for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    res = {True: [], False: []}
    for _ in range(args.rounds):
        for caching in (True, False):
            res[caching].append(run(llm, questions, params, caching))
    t_on = statistics.median(r[0] for r in res[True])
    t_off = statistics.median(r[0] for r in res[False])
    _, _, hits, queries, toks_on = res[True][-1]
    toks_off = res[False][-1][4]
    print("\n2. shared 500-token prefix (32 requests x 16 tokens)")
    print(f"   caching off {t_off:6.2f} s   caching on {t_on:6.2f} s   speedup {t_off / t_on:.2f}x")
    print(f"   hit rate {hits}/{queries} tokens = {100 * hits / queries:.1f}%   "
          f"same tokens: {toks_on == toks_off}")


if __name__ == "__main__":
    main()
