"""What GET /v1/kv/state costs at 10k KV blocks, against baselines measured in the same run:
one `engine.stats` call (what the server already computes after every step) and one decode
step of the same engine.

A tiny random Llama (load_format dummy, CPU) with a pool of --blocks blocks is filled by the
engine's own scheduler and KV manager (the forward skipped, so filling takes seconds): a first
wave of requests is aborted (their full blocks stay behind as cached-free), then --streams
requests in groups of 8 sharing a prefix fill most of the rest and decode a few tokens. Then,
on that state:

- take:    `engine.kv_state()`, the copy the engine thread makes between two steps (the only
           part that holds up the engine);
- to_dict: the JSON-ready form built from the copy (per-block states with numpy);
- route:   take + to_dict + the capacity plan + json.dumps: what one request costs in all,
           the rest of it off the engine thread.

    python bench/kv_state.py [--blocks 10001] [--streams 64] [--repeat 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

# bench/kernels.py would shadow the `kernels` package: put the repository root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLMEngine, SamplingParams  # noqa: E402

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False}


def step_without_forward(engine: LLMEngine) -> None:
    """schedule() and update() as a step runs them; each sequence whose tokens are all computed
    gets one more token, as sampling would give it."""
    sched = engine.scheduler
    out = sched.schedule()
    sched.update(out, [])
    for seq in out.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1 + seq.num_tokens % 500)


def filled_engine(path: str, blocks: int, streams: int, prompt_len: int) -> LLMEngine:
    engine = LLMEngine.from_args(model=path, load_format="dummy", device="cpu", dtype="float32",
                                 num_kv_blocks=blocks, max_num_seqs=streams,
                                 max_num_batched_tokens=8192)
    bs, params = engine.config.block_size, SamplingParams(max_tokens=100_000, ignore_eos=True)
    # wave 1, aborted once computed: its full blocks stay in the prefix cache (cached-free)
    for i in range(streams // 4):
        engine.add_request(f"old-{i}", [(7 * i + j) % 500 + 1 for j in range(prompt_len)],
                           params)
    run_until(engine, lambda: not engine.scheduler.waiting and all(
        s.num_output_tokens for s in engine.scheduler.running))
    for rid in list(engine.requests):
        engine.abort_request(rid)
    # wave 2: groups of 8 share half their prompt (shared blocks), as many as fit in about
    # 90% of the pool, and decode a little
    half = prompt_len // 2
    per_group = (half + 8 * (prompt_len - half + 8)) // bs + 9
    n = min(streams, 8 * int(0.9 * engine.kv.pool.num_usable / per_group))
    for i in range(n):
        prefix = [(13 * (i // 8) + j) % 500 + 1 for j in range(half)]
        tail = [(31 * i + j) % 500 + 1 for j in range(prompt_len - half)]
        engine.add_request(f"new-{i}", prefix + tail, params)
        if i % 8 == 0:  # a group's first prompt is computed before the others look it up
            run_until(engine, lambda: not engine.scheduler.waiting and all(
                s.num_output_tokens for s in engine.scheduler.running))
    run_until(engine, lambda: not engine.scheduler.waiting and all(
        s.num_output_tokens >= 4 for s in engine.scheduler.running))
    return engine


def run_until(engine: LLMEngine, done) -> None:
    while not done():
        step_without_forward(engine)


def timed(fn, repeat: int) -> float:
    """Median seconds of one call."""
    fn()  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=10_001, help="KV blocks, block 0 included")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1600, help="tokens a prompt")
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as path:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(TINY_LLAMA, f)
        t0 = time.perf_counter()
        engine = filled_engine(path, args.blocks, args.streams, args.prompt_len)
        fill = time.perf_counter() - t0
    state = engine.kv_state().to_dict()
    counts = state["counts"]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; filled in {fill:.1f}s")
    print(f"# pool: {state['num_blocks']} blocks: {counts['used']} used ({counts['shared']} "
          f"shared), {counts['cached_free']} cached-free, {counts['free']} free; "
          f"{state['num_running']} running sequences")

    def route():
        body = engine.kv_state().to_dict()
        body["capacity"] = engine.capacity().to_dict()
        return json.dumps(body, separators=(",", ":"))

    stats = timed(lambda: engine.stats, args.repeat)
    step = timed(engine.step, 5)  # the real forward: a decode of every running sequence
    rows = [("engine.stats (baseline)", stats),
            ("engine.step(), decode (baseline)", step),
            ("take: engine.kv_state()", timed(engine.kv_state, args.repeat)),
            ("to_dict()", timed(engine.kv_state().to_dict, args.repeat)),
            ("route: take + to_dict + capacity + json", timed(route, args.repeat))]
    print(f"{'':42}{'ms':>9}{'x stats':>10}{'/ step':>9}")
    for name, t in rows:
        print(f"{name:42}{t * 1e3:9.3f}{t / stats:10.0f}{t / step:9.3f}")
    print(f"# JSON body: {len(route()) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
