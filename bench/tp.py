"""Tensor parallelism on this machine (issue 19): what each rank holds, what a step costs, and
what the communication alone costs, for N = 1, 2, 3 ranks over gloo.

    python bench/tp.py [--steps 10] [--quick]

per rank    weight bytes and KV bytes of every rank (the parameters each rank's module holds;
            its pool's bytes), against one rank's: layers and KV divide by N, rank 0 also
            keeps the embedding and vocab projection. SmolLM2 (9 query heads, 3 KV heads)
            runs N = 1 and 3; N = 2 runs a Llama-shaped random model (dummy weights, 8 heads,
            2 KV heads, SmolLM2's other sizes), against its own N = 1.
step time   one decode step of 4 sequences (~200 tokens of context each), float32, the
            median of --steps, each N in its own engine; on a 2-core machine N ranks share 2
            cores, so this measures the overhead, not a speed-up (that needs the cores or
            devices).
all-reduce  the communication of one step measured alone: N processes doing the step's
            2 x layers all-reduces of [4, hidden] float32 (gloo on 127.0.0.1), plus the
            broadcast of the step's inputs; per step, median of 20 steps.
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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.tp import free_port  # noqa: E402


def held_bytes(llm: LLM) -> tuple[int, int]:
    runner = llm.engine.runner
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    return weights, llm.engine.config.kv_cache_bytes


def step_ms(llm: LLM, steps: int) -> float:
    """Median time of one engine step with 4 sequences decoding."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"s{i}", [(37 * i + j) % 400 + 5 for j in range(200)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens
              for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times) * 1e3


def _comm(rank: int, world: int, port: int, layers: int, hidden: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    x = torch.randn(4, hidden)
    header, ints = torch.zeros(8, dtype=torch.int64), torch.zeros(4 * 16, dtype=torch.int64)
    times = []
    for i in range(25):
        t0 = time.perf_counter()
        for t in (header, ints, x):
            dist.broadcast(t, 0)
        for _ in range(2 * layers):
            dist.all_reduce(x)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times) * 1e3)
    dist.destroy_process_group()


def comm_ms(world: int, layers: int, hidden: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_comm, args=(r, world, port, layers, hidden, out))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return out.get()


def llama_dir(path: str) -> str:
    """A config-only Llama with 8 query and 2 KV heads and SmolLM2's other sizes (weights:
    load_format='dummy'), so that N = 2 divides its heads."""
    import json
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                   "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 30,
                   "num_attention_heads": 8, "num_key_value_heads": 2,
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": True}, f)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 steps")
    args = ap.parse_args()
    steps = 3 if args.quick else args.steps
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| model | N | rank 0 weights MiB | layers per rank vs N=1 | KV per rank MiB | "
          "KV vs N=1 | step ms (4 seqs) | vs N=1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    import tempfile
    tmp = tempfile.mkdtemp(prefix="kvserve-tp-bench-")
    cases = [("SmolLM2-135M", None, "auto", [1, 3]),
             ("Llama 8/2 heads (dummy)", llama_dir(os.path.join(tmp, "llama")), "dummy", [1, 2])]
    for name, model, load, worlds in cases:
        base = None
        for n in worlds:
            llm = LLM(model=model, load_format=load, dtype="float32", num_kv_blocks=128,
                      max_num_seqs=4, enable_prefix_caching=False, enforce_eager=True,
                      tensor_parallel_size=n)
            weights, kv = held_bytes(llm)
            layers = sum(p.numel() for p in llm.engine.runner.model.layers.parameters())
            ms = step_ms(llm, steps)
            llm.shutdown()
            del llm
            base = base or (layers, kv, ms)
            print(f"| {name} | {n} | {weights / 2**20:.1f} | {layers / base[0]:.3f} | "
                  f"{kv / 2**20:.1f} | {kv / base[1]:.3f} | {ms:.1f} | {ms / base[2]:.2f}x |",
                  flush=True)
    print("\ncommunication alone, per step (SmolLM2's 30 layers, hidden 576, 4 tokens):\n")
    print("| N | broadcast + 60 all-reduces ms |")
    print("|---|---:|")
    for n in (2, 3):
        print(f"| {n} | {comm_ms(n, 30, 576):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
