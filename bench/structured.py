"""Structured output's cost: decode step time with every sequence constrained by a JSON schema
against none, in the same run (alternating rounds), and the schema's compile time.

    python bench/structured.py [--streams 16] [--steps 50] [--rounds 3]

Each round adds --streams requests (temperature 1.0, the same chat prompts), runs until all
are decoding, then times --steps decode steps one by one (median). The constrained requests
use a schema that keeps them generating (an array of 40 strings); the free ones ignore EOS.
Target (issue 16): constrained / free <= 1.10.
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

SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "items": {"type": "array", "items": {"type": "string", "maxLength": 24},
                                   "minItems": 40, "maxItems": 40}},
          "required": ["title", "items"]}


def decode_steps(engine, prompts, constrained: bool, steps: int) -> float:
    from engine import SamplingParams, StructuredOutputsParams
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=1.0, seed=i, max_tokens=1000,
                                                      ignore_eos=not constrained,
                                                      structured_outputs=so))
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):  # warm-up decodes
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    assert len(engine.scheduler.running) == len(prompts), "a sequence ended while timed"
    for rid in list(engine.requests):
        engine.abort_request(rid)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from engine import LLM, StructuredOutputsParams
    from engine.structured_output import StructuredOutputs
    llm = LLM(quantization="auto", max_num_seqs=args.streams)
    engine, tok = llm.engine, llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"List things, {i}."}], True)
               for i in range(args.streams)]

    fresh = StructuredOutputs(tok, engine.config.model.vocab_size, engine.eos_token_ids)
    t0 = time.perf_counter()
    fresh._get_compiler()
    t_info = time.perf_counter() - t0
    spec = StructuredOutputsParams(json=SCHEMA)
    t0 = time.perf_counter()
    fresh.matcher(spec)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.matcher(spec)
    t_cached = time.perf_counter() - t0

    free, constrained = [], []
    for _ in range(args.rounds):
        free.append(decode_steps(engine, prompts, False, args.steps))
        constrained.append(decode_steps(engine, prompts, True, args.steps))
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"tokenizer info (once per engine): {t_info * 1e3:.0f} ms; schema compile "
          f"{t_compile * 1e3:.1f} ms, again (cached) {t_cached * 1e3:.2f} ms")
    print(f"decode step, {args.streams} streams, median of {args.steps} steps x {args.rounds} "
          f"rounds: free {f * 1e3:.1f} ms, constrained {c * 1e3:.1f} ms")
    print(f"constrained / free: {c / f:.3f}  (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
