"""Sampler cost of one decode step: all-greedy vs mixed sampling params, against the model step.

Batch 64, SmolLM2's vocabulary (49152). The sampler is timed on random logits and on the
model's own logits for the same step; the model step (forward + logits for 64 decode tokens,
SmolLM2-135M, float32) is timed in the same run. The issue's target: a decode step with mixed
params costs at most 10% more than an all-greedy one.

    python bench/sampler.py [--batch 64] [--repeats 50] [--threads N]
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

from engine.sampler import Sampler  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

VOCAB = 49152
PROMPT_LEN, OUTPUT_LEN = 200, 50     # history the penalties count over

MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.8, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=50),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1),
    SamplingParams(temperature=0.9, min_p=0.05, seed=2),
    SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5,
                   frequency_penalty=0.3),
    SamplingParams(temperature=0, repetition_penalty=1.2, logprobs=5),
]


def make_seqs(params: list[SamplingParams], batch: int, vocab: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):
        ids = torch.randint(0, vocab, (PROMPT_LEN + OUTPUT_LEN,), generator=gen).tolist()
        s = Sequence(f"r{i}", 0, ids[:PROMPT_LEN], params[i % len(params)])
        s.token_ids += ids[PROMPT_LEN:]
        seqs.append(s)
    return seqs


def time_samplers(logits: torch.Tensor, batch: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one sampler call (tokens fetched to the host), all-greedy and mixed.
    The two alternate, so a noisy machine slows both alike; the tokens are appended to the
    sequences as the engine would, so the penalties' counts are kept up step by step."""
    sampler = Sampler()
    runs = {"greedy": make_seqs([SamplingParams(temperature=0)], batch, logits.shape[1]),
            "mixed": make_seqs(MIXED, batch, logits.shape[1])}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 5):
        for name, seqs in runs.items():
            t0 = time.perf_counter()
            tokens = sampler(logits, seqs).tokens.tolist()
            if i >= 5:
                times[name].append(time.perf_counter() - t0)
            for s, t in zip(seqs, tokens):
                s.token_ids.append(t)
    return statistics.median(times["greedy"]), statistics.median(times["mixed"])


def model_step(batch: int, repeats: int):
    """Median seconds of the forward + logits of `batch` decode tokens, and those logits."""
    from engine import LLM
    llm = LLM(dtype="float32", device="cpu", kv_cache_memory="512MiB", max_num_seqs=batch)
    engine = llm.engine if hasattr(llm, "engine") else llm.llm_engine
    gen = torch.Generator().manual_seed(1)
    for i in range(batch):
        prompt = torch.randint(100, 20000, (32,), generator=gen).tolist()
        engine.add_request(f"b{i}", prompt, SamplingParams(temperature=0, max_tokens=64,
                                                           ignore_eos=True))
    while len(engine.scheduler.running) < batch or \
            any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()                                    # prefill, then one decode
    sched = engine.scheduler.schedule()                  # the next step: a decode for every seq
    assert sched.num_tokens == [1] * batch, "not a pure decode step"
    runner, times = engine.runner, []
    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare(sched.seqs, sched.num_tokens)
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
            logits = runner.model.compute_logits(hidden)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), logits.float().contiguous()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return " / ".join(x for x in (platform.processor(), names[0] if names else "") if x) \
        or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--model-repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    step, model_logits = model_step(args.batch, args.model_repeats)
    random_logits = torch.randn(args.batch, VOCAB, generator=torch.Generator().manual_seed(2)) * 2
    print(f"model step (forward + logits, {args.batch} decode tokens): {step * 1e3:.1f} ms")
    print(f"{'logits':>8} {'greedy ms':>10} {'mixed ms':>9} {'mixed/greedy':>13} "
          f"{'step ratio':>11}")
    for name, logits in (("random", random_logits), ("model", model_logits)):
        greedy, mixed = time_samplers(logits, args.batch, args.repeats)
        print(f"{name:>8} {greedy * 1e3:10.2f} {mixed * 1e3:9.2f} {mixed / greedy:13.2f} "
              f"{(step + mixed) / (step + greedy):11.3f}")
    print("step ratio = (model step + mixed sampler) / (model step + greedy sampler); "
          "target <= 1.10")


if __name__ == "__main__":
    main()
