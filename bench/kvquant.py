"""The quantized KV cache's worth (issue 18), one run: capacity, speed and quality of
kv_cache_dtype int8 / fp8 against the unquantized cache, on SmolLM2.

    python bench/kvquant.py [--memory 256MiB] [--rounds 3] [--quick]

capacity    the same --kv-cache-memory for float32 and bfloat16 caches (kv_cache_dtype auto)
            and bfloat16 models with int8 / fp8_e4m3 caches: as many 1000-token prompts as
            could fit are sent at once (48 new tokens each, prefix caching off), and the most
            sequences decoding together is counted, next to the plan's number (the lecture's
            formula). Targets: int8 >= 1.9x bfloat16's sequences, >= 3.8x float32's.
throughput  16 streams (short chat prompts, 128 tokens each, ignore_eos) with the default
            serving settings (bfloat16, quantization auto), unquantized against int8 (and
            fp8_e4m3), rounds alternating; output tokens / wall time. Target: int8 >= 0.95x.
quality     bench/quality.py's teacher forcing (8 passages, 658 scored positions) with float32
            weights, so that only the cache differs: top-1 agreement and mean KL(unquantized ||
            quantized) of the next-token distributions, through the decode path (one engine
            step per token, reading the cache) and the prefill path. Targets for int8: top-1
            >= 0.99, mean KL <= 0.01.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# bench/kernels.py would shadow the `kernels` package: put the repository root first.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402  (bench/quality.py)
from engine import LLM, SamplingParams  # noqa: E402

PROMPT_TOKENS = 1000
NEW_TOKENS = 48  # long enough that the first sequences still decode when the last join
CAPACITY_SETTINGS = [("float32", "auto"), ("bfloat16", "auto"), ("bfloat16", "int8"),
                     ("bfloat16", "fp8_e4m3")]
CHAT = ["Write a short story about a lighthouse keeper.", "Explain how vaccines work.",
        "Describe a walk through a forest in autumn.", "What makes a good teacher?"]


def capacity(memory: str, dtype: str, kv: str) -> tuple[int, int, float]:
    """(sequences decoding at once, the plan's number, seconds) for 1000-token prompts."""
    llm = LLM(dtype=dtype, quantization="auto", kv_cache_dtype=kv, kv_cache_memory=memory,
              max_num_seqs=256, enable_prefix_caching=False,
              max_model_len=PROMPT_TOKENS + NEW_TOKENS,
              # prompts in few steps, so that all are decoding before the first ones finish
              max_num_batched_tokens=8 * PROMPT_TOKENS, prefill_chunk=0)
    engine = llm.engine
    planned = engine.capacity(seq_len=PROMPT_TOKENS + NEW_TOKENS).seqs_at_once
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i in range(planned + 2):  # more than fit: the rest wait
        engine.add_request(str(i), [(31 * i + 7 * j) % 40000 + 100 for j in range(PROMPT_TOKENS)],
                           params)
    most, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        decoding = [s for s in engine.scheduler.running
                    if s.num_computed_tokens >= s.num_prompt_tokens]
        most = max(most, len(decoding))
    return most, planned, time.perf_counter() - t0


def throughput(llms: dict[str, LLM], rounds: int, max_tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    first = next(iter(llms.values()))
    tok = first.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": CHAT[i % len(CHAT)]
                                         + f" (take {i})"}]) for i in range(16)]
    for llm in llms.values():  # warm-up
        llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    rates = {name: [] for name in llms}
    for _ in range(rounds):
        for name, llm in llms.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="256MiB", help="KV budget of every capacity engine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="64MiB, 1 round of 32 tokens, no quality part (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.memory, args.rounds = "64MiB", 1
    print(f"machine: {quality.machine()}")
    misses = []

    print(f"\n### capacity: {PROMPT_TOKENS}-token prompts, kv_cache_memory {args.memory}\n")
    print("| model dtype | kv_cache_dtype | decoding at once | planned | vs bfloat16 | "
          "vs float32 | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    got = {}
    for dtype, kv in CAPACITY_SETTINGS:
        most, planned, secs = capacity(args.memory, dtype, kv)
        got[dtype, kv] = most
        vs_bf16 = most / got["bfloat16", "auto"] if ("bfloat16", "auto") in got else None
        vs_fp32 = most / got["float32", "auto"]
        print(f"| {dtype} | {kv} | {most} | {planned} | "
              f"{'' if vs_bf16 is None else f'{vs_bf16:.2f}x'} | {vs_fp32:.2f}x | {secs:.1f} |",
              flush=True)
    int8 = got["bfloat16", "int8"]
    if int8 < 1.9 * got["bfloat16", "auto"] or int8 < 3.8 * got["float32", "auto"]:
        misses.append("capacity")

    max_tokens = 32 if args.quick else 128
    print(f"\n### throughput: 16 streams x {max_tokens} tokens, bfloat16, quantization auto, "
          f"median of {args.rounds} alternating rounds\n")
    llms = {kv: LLM(quantization="auto", kv_cache_dtype=kv, enable_prefix_caching=False)
            for kv in ("auto", "int8", "fp8_e4m3")}
    rates = throughput(llms, args.rounds, max_tokens)
    del llms
    print("| kv_cache_dtype | tok/s | vs auto |")
    print("|---|---:|---:|")
    for kv, rate in rates.items():
        print(f"| {kv} | {rate:.1f} | {rate / rates['auto']:.3f}x |")
    if rates["int8"] < 0.95 * rates["auto"]:
        misses.append("throughput")

    if not args.quick:
        print("\n### quality: teacher forced, float32 weights, against the unquantized cache\n")
        reference = "dtype=float32"
        passages, prompts = quality.encode_inputs(None)
        ref = quality.run_setting(reference, passages, prompts, 16)
        print("| kv_cache_dtype | path | positions | top-1 agree | mean KL | max KL |")
        print("|---|---|---:|---:|---:|---:|")
        for kv in ("int8", "fp8_e4m3", "fp8_e5m2"):
            cand = quality.run_setting(f"{reference},kv_cache_dtype={kv}", passages, prompts, 16)
            for mode in ("decode", "prefill"):
                d = quality.compare_distributions(ref[mode], cand[mode], passages)
                print(f"| {kv} | {mode} | {d['positions']} | {d['top1']:.4f} | "
                      f"{d['kl_mean']:.2e} | {d['kl_max']:.2e} |", flush=True)
                if kv == "int8" and (d["top1"] < 0.99 or d["kl_mean"] > 0.01):
                    misses.append(f"int8 quality ({mode})")
    print("\ntargets: " + ("all met" if not misses else "missed: " + ", ".join(misses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
