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
for the one-stream workloads); the decode ratio counts only the time after the first tokens. Seeded outputs are the same with and without speculation,
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


def run(llm, prompts, params) -> tuple[float, float, list[list[int]]]:
    """The prompts submitted together, stepped to the end: (wall time, the part of it before
    every request had its first token, output tokens)."""
    engine = llm.engine
    t0 = time.perf_counter()
    first = None
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
        if first is None and len(outs) == len(prompts) \
                and all(o.outputs[0].token_ids for o in outs.values()):
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return total, first, [list(outs[f"b{i}"].outputs[0].token_ids) for i in range(len(prompts))]


def workload(llm, name: str, chat) -> tuple[float, float, int, list]:
    """(seconds, seconds after the first tokens, tokens, outputs) of one workload."""
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
    seconds, decode_s, tokens, outs = 0.0, 0.0, 0, []
    for prompts in groups:
        dt, first, out = run(llm, prompts, params)
        seconds += dt
        decode_s += dt - first
        tokens += sum(map(len, out))
        outs += out
    return seconds, decode_s, tokens, outs


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
                seconds, decode_s, tokens, outs[side] = workload(llm, name, chat)
                rates.setdefault((name, side), []).append(tokens / seconds)
                first_tokens = 16 if name == "batch16" else len(outs[side])
                rates.setdefault((name, side + " decode"), []).append(
                    (tokens - first_tokens) / decode_s)
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
          f"{'decode ratio':>13} {'drafted':>8} {'accepted':>9}")
    ok = True
    for name, target in TARGETS.items():
        p, s, pd, sd = (statistics.median(rates[(name, side)])
                        for side in ("plain", "spec", "plain decode", "spec decode"))
        drafted, accepted = sum(rates[(name, "drafted")]), sum(rates[(name, "accepted")])
        ok &= s / p >= target
        print(f"{name:10} {p:12.1f} {s:11.1f} {s / p:7.2f} {target:7.2f} {sd / pd:13.2f} "
              f"{drafted:8d} {accepted:9d}")
    print("tok/s: output tokens over wall time, prompts included (the ratio the targets "
          "judge); decode ratio: after every request's first token")
    per_pos = spec.engine.stats["spec_decode_num_accepted_tokens_per_pos"]
    drafts = spec.engine.stats["spec_decode_num_drafts"]
    print("acceptance by draft position (accepted / drafts with >= 1 token): "
          + ", ".join(f"{i + 1}: {n / max(drafts, 1):.2f}" for i, n in enumerate(per_pos)))
    print("all targets met" if ok else "some target missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
