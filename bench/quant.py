"""Weight-only int4 vs bf16 on the CPU, SmolLM2-135M, one process: ms per decode step at
batch 1, 4 and 16 (100-token prompts) and the time of one 512-token prefill.

The engines take turns in short rounds so that load from other processes hits all of them.

    python bench/quant.py [--steps 40] [--rounds 4] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.quant import quantize_model  # noqa: E402


def make_engines() -> dict[str, LLMEngine]:
    common = dict(device="cpu", kv_cache_memory="256MiB", enable_prefix_caching=False)
    bf16 = LLMEngine.from_args(dtype="bfloat16", **common)
    int4 = LLMEngine.from_args(quantization="int4", **common)
    engines = {"bf16": bf16, "int4": int4}
    # The same int4 layers with a quantized vocab projection (timing only: these quantize the
    # bf16 copy of the weights).
    for head in ("int8", "int4"):
        model = copy.deepcopy(bf16.runner.model)
        quantize_model(model, lm_head=head)
        engines[f"int4, {head} head"] = LLMEngine(int4.config, model, int4.tokenizer)
    return engines


def random_prompt(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=gen).tolist()


def step_times(engine: LLMEngine, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times


def bench_decode(engines: dict[str, LLMEngine], batch: int, steps: int, rounds: int,
                 warmup: int = 5, prompt_len: int = 100) -> dict[str, float]:
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=warmup + steps + 8, ignore_eos=True)
    for name, engine in engines.items():
        vocab = engine.config.model.vocab_size
        for i in range(batch):
            engine.add_request(f"d{i}", random_prompt(gen, prompt_len, vocab), params)
        while any(s.num_computed_tokens < s.num_prompt_tokens
                  for r in engine.requests.values() for s in r.seqs):
            engine.step()  # prefill
        step_times(engine, warmup)
    per = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            per[name] += step_times(engine, steps // rounds)
    for engine in engines.values():
        for rid in list(engine.requests):
            engine.abort_request(rid)
    return {name: statistics.median(t) * 1e3 for name, t in per.items()}


def bench_prefill(engines: dict[str, LLMEngine], length: int, reps: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(length)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    per = {name: [] for name in engines}
    for rep in range(reps + 1):  # the first round warms up
        for name, engine in engines.items():
            prompt = random_prompt(gen, length, engine.config.model.vocab_size)
            engine.add_request(f"p{rep}", prompt, params)
            t = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            if rep:
                per[name].append(time.perf_counter() - t)
    return {name: min(t) * 1e3 for name, t in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = make_engines()
    names = list(engines)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}, load avg {os.getloadavg()[0]:.2f}")
    print(f"| ms | {' | '.join(names)} | {' | '.join(f'bf16 / {n}' for n in names[1:])} |")
    print(f"|---|{'---|' * (2 * len(names) - 1)}")
    with torch.inference_mode():
        rows = [(f"decode step, batch {b}", bench_decode(engines, b, args.steps, args.rounds))
                for b in (1, 4, 16)]
        rows.append(("prefill 512 tokens", bench_prefill(engines, 512, args.prefill_reps)))
    for label, ms in rows:
        ratios = " | ".join(f"{ms['bf16'] / ms[n]:.2f}x" for n in names[1:])
        print(f"| {label} | {' | '.join(f'{ms[n]:.1f}' for n in names)} | {ratios} |")
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
