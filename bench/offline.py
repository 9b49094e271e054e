"""Offline throughput: kvserve's LLM.generate vs transformers generate() on the same prompts.

64 prompts x 128 output tokens, greedy, ignore_eos, SmolLM2-135M-Instruct from the GGUF.
transformers runs static batches of 16 (left-padded); kvserve gets all prompts at once and
batches continuously. Both are timed in the same run; the ratio is what counts.

    python bench/offline.py [--dtype float32|bfloat16] [--num-prompts 64] [--output-len 128]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

# bench/kernels.py would shadow the `kernels` package: put the repository root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPICS = ["the ocean", "a lighthouse keeper", "quantum computing", "the French revolution",
          "baking bread", "a robot learning to paint", "mountain climbing", "the stock market",
          "ancient Rome", "a cat who loves jazz", "climate change", "the first moon landing",
          "learning a new language", "a detective in Tokyo", "photosynthesis", "chess openings"]
STYLES = ["Write a short story about {}.", "Explain {} to a ten-year-old.",
          "List five surprising facts about {}, with a sentence on each one of them.",
          "Here is a long and detailed essay on {}, covering its history, the main ideas that "
          "people have about it, and why it still matters today:"]


def make_prompts(n: int) -> list[str]:
    return [STYLES[i % len(STYLES)].format(TOPICS[(i // len(STYLES) + i) % len(TOPICS)])
            for i in range(n)]


def run_kvserve(prompts, output_len, dtype):
    from engine import LLM, SamplingParams
    llm = LLM(dtype=dtype, device="cpu", max_num_seqs=len(prompts))
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / elapsed, elapsed, tokens


def run_transformers(prompts, output_len, dtype, batch_size):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine.loader import default_gguf_path
    path = default_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=getattr(torch, dtype)).eval()
    gen = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
               pad_token_id=tok.pad_token_id or 0)
    with torch.inference_mode():
        model.generate(**tok(prompts[:2], return_tensors="pt", padding=True), max_new_tokens=4,
                       do_sample=False, pad_token_id=gen["pad_token_id"])  # warm-up
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), batch_size):
            batch = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**batch, **gen)
            tokens += (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
        elapsed = time.perf_counter() - t0
    return tokens / elapsed, elapsed, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    prompts = make_prompts(args.num_prompts)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, dtype {args.dtype}")
    ours = run_kvserve(prompts, args.output_len, args.dtype)
    print(f"kvserve      : {ours[0]:8.1f} tok/s  ({ours[2]} tokens in {ours[1]:.1f}s)")
    if args.skip_transformers:
        return
    ref = run_transformers(prompts, args.output_len, args.dtype, args.hf_batch_size)
    print(f"transformers : {ref[0]:8.1f} tok/s  ({ref[2]} tokens in {ref[1]:.1f}s, "
          f"static batches of {args.hf_batch_size})")
    print(f"ratio        : {ours[0] / ref[0]:.2f}x")


if __name__ == "__main__":
    main()
