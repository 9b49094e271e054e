"""`kvserve bench`: load-test any OpenAI-compatible server (kvserve, vLLM, llama.cpp).

Sends streaming /v1/completions (or /v1/chat/completions) requests with Poisson arrivals and
an optional concurrency cap, times every chunk, and reports throughput, goodput and
TTFT / TPOT / ITL / E2E latency like `vllm bench serve`. Token counts are the server's
`usage`, never guesses.

Python API (stable; bench/peers.py and other scripts use it):

    from clients.bench import BenchConfig, run_benchmark, main
    result = asyncio.run(run_benchmark(BenchConfig(base_url=..., num_prompts=32)))
    result.metrics["output_throughput"]; result.requests[0].ttft; result.to_dict()
    print(result.report())
    main(["--base-url", ..., "--save-result", "r.json"])   # the CLI, returns an exit code

BenchConfig: the CLI's options (bench_cli.add_bench_args), frozen, validated when built.
BenchResult: config, model, tokenizer, started_at, duration (s), requests (list of
bench_metrics.RequestResult: index, success, error, start, ttft, e2e, itl, chunk_times,
prompt_tokens, output_tokens, expected_input_len, max_tokens; .tpot), metrics (the dict of
bench_metrics.compute_metrics), warnings; errors(), report(), to_dict() (what --save-result
writes: JSON-safe, seconds per request, milliseconds in metrics["*_ms"]).
Files: bench_dataset (prompts), bench_request (one timed stream), bench_metrics (numbers),
bench_report (the text block), bench_plot (--plot), bench_cli (flags).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

from clients.bench_metrics import RequestResult, compute_metrics, parse_goodput
from clients.bench_report import format_report

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; the CLI's flags with the same names and defaults."""
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None            # None: the first id of GET /v1/models
    endpoint: str = "completions"       # "completions" | "chat"
    dataset: str = "random"             # "random" or a .jsonl path
    num_prompts: int = 64
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.0
    request_rate: float = math.inf      # requests/s, Poisson arrivals; inf: all at once
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0
    warmup: int = 1                     # requests sent first, left out of the numbers
    goodput: tuple[str, ...] = ()       # ("ttft:500", "tpot:50", "e2el:2000"), ms
    tokenizer: str | None = None        # None | "server" | "words" | .gguf or HF dir path
    api_key: str | None = None
    timeout: float = 600.0              # seconds per request

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError("range_ratio must be in [0, 1)")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (inf: all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.warmup < 0 or not self.timeout > 0:
            raise ValueError("warmup must be >= 0 and timeout > 0")
        if self.dataset != "random" and not os.path.isfile(self.dataset):
            raise FileNotFoundError(f"dataset {self.dataset!r} is neither 'random' nor a file")
        parse_goodput(list(self.goodput))

    @property
    def slos(self) -> dict[str, float]:
        return parse_goodput(list(self.goodput))


@dataclass
class BenchResult:
    """A finished run: the measured requests (not the warmup) and their numbers."""
    config: BenchConfig
    model: str
    tokenizer: str
    started_at: str
    duration: float
    requests: list[RequestResult]
    metrics: dict
    warnings: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [r.error for r in self.requests if r.error]

    def report(self) -> str:
        return format_report(self)

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        cfg["api_key"] = "***" if cfg["api_key"] else None
        cfg["goodput"] = list(cfg["goodput"])
        return _json_safe({"config": cfg, "model": self.model, "tokenizer": self.tokenizer,
                           "started_at": self.started_at, "metrics": self.metrics,
                           "warnings": self.warnings, "errors": self.errors(),
                           "requests": [r.to_dict() for r in self.requests]})


def _json_safe(x):
    """inf/nan (not JSON) become null; request_rate inf is written as the string "inf"."""
    if isinstance(x, dict):
        return {k: ("inf" if k == "request_rate" and x[k] == math.inf else _json_safe(x[k]))
                for k in x}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def arrival_offsets(n: int, rate: float, rng: random.Random) -> list[float]:
    """Send times (s) of n requests in a Poisson process of `rate`/s; all 0 for inf."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


class BenchError(ValueError):
    """What makes a whole run impossible (the CLI prints it without a traceback)."""


async def first_model_id(client) -> str:
    """The first id of GET /v1/models."""
    import httpx
    try:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except httpx.HTTPError as e:
        url = str(client.base_url).rstrip("/") + "/v1/models"
        raise BenchError(f"GET {url} failed ({type(e).__name__}: {e}); "
                         f"is the server up? (or pass --model)") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError("GET /v1/models lists no model; pass --model") from None


def _build_prompts(config: BenchConfig, model: str, warnings: list[str]):
    """(the run's prompts followed by the warmup's, tokenizer description); blocking.

    Warmup prompts come last so that the measured ones do not depend on --warmup."""
    import httpx

    from clients.bench_dataset import load_jsonl, pick_tokenizer, random_dataset
    n = config.num_prompts + config.warmup
    if config.dataset != "random":
        return load_jsonl(config.dataset, n, config.output_len), "none (jsonl prompts)"
    try:
        with httpx.Client(base_url=config.base_url, headers=_headers(config),
                          timeout=config.timeout) as client:
            tok = pick_tokenizer(config.tokenizer, client, model, warnings)
            return random_dataset(tok, n, config.input_len, config.output_len,
                                  config.range_ratio, config.seed), tok.name
    except httpx.HTTPError as e:  # --tokenizer server, and the server failed us
        raise BenchError(f"sizing prompts with the server's /tokenize failed "
                         f"({type(e).__name__}: {e})") from None


def _headers(config: BenchConfig) -> dict:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def run_benchmark(config: BenchConfig, progress: bool = False,
                        transport=None) -> BenchResult:
    """Run the benchmark described by `config`; a failed request is counted, never raised.

    Raises only for what makes a run impossible (BenchError: no --model and GET /v1/models
    fails; ValueError: a bad dataset). `progress`: a tqdm bar on stderr. `transport`: an
    httpx.AsyncBaseTransport for the requests (tests use httpx.MockTransport)."""
    import httpx
    from tqdm import tqdm

    from clients.bench_request import request_body, send
    conns = config.max_concurrency or config.num_prompts
    limits = httpx.Limits(max_connections=conns + 4, max_keepalive_connections=conns + 4)
    warnings: list[str] = []
    async with httpx.AsyncClient(base_url=config.base_url, headers=_headers(config),
                                 timeout=httpx.Timeout(config.timeout), limits=limits,
                                 transport=transport) as client:
        model = config.model or await first_model_id(client)
        prompts, tok_name = await asyncio.to_thread(_build_prompts, config, model, warnings)
        path = ENDPOINTS[config.endpoint]
        bodies = [request_body(config.endpoint, model, p, config.temperature, config.ignore_eos)
                  for p in prompts]
        sem = asyncio.Semaphore(config.max_concurrency or len(bodies))

        async def one(result: RequestResult, body: dict, delay: float, t0: float, bar) -> None:
            await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
            async with sem:
                try:
                    async with asyncio.timeout(config.timeout):
                        await send(client, path, body, result, t0)
                except TimeoutError:
                    result.error = f"timed out after {config.timeout:g}s"
            if bar is not None:
                bar.update(1)

        def results_for(idx: range) -> list[RequestResult]:
            return [RequestResult(index=i - idx.start, expected_input_len=prompts[i].input_len,
                                  max_tokens=prompts[i].output_len) for i in idx]

        n = config.num_prompts
        warm = results_for(range(n, len(bodies)))
        if progress and warm:
            print(f"warmup: {len(warm)} request(s)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(r, bodies[n + i], 0.0, t0, None) for i, r in enumerate(warm)))
        for r in warm:
            if not r.success:
                warnings.append(f"warmup request failed: {r.error}")

        measured = results_for(range(n))
        delays = arrival_offsets(len(measured), config.request_rate, random.Random(config.seed))
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with tqdm(total=len(measured), file=sys.stderr, disable=not progress,
                  desc="requests", unit="req", dynamic_ncols=True) as bar:
            t0 = time.perf_counter()
            await asyncio.gather(*(one(r, bodies[i], delays[i], t0, bar)
                                   for i, r in enumerate(measured)))
            duration = time.perf_counter() - t0
    metrics = compute_metrics(measured, duration, config.slos)
    if metrics["completed"] and not metrics["token_counts_from_usage"]:
        warnings.append("the server sent no `usage` in its streams (stream_options."
                        "include_usage): token counts and token throughputs are missing; "
                        "'chunks' counts stream chunks, which are not necessarily tokens")
    mismatch = _length_mismatch(measured) if config.endpoint == "completions" else None
    if mismatch:
        warnings.append(f"the server counted {mismatch[0]:.0f} prompt tokens on average where "
                        f"{mismatch[1]:.0f} were aimed at: the prompts were sized with "
                        f"{tok_name}; pass --tokenizer (a path, or 'server') for this model")
    return BenchResult(config=config, model=model, tokenizer=tok_name, started_at=started_at,
                       duration=duration, requests=measured, metrics=metrics,
                       warnings=warnings)


def _length_mismatch(results: list[RequestResult]) -> tuple[float, float] | None:
    """(mean prompt tokens the server counted, mean aimed at) when they differ by > 10%."""
    pairs = [(r.prompt_tokens, r.expected_input_len) for r in results
             if r.success and r.prompt_tokens is not None and r.expected_input_len]
    if not pairs:
        return None
    got, aimed = (sum(x) / len(pairs) for x in zip(*pairs))
    return (got, aimed) if abs(got - aimed) > 0.1 * aimed else None


# ---------------------------------------------------------------- command line (bench_cli)

def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """The `bench` subcommand of `kvserve` (imports nothing heavy until it runs)."""
    from clients.bench_cli import add_bench_parser as add
    return add(subparsers)


def main(argv: list[str] | None = None) -> int:
    """`kvserve bench ARGS` as a function: prints the report, returns the exit code."""
    from clients.bench_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
