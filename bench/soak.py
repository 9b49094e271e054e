"""Soak a real kvserve server: a random mix of requests and cancels for a bounded time.

    python bench/soak.py --duration 1800                     # starts `kvserve serve` itself
    python bench/soak.py --duration 120 --serve-args "--max-num-seqs 8 --dtype float32"
    python bench/soak.py --url http://127.0.0.1:8000 --duration 600   # a server already up

`--concurrency` clients (24) loop until `--duration` seconds or `--max-requests` have passed,
each sending a random request: completions or chat, streamed or not, n 1-3, seeds, stop
strings, logprobs, temperatures, now and then beam search, scoring (echo + logprobs,
max_tokens 0, prompt_logprobs), structured output (a JSON schema, a regex, a choice, JSON
mode) or a malformed body; about 30% of
streams are dropped after a few events and some plain requests are abandoned mid-way. One
more client sends a long prompt (`--long-tokens`) every `--long-every` seconds, so the
inter-token latency (ITL) of the short streams can be read while a long prompt prefills.
`/metrics` is sampled every `--sample-every` seconds (KV blocks, queue, the server's RSS).
Only 127.0.0.1 / localhost servers are driven.

Exit status 1, with the reasons, on: any 5xx or transport error, a request that hangs
(`--request-timeout`), a stream that ends without its final event (every choice's
finish_reason and `data: [DONE]`), an error event inside a stream, KV blocks still used once
the server is idle after the run, RSS that grows by more than `--rss-growth-mib` between the
first and last thirds of the run after `--warmup`, or (for a server this script started) an
exit status other than 0 after SIGTERM. `--json FILE` writes the whole summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script: the repository's packages first

from clients.sse import aiter_sse  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

PROMPTS = [
    "Write a short poem about the sea.", "What is the capital of France?",
    "Explain paged attention in one paragraph.", "List three prime numbers and say why.",
    "Translate 'good morning' into Spanish and German.", "Tell me a story about a robot.",
    "def fibonacci(n):", "The quick brown fox", "Summarize the plot of Hamlet.",
    "Why is the sky blue?", "Give me a recipe for pancakes.", "1, 2, 3, 4,",
]
STOPS = ["\n\n", ".", " the", "\n", "!"]

# bodies a server must refuse with a 4xx (raw bytes, so some are not even JSON)
BAD = [
    b'{"prompt": "hi", "max_tokens": -1}', b'{"prompt": "hi", "n": 1000}',
    b'{"prompt": "hi", "temperature": -2}', b'{"prompt": "hi", "top_p": 7}',
    b'{"prompt": "a\\ud800b"}', b'{"prompt": 12}', b'{"prompt": [[-5]]}',
    b'{"prompt": "hi", "seed": 99999999999999999999999}', b'{"prompt": "hi", "model": ""}',
    b'{"prompt": "hi", "stop_token_ids": [99999999]}', b'{"prompt": "hi", "logprobs": 99}',
    b'{"prompt": "hi"', b'not json at all', b'[]', b'{"messages": []}',
    b'{"prompt": "hi", "max_tokens": 100000000}', b'{"prompt": "hi", "use_beam_search": true, '
    b'"n": 2, "temperature": 0.5}',
]
BAD_CHAT = [b'{"messages": [{"role": "wizard", "content": "x"}]}', b'{"messages": "hello"}',
            b'{"messages": [{"role": "user"}], "max_tokens": 0}']


# structured output: a schema, a regex, a choice, JSON mode (server/structured.py's fields)
CONSTRAINTS = [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "n": {"type": "integer", "minimum": 0}},
        "required": ["name", "n"]}}}},
    {"guided_regex": "[0-9]{3}-[a-z]{2,5}"},
    {"guided_choice": ["red", "green", "blue"]},
    {"response_format": {"type": "json_object"}},
]
CONSTRAINT_FIELDS = {"response_format", "guided_regex", "guided_choice"}

@dataclass
class Record:
    kind: str
    outcome: str = "ok"          # ok cancelled rejected error_5xx transport hung no_final
    status: int = 0              #   stream_error
    detail: str = ""
    start: float = 0.0
    end: float = 0.0
    events: list[float] = field(default_factory=list)  # arrival times of stream events
    tokens: dict[int, list[float]] = field(default_factory=dict)  # per choice: text chunks
    long: bool = False


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key.split("{")[0]] = float(value)
            except ValueError:
                pass
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, model: str, rng: random.Random):
        self.args, self.url, self.model, self.rng = args, url, model, rng
        self.records: list[Record] = []
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.duration
        self.sent = 0
        self.metrics_errors: list[str] = []

    def more(self) -> bool:
        return time.monotonic() < self.deadline and self.sent < self.args.max_requests

    # ------------------------------------------------------------------ requests

    def random_body(self) -> tuple[str, dict, bool]:
        r = self.rng
        chat = r.random() < 0.45
        stream = r.random() < 0.6
        body: dict = {"model": self.model, "max_tokens": r.choice([1, 4, 16, 32, 64])}
        text = f"{r.choice(PROMPTS)} ({r.randrange(10**6)})"
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text if r.random() < 0.8 else [text, r.choice(PROMPTS)]
        beam = not stream and not chat and r.random() < 0.05
        if beam:
            body.update(use_beam_search=True, n=r.choice([2, 3]), temperature=0)
        else:
            body["n"] = r.choice([1, 1, 1, 2, 3])
            body["temperature"] = r.choice([0, 0.7, 1.0])
            if r.random() < 0.5:
                body["seed"] = r.randrange(2**31)
            if r.random() < 0.3:
                body["top_p"] = r.choice([0.5, 0.9])
        if r.random() < 0.3:
            body["stop"] = r.sample(STOPS, r.randint(1, 2))
        if r.random() < 0.3:
            if chat:
                body.update(logprobs=True, top_logprobs=r.randint(0, 5))
            else:
                body["logprobs"] = r.randint(0, 5)
        if not chat and not beam and r.random() < 0.1:  # scoring, as evaluation harnesses do
            body.update(echo=True, logprobs=r.randint(0, 2), max_tokens=r.choice([0, 1, 4]))
        if not chat and r.random() < 0.05:
            body["prompt_logprobs"] = r.randint(0, 3)
        if r.random() < 0.2:
            body["ignore_eos"] = True
        if not body.get("echo") and r.random() < 0.1:  # structured output, now and then
            body.update(r.choice(CONSTRAINTS))
        if stream:
            body["stream"] = True
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return path, body, stream

    def expected_choices(self, body: dict) -> int:
        prompts = body.get("prompt")
        k = len(prompts) if isinstance(prompts, list) and not (
            prompts and isinstance(prompts[0], int)) else 1
        return k * body.get("n", 1)

    async def one(self, client: httpx.AsyncClient) -> None:
        r = self.rng
        self.sent += 1
        if r.random() < 0.05:
            return await self.bad(client)
        path, body, stream = self.random_body()
        rec = Record(kind=("stream " if stream else "")
                     + ("chat" if "chat" in path else "completion")
                     + (" beam" if body.get("use_beam_search") else "")
                     + (" constrained" if set(body) & CONSTRAINT_FIELDS else ""),
                     start=time.monotonic())
        self.records.append(rec)
        cancel_after = r.randint(1, 6) if stream and r.random() < 0.3 else None
        abandon_after = r.uniform(0.05, 2.0) if not stream and r.random() < 0.1 else None
        try:
            if stream:
                await self.stream(client, path, body, rec, cancel_after)
            elif abandon_after is not None:
                try:
                    await asyncio.wait_for(self.plain(client, path, body, rec), abandon_after)
                except asyncio.TimeoutError:
                    rec.outcome = "cancelled"
            else:
                await self.plain(client, path, body, rec)
        except httpx.TimeoutException as e:
            rec.outcome, rec.detail = "hung", f"{type(e).__name__} after " \
                                              f"{time.monotonic() - rec.start:.0f}s"
        except httpx.HTTPError as e:
            self.transport_error(rec, e)
        rec.end = time.monotonic()

    def transport_error(self, rec: Record, e: Exception) -> None:
        rec.outcome, rec.detail = "transport", f"{type(e).__name__}: {e}"
        if isinstance(e, httpx.ConnectError):  # the server is gone: stop here
            self.deadline = min(self.deadline, time.monotonic())

    def classify(self, rec: Record, status: int, text: str) -> bool:
        rec.status = status
        if status >= 500:
            rec.outcome, rec.detail = "error_5xx", text[:300]
        elif status >= 400:
            rec.outcome, rec.detail = "rejected", text[:200]
        return status < 400

    async def plain(self, client, path, body, rec: Record) -> None:
        resp = await client.post(path, json=body)
        if self.classify(rec, resp.status_code, resp.text):
            choices = resp.json().get("choices", [])
            if len(choices) != self.expected_choices(body) or any(
                    c.get("finish_reason") is None for c in choices):
                rec.outcome, rec.detail = "no_final", resp.text[:300]

    async def stream(self, client, path, body, rec: Record, cancel_after: int | None) -> None:
        finished: set[int] = set()
        done = False
        async with client.stream("POST", path, json=body) as resp:
            if not self.classify(rec, resp.status_code, (await resp.aread()).decode()
                                 if resp.status_code >= 400 else ""):
                return
            async for data in aiter_sse(resp.aiter_lines()):
                rec.events.append(time.monotonic())
                if data.strip() == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.outcome, rec.detail = "stream_error", data[:300]
                    return
                for c in chunk.get("choices", []):
                    if c.get("finish_reason") is not None:
                        finished.add(c.get("index", 0))
                    if c.get("text") or (c.get("delta") or {}).get("content"):
                        rec.tokens.setdefault(c.get("index", 0), []).append(rec.events[-1])
                if cancel_after is not None and len(rec.events) >= cancel_after:
                    rec.outcome = "cancelled"  # leaving the block closes the connection
                    return
        if not done or len(finished) < self.expected_choices(body):
            rec.outcome = "no_final"
            rec.detail = f"[DONE] {'seen' if done else 'missing'}, finish_reason for " \
                         f"{len(finished)}/{self.expected_choices(body)} choices"

    async def bad(self, client) -> None:
        chat = self.rng.random() < 0.3
        raw = self.rng.choice(BAD_CHAT if chat else BAD)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        rec = Record(kind="bad input", start=time.monotonic())
        self.records.append(rec)
        try:
            resp = await client.post(path, content=raw,
                                     headers={"content-type": "application/json"})
            self.classify(rec, resp.status_code, resp.text)
            if resp.status_code < 400:  # a body the server accepted after all: not a fault
                rec.outcome = "ok"
        except httpx.HTTPError as e:
            self.transport_error(rec, e)
        rec.end = time.monotonic()

    async def long_prompts(self, client) -> None:
        """A long token-id prompt every --long-every seconds (each one new: the prefix cache
        would answer a repeat), streamed with max_tokens 1: its prefill is [start, event 1]."""
        while self.args.long_every > 0 and self.more():
            ids = [self.rng.randrange(100, 20000) for _ in range(self.args.long_tokens)]
            rec = Record(kind="long prompt", start=time.monotonic(), long=True)
            self.records.append(rec)
            self.sent += 1
            try:
                await self.stream(client, "/v1/completions",
                                  {"model": self.model, "prompt": ids, "max_tokens": 1,
                                   "stream": True}, rec, None)
            except httpx.TimeoutException:
                rec.outcome = "hung"
            except httpx.HTTPError as e:
                self.transport_error(rec, e)
            rec.end = time.monotonic()
            wait = self.deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(self.args.long_every, wait))  # pacing, not syncing

    async def worker(self, client) -> None:
        while self.more():
            await self.one(client)

    async def sampler(self, client) -> None:
        while self.more():
            await self.sample(client)
            await asyncio.sleep(self.args.sample_every)  # pacing, not syncing

    async def sample(self, client) -> dict | None:
        try:
            m = parse_metrics((await client.get("/metrics", timeout=30)).text)
        except httpx.HTTPError as e:
            self.metrics_errors.append(f"{type(e).__name__}: {e}")
            if isinstance(e, httpx.ConnectError):
                self.deadline = min(self.deadline, time.monotonic())
            return None
        s = {"t": round(time.monotonic() - self.t0, 1),
             "rss_mib": m.get("process_resident_memory_bytes", 0) / 2**20,
             "running": m.get("kvserve:num_requests_running"),
             "waiting": m.get("kvserve:num_requests_waiting"),
             **{k: m.get(f"kvserve:kv_cache_blocks_{k}") for k in ("used", "cached_free",
                                                                    "free", "total")}}
        self.samples.append(s)
        return s

    async def run(self) -> dict:
        timeout = httpx.Timeout(self.args.request_timeout, connect=10.0)
        limits = httpx.Limits(max_connections=self.args.concurrency + 4)
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits,
                                     headers=headers) as client:
            tasks = [asyncio.create_task(self.worker(client))
                     for _ in range(self.args.concurrency)]
            tasks.append(asyncio.create_task(self.long_prompts(client)))
            tasks.append(asyncio.create_task(self.sampler(client)))
            await asyncio.gather(*tasks)
            # drained: the server must come back to idle with no block used
            idle, deadline = None, time.monotonic() + self.args.drain_timeout
            while time.monotonic() < deadline:
                s = await self.sample(client)
                if s is None:
                    break
                if s["running"] == 0 and s["waiting"] == 0:
                    idle = s
                    break
                await asyncio.sleep(0.5)  # polling the server's state, bounded
            try:
                health = (await client.get("/health", timeout=30)).status_code
            except httpx.HTTPError as e:
                health = f"unreachable ({type(e).__name__})"
        return self.summary(idle, health)

    # ------------------------------------------------------------------ verdict

    def summary(self, idle: dict | None, health: int) -> dict:
        a = self.args
        outcomes: dict[str, int] = {}
        for rec in self.records:
            outcomes[rec.outcome] = outcomes.get(rec.outcome, 0) + 1
        kinds: dict[str, int] = {}
        for rec in self.records:
            kinds[rec.kind] = kinds.get(rec.kind, 0) + 1
        prefills = [(r.start, r.events[0] if r.events else r.end) for r in self.records
                    if r.long and r.outcome == "ok"]
        gaps, during = [], []
        for rec in self.records:
            if rec.long:
                continue
            for times in rec.tokens.values():  # gaps between one choice's text chunks
                for t0, t1 in zip(times, times[1:]):
                    gaps.append(t1 - t0)
                    if any(t0 < e and t1 > s for s, e in prefills):
                        during.append(t1 - t0)
        after = [s for s in self.samples if s["t"] >= a.warmup and s["rss_mib"]]
        third = max(1, len(after) // 3)
        growth = (statistics.median(x["rss_mib"] for x in after[-third:])
                  - statistics.median(x["rss_mib"] for x in after[:third])) if after else 0.0
        rss = [s["rss_mib"] for s in self.samples if s["rss_mib"]]
        failures = []
        bad = {k: v for k, v in outcomes.items()
               if k in ("error_5xx", "transport", "hung", "no_final", "stream_error")}
        if bad:
            failures.append(f"requests that failed: {bad}")
            for rec in self.records:
                if rec.outcome in bad:
                    failures.append(f"  {rec.kind}: {rec.outcome} {rec.status} {rec.detail}")
                    if len(failures) > 12:
                        break
        if idle is None:
            failures.append(f"the server was not idle {a.drain_timeout:.0f}s after the run")
        elif idle["used"]:
            failures.append(f"{idle['used']:.0f} KV blocks still used with nothing running")
        if health != 200:
            failures.append(f"/health answered {health} after the run")
        if self.metrics_errors:
            failures.append(f"/metrics failed {len(self.metrics_errors)} times: "
                            f"{self.metrics_errors[0]}")
        if len(after) >= 6 and growth > a.rss_growth_mib:
            failures.append(f"RSS grew {growth:.0f} MiB after warm-up (limit "
                            f"{a.rss_growth_mib:.0f})")
        ms = lambda x: None if x is None else round(1000 * x, 1)  # noqa: E731
        return {
            "duration_s": round(time.monotonic() - self.t0, 1), "requests": len(self.records),
            "outcomes": outcomes, "kinds": kinds,
            "long_prompts": len(prefills), "long_prefill_s": [round(e - s, 2) for s, e in prefills],
            "itl_ms": {"p50": ms(percentile(gaps, 0.5)), "p99": ms(percentile(gaps, 0.99)),
                       "max": ms(max(gaps, default=None))},
            "itl_during_long_prefill_ms": {"n": len(during), "p50": ms(percentile(during, 0.5)),
                                           "p99": ms(percentile(during, 0.99)),
                                           "max": ms(max(during, default=None))},
            "rss_mib": {"start": round(rss[0], 1) if rss else None,
                        "peak": round(max(rss), 1) if rss else None,
                        "end": round(rss[-1], 1) if rss else None,
                        "growth_after_warmup": round(growth, 1)},
            "blocks_after_drain": None if idle is None else {
                k: idle[k] for k in ("used", "cached_free", "free", "total")},
            "samples": self.samples, "failures": failures,
        }


# ---------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str], timeout: float) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="kvserve-soak-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log.name
        except httpx.HTTPError:
            pass
        time.sleep(0.3)  # waiting for a process to come up, not ordering our own work
    proc.kill()
    raise SystemExit(f"the server did not come up; its log:\n{open(log.name).read()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (127.0.0.1/localhost only); "
                                                 "default: start one")
    ap.add_argument("--serve-args", default="", help="arguments for the server this starts")
    ap.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"))
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=10**9)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--long-every", type=float, default=60.0,
                    help="seconds between long prompts (0: none)")
    ap.add_argument("--long-tokens", type=int, default=3000)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before RSS must stay flat (default: a quarter of the run, "
                         "at most 120)")
    ap.add_argument("--rss-growth-mib", type=float, default=64.0)
    ap.add_argument("--request-timeout", type=float, default=300.0,
                    help="a request (or a gap between stream events) longer than this hangs")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(120.0, args.duration / 4)
    proc = log = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            print(f"refusing {args.url}: the soak drives only a server on this machine "
                  f"(127.0.0.1 / localhost)", file=sys.stderr)
            return 2
        url = args.url.rstrip("/")
    else:
        proc, url, log = start_server(args.serve_args.split(), timeout=300)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        summary = asyncio.run(Soak(args, url, model, random.Random(args.seed)).run())
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "killed after 120 s"
    if proc is not None:
        summary["server_exit"] = rc
        if rc != 0:
            summary["failures"].append(f"the server exited {rc} after SIGTERM")
        if summary["failures"]:
            summary["server_log_tail"] = open(log).read()[-4000:]
        os.unlink(log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    brief = {k: v for k, v in summary.items() if k not in ("samples", "server_log_tail")}
    print(json.dumps(brief, indent=1))
    if summary["failures"]:
        print("SOAK FAILED:\n" + "\n".join(summary["failures"]), file=sys.stderr)
        if "server_log_tail" in summary:
            print(summary["server_log_tail"], file=sys.stderr)
        return 1
    print(f"soak passed: {summary['requests']} requests in {summary['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
