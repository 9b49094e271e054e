"""Per-request records of a load benchmark and the numbers computed from them.

Times are seconds on one monotonic clock whose zero is the start of the measured run;
reported latencies are milliseconds. Token counts come from the server's `usage`; a request
whose server sent none has `output_tokens = None`, and every number that needs it says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SLO_NAMES = ("ttft", "tpot", "e2el")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as the client saw it."""
    index: int
    expected_input_len: int | None      # what the dataset aimed for (None: unknown)
    max_tokens: int
    success: bool = False
    error: str | None = None
    start: float = 0.0                  # sent, s since the run's start
    ttft: float | None = None           # s from sent to the first non-empty content
    e2e: float | None = None            # s from sent to the end of the stream (or the failure)
    itl: list[float] = field(default_factory=list)          # s between content chunks
    chunk_times: list[float] = field(default_factory=list)  # content chunks, s since run start
    prompt_tokens: int | None = None    # from usage
    output_tokens: int | None = None    # from usage

    @property
    def end(self) -> float:
        return self.start + (self.e2e or 0.0)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; 0 for a one-token output."""
        if self.ttft is None or self.e2e is None or not self.output_tokens:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tpot": self.tpot}


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_stats(xs_s: list[float]) -> dict:
    """mean/median/p90/p99/std (ms) and count of a list of seconds."""
    ms = [x * 1000 for x in xs_s]
    mean = sum(ms) / len(ms) if ms else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms)) if ms else math.nan
    out = {"mean": mean, "median": percentile(ms, 50), "std": std, "count": len(ms)}
    out.update({f"p{p}": percentile(ms, p) for p in PERCENTILES if p != 50})
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {', '.join(SLO_NAMES)}; "
                             f"got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms") from None
        if not ms > 0 or math.isinf(ms):
            raise ValueError(f"--goodput {item!r}: the limit must be a positive number of ms")
        slos[name] = ms
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    """All given SLOs (ms) met; a value the request lacks (e.g. TPOT without usage) fails."""
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2e}
    return r.success and all(values[k] is not None and values[k] * 1000 <= limit
                             for k, limit in slos.items())


def token_rate_series(results: list[RequestResult], duration: float,
                      bucket: float) -> tuple[list[float], list[float]]:
    """Output tokens per second in buckets of `bucket` s: (bucket starts, rates); the last,
    partial bucket is divided by its own width.

    Each content chunk carries output_tokens / chunks tokens (one each when the server sends
    a token per chunk); without usage a chunk counts as one token."""
    n = max(1, math.ceil(duration / bucket - 1e-9)) if duration > 0 else 1
    counts = [0.0] * n
    for r in results:
        if not r.success or not r.chunk_times:
            continue
        weight = (r.output_tokens or len(r.chunk_times)) / len(r.chunk_times)
        for t in r.chunk_times:
            counts[min(n - 1, max(0, int(t / bucket)))] += weight
    widths = [min(bucket, duration - i * bucket) if duration > 0 else bucket for i in range(n)]
    return [i * bucket for i in range(n)], [c / max(w, 1e-9) for c, w in zip(counts, widths)]


def concurrency_series(results: list[RequestResult]) -> tuple[list[float], list[int]]:
    """Requests in flight as a step function: (times, level from that time on)."""
    events = sorted([(r.start, 1) for r in results if r.e2e is not None] +
                    [(r.end, -1) for r in results if r.e2e is not None],
                    key=lambda e: (e[0], e[1]))
    times, levels, level = [0.0], [0], 0
    for t, d in events:
        level += d
        times.append(t)
        levels.append(level)
    return times, levels


def compute_metrics(results: list[RequestResult], duration: float,
                    slos: dict[str, float]) -> dict:
    """The aggregate numbers of a run over `duration` s, against `slos` (ms, may be empty).

    Keys: completed, failed, duration, token_counts_from_usage (False when any successful
    request lacked usage: then the token totals and rates are None), total_input_tokens,
    total_output_tokens, total_output_chunks, request_throughput, output_throughput,
    total_token_throughput, peak_output_throughput (best 1 s bucket), peak_concurrency,
    good_requests and request_goodput (None without SLOs), and ttft_ms, tpot_ms, itl_ms,
    e2el_ms: latency_stats dicts (mean, median, std, p90, p99, count) over successes."""
    ok = [r for r in results if r.success]
    usage_known = all(r.output_tokens is not None and r.prompt_tokens is not None for r in ok)
    total_in = sum(r.prompt_tokens for r in ok) if usage_known else None
    total_out = sum(r.output_tokens for r in ok) if usage_known else None
    chunks = sum(len(r.chunk_times) for r in ok)
    per_s = (lambda x: x / duration if x is not None and duration > 0 else None)
    bucket = min(1.0, duration) if duration > 0 else 1.0
    _, rates = token_rate_series(ok, duration, bucket)
    whole = rates[:max(1, int(duration / bucket + 0.5))]  # a last bucket under half full: noise
    _, levels = concurrency_series(results)
    m = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "token_counts_from_usage": usage_known,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_output_chunks": chunks,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(None if total_in is None else total_in + total_out),
        "peak_output_throughput": max(whole) if ok and usage_known else None,
        "peak_concurrency": max(levels),
        "request_goodput": None,
        "good_requests": None,
        "ttft_ms": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": latency_stats([r.tpot for r in ok if r.tpot is not None
                                  and r.output_tokens > 1]),
        "itl_ms": latency_stats([x for r in ok for x in r.itl]),
        "e2el_ms": latency_stats([r.e2e for r in ok if r.e2e is not None]),
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        m["good_requests"], m["request_goodput"] = good, per_s(good)
    return m
