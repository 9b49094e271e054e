"""Inter-token latency of streams that generate while a long prompt is prefilled.

    python bench/prefill_itl.py [--streams 16] [--long 8000] [--chunks 0 256] [--reps 1]

One engine (the `kvserve serve` defaults: dtype and quantization auto). Each trial starts
`--streams` short requests, lets them reach decode, then adds one prompt of `--long` tokens
and steps until that prompt's first token; every step's duration is an inter-token gap for
each stream that got a token in it. For each `--chunks` value (the engine's prefill_chunk;
0 = no limit, the old behaviour: the long prompt takes max_num_batched_tokens per step) it
prints the long prompt's time to first token and the short streams' ITL p50 / p99 / max
during the prefill, alternating the values in one run. The last line is the ratio of the
p99 ITL without a limit to the p99 with each limit (how much shorter the stalls are).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402


def trial(engine: LLMEngine, streams: int, long_len: int, chunk: int, tag: str,
          k: int) -> dict:
    engine.scheduler.prefill_chunk = chunk
    short = SamplingParams(max_tokens=100_000, ignore_eos=True, temperature=0)
    ids = [f"{tag}-s{i}" for i in range(streams)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [1 + (7 * i + j) % 1000 for j in range(20 + i)], short)
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    # a prompt of its own per trial (the prefix cache would answer a repeat at once)
    engine.add_request(f"{tag}-long", [100 + k] + [1 + (13 * j) % 5000 for j in range(long_len - 1)],
                       SamplingParams(max_tokens=1, ignore_eos=True))
    gaps, steps = [], 0
    t0 = time.perf_counter()
    while f"{tag}-long" in engine.requests:
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        steps += 1
        gaps += [dt] * sum(o.request_id in ids for o in outs)
    ttft = time.perf_counter() - t0
    for rid in ids:
        engine.abort_request(rid)
    gaps.sort()
    return {"ttft": ttft, "steps": steps, "p50": statistics.median(gaps),
            "p99": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "max": gaps[-1],
            "tokens": len(gaps) / streams}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--long", type=int, default=8000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 256])
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    engine = LLMEngine.from_args(model=args.model, quantization="auto",
                                 max_model_len=args.long + 64)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {engine.model_name}, {engine.config.dtype}, "
          f"quantization {engine.config.quantization}; {args.streams} streams + one "
          f"{args.long}-token prompt")
    results: dict[int, list[dict]] = {c: [] for c in args.chunks}
    k = 0
    for rep in range(args.reps):
        for c in args.chunks:
            results[c].append(trial(engine, args.streams, args.long, c, f"r{rep}c{c}", k))
            k += 1
    print(f"{'prefill_chunk':>13} {'TTFT s':>8} {'steps':>6} {'tok/stream':>10} "
          f"{'ITL p50 s':>10} {'p99 s':>8} {'max s':>8}")
    best = {}
    for c, rs in results.items():
        r = min(rs, key=lambda x: x["p99"])
        best[c] = r
        print(f"{c:>13} {r['ttft']:8.2f} {r['steps']:6d} {r['tokens']:10.1f} "
              f"{r['p50']:10.3f} {r['p99']:8.3f} {r['max']:8.3f}")
    if 0 in best:
        print("p99 ITL, no limit / limit: " + ", ".join(
            f"{c}: {best[0]['p99'] / best[c]['p99']:.1f}x" for c in best if c))


if __name__ == "__main__":
    main()
