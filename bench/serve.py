"""Serving overhead: the same workload through LLM.generate and through `kvserve serve`.

64 prompts x 128 output tokens, greedy, ignore_eos, SmolLM2-135M-Instruct. Offline runs twice:
all prompts at once (max_num_seqs = all) and with max_num_seqs = the client concurrency,
which is the fair baseline: a server fed by 16 concurrent streams never batches more than 16.
Then a server is started as a subprocess and driven by 16 concurrent streaming completions
(asyncio + httpx, a semaphore of 16); TTFT and inter-chunk latency come from the SSE chunks
as the client sees them. Everything runs in one invocation, on one machine.

    python bench/serve.py [--num-prompts 64] [--output-len 128] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

# bench/kernels.py would shadow the `kernels` package: put the repository root first.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.offline import make_prompts  # noqa: E402
from clients.sse import aiter_sse  # noqa: E402


class Offline:
    """LLM.generate on one engine kept loaded, so rounds can alternate with the server."""

    def __init__(self, dtype: str, max_num_seqs: int):
        from engine import LLM, SamplingParams
        self.llm = LLM(dtype=dtype, device="cpu", max_num_seqs=max_num_seqs)
        self.llm.generate(["warm-up"] * 4, SamplingParams(temperature=0, max_tokens=4),
                          use_tqdm=False)

    def run(self, prompts: list[str], output_len: int) -> dict:
        from engine import SamplingParams
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"tok_s": tokens / elapsed, "elapsed": elapsed, "tokens": tokens,
                "texts": [o.outputs[0].text for o in outs]}

    def close(self) -> None:
        del self.llm
        gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Server:
    """A server process (kvserve, llama-server, ...) on a free port, its output in a log file;
    ready once GET /health answers 200 (both answer 503 while loading). `make_cmd(port)` gives
    the command line. bench/peers.py uses it too."""

    def __init__(self, make_cmd: Callable[[int], list[str]], name: str = "kvserve",
                 startup_timeout: float = 180.0):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log",
                                               delete=False)
        cmd = make_cmd(self.port)
        print(f"[bench] starting {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see "
                                   f"{self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{name} not healthy after {startup_timeout:.0f}s; see "
                           f"{self.log.name}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def kvserve_cmd(port: int, dtype: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve",
            "--port", str(port), "--dtype", dtype, *extra]


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, output_len: int,
                     sem: asyncio.Semaphore) -> dict:
    payload = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with sem:
        t0 = time.perf_counter()
        arrivals, text, tokens = [], [], 0
        async with client.stream("POST", url + "/v1/completions", json=payload) as resp:
            resp.raise_for_status()
            async for data in aiter_sse(resp.aiter_lines()):
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", ()):
                    if c.get("text"):
                        arrivals.append(time.perf_counter())
                        text.append(c["text"])
        end = time.perf_counter()
    return {"start": t0, "end": end, "arrivals": arrivals, "tokens": tokens,
            "text": "".join(text)}


async def drive(url: str, prompts: list[str], output_len: int, concurrency: int):
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, p, output_len, sem)
                                         for p in prompts))
        return results, time.perf_counter() - t0


def percentiles(xs: list[float], ps=(50, 90, 99)) -> list[float]:
    xs = sorted(xs)
    if not xs:
        return [float("nan")] * len(ps)
    return [xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))] for p in ps]


def run_server_round(srv: Server, prompts, output_len, concurrency) -> dict:
    cpu0, client0 = cpu_seconds(srv.proc.pid), time.process_time()
    results, elapsed = asyncio.run(drive(srv.url, prompts, output_len, concurrency))
    cpu1, client1 = cpu_seconds(srv.proc.pid), time.process_time()
    tokens = sum(r["tokens"] for r in results)
    return {"tok_s": tokens / elapsed, "elapsed": elapsed, "tokens": tokens,
            "ttft": [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]],
            "itl": [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])],
            "texts": [r["text"] for r in results],
            "server_cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "client_cpu": client1 - client0}


def line(name: str, r: dict) -> str:
    return f"{name:<28}: {r['tok_s']:8.1f} tok/s  ({r['tokens']} tokens in {r['elapsed']:.1f}s)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2,
                    help="offline(max_num_seqs=concurrency) and server runs, alternating "
                         "ABBA so that drift of a shared machine cancels")
    ap.add_argument("--skip-offline-all", action="store_true",
                    help="skip the all-at-once offline baseline")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `kvserve serve` (repeatable)")
    args = ap.parse_args()
    prompts = make_prompts(args.num_prompts)
    n, c, out_len = args.num_prompts, args.concurrency, args.output_len
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus; python {platform.python_version()}, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads, {args.dtype}")
    print(f"workload: {n} prompts x {out_len} tokens, greedy, ignore_eos; server at {c} "
          f"concurrent streaming completions; {args.rounds} round(s)\n", flush=True)

    all_at_once = None
    if not args.skip_offline_all:
        offline = Offline(args.dtype, n)
        all_at_once = offline.run(prompts, out_len)
        offline.close()
        print(line(f"offline, max_num_seqs={n}", all_at_once), flush=True)

    offline = Offline(args.dtype, c)
    srv = Server(lambda port: kvserve_cmd(port, args.dtype, args.server_arg))
    fair, served = [], []
    try:
        asyncio.run(drive(srv.url, prompts[:c], 4, c))  # warm-up at full concurrency
        for i in range(args.rounds):
            order = ("offline", "server") if i % 2 == 0 else ("server", "offline")
            for what in order:
                if what == "offline":
                    fair.append(offline.run(prompts, out_len))
                    print(line(f"offline, max_num_seqs={c}", fair[-1]), flush=True)
                else:
                    served.append(run_server_round(srv, prompts, out_len, c))
                    print(line(f"server, {c} streams", served[-1]), flush=True)
    finally:
        rc = srv.stop()
        offline.close()
    print(f"server exit code after SIGTERM: {rc}")
    expected = n * out_len
    for r in fair + served:
        if r["tokens"] != expected:
            print(f"WARNING: a run produced {r['tokens']} tokens, expected {expected}")

    def rate(runs):  # all tokens over all time: a slow round weighs what it cost
        return sum(r["tokens"] for r in runs) / sum(r["elapsed"] for r in runs)

    ratio = rate(served) / rate(fair)
    print(f"\noffline, max_num_seqs={c} (all rounds): {rate(fair):8.1f} tok/s")
    print(f"server, {c} streams (all rounds)     : {rate(served):8.1f} tok/s")
    print(f"ratio server / offline(max_num_seqs={c}): {ratio:.3f}   <- the fair baseline "
          f"(target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    print("  per round: " + ", ".join(f"{s['tok_s'] / f['tok_s']:.3f}"
                                      for f, s in zip(fair, served)))
    if all_at_once:
        print(f"ratio server / offline(max_num_seqs={n}): {rate(served) / all_at_once['tok_s']:.3f}"
              f"   (not like for like: offline batches up to {n}, the server sees {c})")
    same = sum(a == b for a, b in zip(served[0]["texts"], fair[0]["texts"]))
    print(f"greedy texts identical to offline: {same}/{n}")
    ttft = [x for r in served for x in r["ttft"]]
    itl = [x for r in served for x in r["itl"]]
    print("client-side latency over all server rounds (ITL = gap between SSE chunks with text):")
    for name, xs in (("TTFT", ttft), ("ITL ", itl)):
        p50, p90, p99 = (x * 1000 for x in percentiles(xs))
        print(f"  {name} ms  p50 {p50:7.1f}  p90 {p90:7.1f}  p99 {p99:7.1f}  ({len(xs)} samples)")
    cpu = [r["server_cpu"] for r in served]
    if None not in cpu:
        wall = sum(r["elapsed"] for r in served)
        print(f"CPU seconds in the server rounds: server {sum(cpu):.1f}, bench client "
              f"{sum(r['client_cpu'] for r in served):.1f}, over {wall:.1f}s wall on "
              f"{os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
