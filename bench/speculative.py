"""Speculative decoding's worth: tokens/s with n-gram (prompt lookup) speculation against
plain decoding, the same engine settings, alternating rounds in one run.

    python bench/speculative.py [--rounds 3] [--k 8] [--quick]

Workloads (default weights, `quantization="auto"` as `kvserve serve` runs them):
  grounded  one stream, outputs that quote their input: a code edit (rename a function), a
            docstring added to the same code, a paragraph copied; greedy, up to 256 tokens.
            Target (issue 17): >= 1.6x.
  free      one stream, free-form writing (a story, an explanation) sampled at temperature
            0.8, top-p 0.95, seeded: the drafts are mostly wrong. Target: >= 0.97x.
  batch16   16 streams of the free-form prompts at once, the same sampling. Target: >= 0.97x.
Each figure is output tokens over wall time, prompt processing included (each request alone
for the one-stream workloads). Seeded outputs are the same with and without speculation,
so both sides generate the same tokens; the script checks it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# bench/kernels.py would shadow the `kernels` package: put the repository root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, x in enumerate(values):
        total += x
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
PARAGRAPH = ("The committee met on Tuesday to review the annual budget. After a long discussion, "
             "the members agreed to increase funding for the library, reduce spending on "
             "travel, and postpone the decision about the new parking lot until the spring "
             "meeting. The chair thanked everyone for their patience and asked the treasurer to "
             "circulate the revised figures by the end of the month.")
GROUNDED = [
    "Rename the function moving_average to rolling_mean in this code. Reply with the full "
    "code only.\n\n" + CODE,
    "Add a docstring to this function. Reply with the full code.\n\n" + CODE,
    "Copy the following text exactly:\n\n" + PARAGRAPH,
]
FREE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "Describe your ideal weekend in a small mountain town.",
    "Write a letter to a friend you have not seen in years.",
]


def run(llm, prompts, params) -> tuple[float, list[list[int]]]:
    """Wall time and output tokens of the prompts submitted together."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]


def workload(llm, name: str, chat) -> tuple[float, int, list]:
    """(seconds, tokens, outputs) of one workload on one engine."""
    from engine import SamplingParams
    if name == "grounded":
        params = SamplingParams(temperature=0, max_tokens=256)
        groups = [[chat(p)] for p in GROUNDED]
    elif name == "free":
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=200)
        groups = [[chat(p)] for p in FREE[:2]]
    else:
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=128)
        groups = [[chat(FREE[i % len(FREE)] + f" ({i})") for i in range(16)]]
    seconds, tokens, outs = 0.0, 0, []
    for prompts in groups:
        dt, out = run(llm, prompts, params)
        seconds += dt
        tokens += sum(map(len, out))
        outs += out
    return seconds, tokens, outs


TARGETS = {"grounded": 1.6, "free": 0.97, "batch16": 0.97}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--quick", action="store_true", help="1 round (a smoke run)")
    args = ap.parse_args()
    from engine import LLM
    spec_cfg = {"method": "ngram", "num_speculative_tokens": args.k}
    plain = LLM(quantization="auto")
    spec = LLM(quantization="auto", speculative_config=spec_cfg)
    tok = plain.get_tokenizer()

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], True)

    rounds = 1 if args.quick else args.rounds
    for llm in (plain, spec):  # warm-up: kernels built, caches touched
        workload(llm, "free", chat)
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name in TARGETS:
            outs = {}
            for side, llm in (("plain", plain), ("spec", spec)):
                s0 = dict(llm.engine.stats)
                seconds, tokens, outs[side] = workload(llm, name, chat)
                rates.setdefault((name, side), []).append(tokens / seconds)
                if side == "spec":
                    s1 = llm.engine.stats
                    d = {k: s1[k] - s0[k] for k in ("spec_decode_num_draft_tokens",
                                                    "spec_decode_num_accepted_tokens")}
                    rates.setdefault((name, "drafted"), []).append(
                        d["spec_decode_num_draft_tokens"])
                    rates.setdefault((name, "accepted"), []).append(
                        d["spec_decode_num_accepted_tokens"])
            if outs["plain"] != outs["spec"]:
                print(f"warning: {name}: outputs differ with speculation")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"ngram, k={args.k}, adaptive; median of {rounds} alternating rounds")
    print(f"{'workload':10} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>7} {'target':>7} "
          f"{'drafted':>8} {'accepted':>9}")
    ok = True
    for name, target in TARGETS.items():
        p = statistics.median(rates[(name, "plain")])
        s = statistics.median(rates[(name, "spec")])
        drafted, accepted = sum(rates[(name, "drafted")]), sum(rates[(name, "accepted")])
        ok &= s / p >= target
        print(f"{name:10} {p:12.1f} {s:11.1f} {s / p:7.2f} {target:7.2f} {drafted:8d} "
              f"{accepted:9d}")
    per_pos = spec.engine.stats["spec_decode_num_accepted_tokens_per_pos"]
    drafts = spec.engine.stats["spec_decode_num_drafts"]
    print("acceptance by draft position (accepted / drafts with >= 1 token): "
          + ", ".join(f"{i + 1}: {n / max(drafts, 1):.2f}" for i, n in enumerate(per_pos)))
    print("all targets met" if ok else "some target missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
