"""The `kvserve bench` command line: flags -> BenchConfig -> run -> report, JSON, plot."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from clients.bench import ENDPOINTS, BenchConfig, run_benchmark

DESCRIPTION = ("Load-test an OpenAI-compatible server (kvserve, vLLM, llama.cpp's llama-server) "
               "with streaming requests; report throughput, goodput and TTFT/TPOT/ITL/E2E "
               "latency. Token counts come from the server's usage.")


def _rate(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0 (or inf)")
    return v


def add_bench_args(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--base-url", default=d.base_url, help="server root (default: %(default)s)")
    p.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    p.add_argument("--endpoint", default=d.endpoint, choices=list(ENDPOINTS),
                   help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    p.add_argument("--dataset", default=d.dataset,
                   help="'random', or a .jsonl file of {\"prompt\": ...} or {\"messages\": "
                        "[...]} lines with optional \"output_len\" (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts,
                   help="requests measured (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=d.input_len,
                   help="random prompt length in tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=d.output_len,
                   help="max_tokens per request (default: %(default)s)")
    p.add_argument("--range-ratio", type=float, default=d.range_ratio,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default: %(default)s)")
    p.add_argument("--request-rate", type=_rate, default=d.request_rate,
                   help="requests/s, Poisson arrivals; inf sends all at once "
                        "(default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: no limit)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask for exactly max_tokens tokens (ignore_eos: vLLM, kvserve, llama.cpp)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="(default: %(default)s, greedy)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds prompts, lengths and arrivals (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="requests sent first, left out of the numbers (default: %(default)s)")
    p.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                   help="SLOs for goodput: ttft:MS tpot:MS e2el:MS (a request is good when it "
                        "meets all given)")
    p.add_argument("--tokenizer", default=None,
                   help="sizes random prompts: a .gguf file or HF dir, 'server' (its "
                        "/tokenize), or 'words'; default: the default model's, else the "
                        "server's, else words")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds per request (default: %(default)s)")
    p.add_argument("--save-result", default=None, metavar="FILE.json",
                   help="write config, metrics and per-request timings as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="latency distributions, throughput and concurrency over time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(base_url=args.base_url.rstrip("/"), model=args.model,
                       endpoint=args.endpoint, dataset=args.dataset,
                       num_prompts=args.num_prompts, input_len=args.input_len,
                       output_len=args.output_len, range_ratio=args.range_ratio,
                       request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                       ignore_eos=args.ignore_eos, temperature=args.temperature,
                       seed=args.seed, warmup=args.warmup, goodput=tuple(args.goodput),
                       tokenizer=args.tokenizer, api_key=args.api_key, timeout=args.timeout)


def run_cli(args: argparse.Namespace) -> int:
    """Run, print the report, save/plot. Exit code 0 when any request succeeded, else 1."""
    config = config_from_args(args)
    for noisy in ("httpx", "matplotlib"):  # a line per request / font cache notes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = asyncio.run(run_benchmark(config, progress=not args.no_progress))
    print(result.report(), flush=True)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
        print(f"saved {args.save_result}", file=sys.stderr)
    if args.plot:
        from clients.bench_plot import plot_result
        plot_result(result, args.plot)
        print(f"plotted {args.plot}", file=sys.stderr)
    return 0 if result.metrics["completed"] else 1


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """The `bench` subcommand of `kvserve` (imports nothing heavy until it runs)."""
    p = subparsers.add_parser("bench", help="load-test any OpenAI-compatible server",
                              description=DESCRIPTION)
    add_bench_args(p)
    p.set_defaults(func=run_cli)
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvserve bench", description=DESCRIPTION)
    add_bench_args(p)
    try:
        return run_cli(p.parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"kvserve bench: error: {e}", file=sys.stderr)
        return 2
