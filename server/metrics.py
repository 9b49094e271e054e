"""Prometheus metrics, named like vLLM's with the `kvserve:` prefix.

Updated from the engine thread (prometheus-client is thread-safe) and rendered by /metrics.
Counters get prometheus-client's `_total` suffix in the exposition, as vLLM's do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               disable_created_metrics, generate_latest)

# no `*_created` series beside every counter and histogram (vLLM turns them off too)
disable_created_metrics()

LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
           7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
       5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class RequestTiming:
    """One request's clock (time.monotonic), kept beside its stream on the engine thread:
    what the latency histograms are computed from."""
    arrival: float = field(default_factory=time.monotonic)
    scheduled: float | None = None     # first scheduled (queue time)
    first_token: float | None = None   # first output token seen (TTFT)
    last_token: float | None = None    # the latest step that brought tokens (ITL)
    num_tokens: int = 0                # output tokens seen so far, all choices


def _token_buckets(max_len: int) -> list[float]:
    out, base = [], 1
    while base <= max_len:
        for m in (1, 2, 5):
            if m * base <= max_len:
                out.append(float(m * base))
        base *= 10
    return out


class Metrics:
    def __init__(self, model_name: str, max_model_len: int):
        self.registry = r = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux), as on
        # vLLM's /metrics: a memory leak shows from outside (bench/soak.py reads it)
        ProcessCollector(registry=r)
        labels = ["model_name"]
        self.labels = {"model_name": model_name}
        tokens = _token_buckets(max_model_len)

        def gauge(name, doc):
            return Gauge(f"kvserve:{name}", doc, labels, registry=r).labels(**self.labels)

        def counter(name, doc):
            return Counter(f"kvserve:{name}", doc, labels, registry=r).labels(**self.labels)

        def histogram(name, doc, buckets):
            return Histogram(f"kvserve:{name}", doc, labels, buckets=buckets,
                             registry=r).labels(**self.labels)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        # used + cached_free + free == total: a leak shows as used > 0 with nothing running
        self.kv_blocks = {
            key: gauge(f"kv_cache_blocks_{key}", doc) for key, doc in (
                ("used", "KV cache blocks held by running or preempted-in requests."),
                ("cached_free", "Free KV cache blocks still holding a cached prefix "
                                "(reusable, evicted least recently used first)."),
                ("free", "Empty KV cache blocks."),
                ("total", "Usable KV cache blocks."))}
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of started requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.preemptions = counter("num_preemptions", "Preemptions (recompute).")
        self.prefix_queries = counter("prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        # speculative decoding (vLLM's names): drafts are sequences given draft tokens in a
        # step; per position, how often the i-th draft token was accepted
        self.spec_drafts = counter("spec_decode_num_drafts", "Sequences given draft tokens.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_accepted_per_pos = Counter(
            "kvserve:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft (0-based).",
            labels + ["position"], registry=r)
        self.success = Counter("kvserve:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", LATENCY)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", ITL)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", LATENCY)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival to first scheduled.", LATENCY)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt length of requests.", tokens)
        self.gen_len = histogram("request_generation_tokens", "Generated tokens per request.",
                                 tokens)
        self._last: dict[str, float] = {}

    # called from the engine thread

    def on_output(self, timing: RequestTiming, out, now: float) -> None:
        """A step's output of one request: TTFT at its first tokens, ITL after (a step that
        brought several tokens counts each at an equal share of the gap)."""
        n = sum(len(c.token_ids) for c in out.outputs)
        new = n - timing.num_tokens
        if new <= 0:
            return
        if timing.first_token is None:
            timing.first_token = now
            self.ttft.observe(now - timing.arrival)
        elif timing.last_token is not None:
            gap = (now - timing.last_token) / new
            for _ in range(new):
                self.itl.observe(gap)
        timing.last_token = now
        timing.num_tokens = n

    def on_finished(self, timing: RequestTiming, out, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for c in out.outputs:
            # str(): a finish reason may be a str enum; the label is its value
            reason = str(c.finish_reason or "abort")
            self.success.labels(finished_reason=reason, **self.labels).inc()
        self.e2e.observe(now - timing.arrival)
        self.prompt_len.observe(len(out.prompt_token_ids))
        self.gen_len.observe(sum(len(c.token_ids) for c in out.outputs))
        if timing.scheduled is not None:
            self.queue_time.observe(max(0.0, timing.scheduled - timing.arrival))

    def on_state(self, stats: dict) -> None:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        used, cached, total = (stats["kv_blocks_used"], stats["kv_blocks_cached_free"],
                               stats["kv_blocks_total"])
        for key, value in (("used", used), ("cached_free", cached),
                           ("free", total - used - cached), ("total", total)):
            self.kv_blocks[key].set(value)

    def on_step(self, stats: dict, step_time: float) -> None:
        for counter, key in ((self.prompt_tokens, "prompt_tokens"),
                             (self.generation_tokens, "generation_tokens"),
                             (self.preemptions, "num_preemptions"),
                             (self.prefix_queries, "prefix_cache_queries"),
                             (self.prefix_hits, "prefix_cache_hits"),
                             (self.spec_drafts, "spec_decode_num_drafts"),
                             (self.spec_draft_tokens, "spec_decode_num_draft_tokens"),
                             (self.spec_accepted, "spec_decode_num_accepted_tokens")):
            if key not in stats:  # speculative decoding off
                continue
            delta = stats[key] - self._last.get(key, 0)
            if delta > 0:
                counter.inc(delta)
            self._last[key] = stats[key]
        for pos, n in enumerate(stats.get("spec_decode_num_accepted_tokens_per_pos", ())):
            key = f"spec_pos_{pos}"
            if n > self._last.get(key, 0):
                self.spec_accepted_per_pos.labels(position=str(pos), **self.labels).inc(
                    n - self._last.get(key, 0))
            self._last[key] = n

    def render(self) -> bytes:
        return generate_latest(self.registry)
