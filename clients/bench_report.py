"""The printed result block of `kvserve bench` (laid out like `vllm bench serve`'s)."""
from __future__ import annotations

import math

WIDTH = 50
SHOWN_ERRORS = 5
SECTIONS = (("ttft_ms", "TTFT", "Time to First Token"),
            ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
            ("itl_ms", "ITL", "Inter-token Latency"),
            ("e2el_ms", "E2EL", "End-to-end Latency"))


def _value(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return str(v) if isinstance(v, int) else f"{v:.{digits}f}"


def _line(name: str, v, digits: int = 2) -> str:
    return f"{name + ':':<40} {_value(v, digits)}"


def _rule(title: str, ch: str) -> str:
    return f" {title} ".center(WIDTH, ch) if title else ch * WIDTH


def format_report(result) -> str:
    """The result block of a BenchResult, with warnings and the first errors after it."""
    m, c = result.metrics, result.config
    no_usage = "n/a (no usage from the server)"
    lines = [_rule("Serving Benchmark Result", "="),
             _line("Successful requests", m["completed"]),
             _line("Failed requests", m["failed"]),
             _line("Maximum request concurrency", c.max_concurrency or "none"),
             _line("Request rate configured (RPS)", c.request_rate),
             _line("Benchmark duration (s)", m["duration"]),
             _line("Total input tokens", m["total_input_tokens"]
                   if m["token_counts_from_usage"] else no_usage),
             _line("Total generated tokens", m["total_output_tokens"]
                   if m["token_counts_from_usage"] else no_usage)]
    if not m["token_counts_from_usage"]:
        lines.append(_line("Total generated chunks (fallback)", m["total_output_chunks"]))
    lines.append(_line("Request throughput (req/s)", m["request_throughput"]))
    if m["request_goodput"] is not None:
        lines.append(_line("Request goodput (req/s)", m["request_goodput"]))
    lines += [_line("Output token throughput (tok/s)", m["output_throughput"]),
              _line("Peak output token throughput (tok/s)", m["peak_output_throughput"]),
              _line("Peak concurrent requests", m["peak_concurrency"]),
              _line("Total token throughput (tok/s)", m["total_token_throughput"])]
    for key, short, title in SECTIONS:
        s = m[key]
        lines.append(_rule(title, "-"))
        lines += [_line(f"Mean {short} (ms)", s["mean"]),
                  _line(f"Median {short} (ms)", s["median"]),
                  _line(f"P90 {short} (ms)", s["p90"]),
                  _line(f"P99 {short} (ms)", s["p99"])]
    lines.append(_rule("", "="))
    header = [f"model: {result.model}  endpoint: {c.endpoint}  dataset: {c.dataset}  "
              f"prompt tokenizer: {result.tokenizer}"]
    if c.goodput:
        header.append(f"goodput SLOs: {' '.join(c.goodput)} -> {m['good_requests']} of "
                      f"{m['completed']} successful requests met all")
    tail = [f"WARNING: {w}" for w in result.warnings]
    errors = result.errors()
    if errors:
        tail.append(f"{len(errors)} request(s) failed; the first {min(len(errors), SHOWN_ERRORS)}:")
        tail += [f"  - {e}" for e in errors[:SHOWN_ERRORS]]
    return "\n".join(header + lines + tail)
