"""Scoring throughput: prompt tokens/s teacher-forced through HTTP vs transformers.

    python bench/scoring.py [--prompts 64] [--tokens 256] [--concurrency 16] [--reps 2]
                            [--serve-args "--dtype float32"]

The same prompts (token ids cut from varied text) are scored two ways, alternating in one
run: by a `kvserve serve` this script starts (`echo: true, logprobs: 0, max_tokens: 0`, as
lm-evaluation-harness asks, `--concurrency` requests in flight), and by transformers (the
same GGUF, float32, batches of `--concurrency` right-padded prompts, log-softmax of the
logits). It prints prompt tokens/s of each, the ratio, and the largest difference between
the two sets of per-prompt loglikelihood sums (~1e-4 when the server runs float32).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sys
import time

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _soak():
    """bench/soak.py as a module (bench/ itself is not on the path: bench/kernels.py would
    shadow the kernels package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "kvserve_soak", os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module

TEXT = ("The printing press changed how ideas travelled across Europe. Paged attention keeps "
        "the key and value cache in fixed-size blocks. Rivers carve valleys over thousands of "
        "years, and the sediment they carry builds deltas where they meet the sea. In 1969 the "
        "first humans walked on the Moon. A good recipe for bread needs flour, water, salt and "
        "time. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")


async def score_http(url: str, model: str, prompts: list[list[int]], concurrency: int):
    sem = asyncio.Semaphore(concurrency)
    sums: list[float] = [0.0] * len(prompts)

    async def one(client, i, ids):
        async with sem:
            r = await client.post("/v1/completions", json={
                "model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
            r.raise_for_status()
            sums[i] = sum(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:])

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t = time.perf_counter()
        await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - t, sums


def score_hf(model, prompts: list[list[int]], batch: int):
    sums: list[float] = []
    t = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(prompts), batch):
            chunk = prompts[b:b + batch]
            width = max(map(len, chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, :len(p)] = torch.tensor(p)
                mask[i, :len(p)] = 1
            lp = model(ids, attention_mask=mask).logits.float().log_softmax(-1)
            got = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            sums += got.sum(-1).tolist()
    return time.perf_counter() - t, sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--serve-args", default="--dtype float32")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine.loader import default_gguf_path
    path = default_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    pool = tok(TEXT * 40).input_ids
    prompts = [pool[(37 * i) % 500:(37 * i) % 500 + args.tokens - (i % 7) * 8]
               for i in range(args.prompts)]
    total = sum(map(len, prompts)) - len(prompts)  # scored positions (not the first)
    proc, url, log = _soak().start_server(args.serve_args.split() + ["--max-model-len", "2048"],
                                  timeout=300)
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(score_http(url, model, prompts[:4], 4))  # warm-up
        best = {"kvserve": None, "transformers": None}
        sums = {}
        for _ in range(args.reps):
            for name in best:
                dt, s = (asyncio.run(score_http(url, model, prompts, args.concurrency))
                         if name == "kvserve" else score_hf(hf, prompts, args.concurrency))
                best[name] = dt if best[name] is None else min(best[name], dt)
                sums[name] = s
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        os.unlink(log)
    diff = max(abs(a - b) for a, b in zip(sums["kvserve"], sums["transformers"]))
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {len(prompts)} prompts, "
          f"{total} scored tokens; kvserve serve {args.serve_args}; best of {args.reps}")
    print("| scorer | seconds | prompt tokens/s |")
    print("|---|---|---|")
    for name, dt in best.items():
        print(f"| {name} | {dt:.2f} | {total / dt:.0f} |")
    print(f"kvserve / transformers: {best['transformers'] / best['kvserve']:.2f}x; "
          f"max |loglikelihood sum difference| {diff:.2e}")


if __name__ == "__main__":
    main()
