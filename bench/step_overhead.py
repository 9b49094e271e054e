"""The engine's per-step overhead outside the forward (schedule, update, sampler, outputs):
this checkout against another, alternating in one run, the ratio is what counts.

A refactor of the engine's bookkeeping should leave it where it was. The other checkout is
any git revision made into a worktree:

    git worktree add /tmp/base <rev>
    python bench/step_overhead.py --baseline /tmp/base [--streams 16] [--rounds 3]

Each round runs both checkouts in a subprocess (the same Python), `--streams` sampled
requests (temperature 0.8, top-p 0.9, seeds) of 96 tokens through LLMEngine.step(), the
runner's execute() timed apart; the first 8 steps are warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json, sys, time
sys.path.insert(0, ".")
from engine import LLM, SamplingParams
n = int(sys.argv[1])
eng = LLM(quantization="auto", max_num_seqs=n).engine
run, spent = eng.runner.execute, [0.0]
def timed(*a, **k):
    t = time.perf_counter(); r = run(*a, **k); spent[0] += time.perf_counter() - t; return r
eng.runner.execute = timed
for i in range(n):
    eng.add_request(str(i), f"Write a short story about topic number {i}.",
                    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=96, ignore_eos=True,
                                   seed=i))
for _ in range(8):
    eng.step()
spent[0], steps, t = 0.0, 0, time.perf_counter()
while eng.has_unfinished_requests():
    eng.step()
    steps += 1
total = time.perf_counter() - t
print(json.dumps({"overhead_ms": (total - spent[0]) / steps * 1e3,
                  "step_ms": total / steps * 1e3}))
'''


def run(checkout: str, streams: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(streams)], cwd=checkout,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="another checkout (a git worktree)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {"baseline": [], "this": []}
    for _ in range(args.rounds):
        for name, path in (("baseline", args.baseline), ("this", here)):
            results[name].append(run(path, args.streams))
    print(f"{'':10} {'overhead ms/step':>17} {'step ms':>8}   (median of {args.rounds})")
    med = {}
    for name, rows in results.items():
        med[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"{name:10} {med[name]['overhead_ms']:17.2f} {med[name]['step_ms']:8.1f}")
    ratio = med["this"]["overhead_ms"] / med["baseline"]["overhead_ms"]
    print(f"overhead ratio this / baseline: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
