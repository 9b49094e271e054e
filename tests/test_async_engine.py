"""server/async_engine.py and server/metrics.py in-process: the engine thread, its typed inbox
and the per-request timing, around a scripted stand-in for LLMEngine (one token per request
per step; no model, no server process)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from engine import RequestOutput, SamplingParams
from engine.outputs import CompletionOutput
from server.async_engine import AsyncEngine, Draining, EngineDead, QueueFull
from server.metrics import Metrics, RequestTiming


class Scripted:
    """LLMEngine's surface as AsyncEngine uses it: each request gains one token (its length
    so far) per step until max_tokens; `fail_at` raises in that step; `hold` blocks step()
    until set, so a test can fill the waiting queue."""

    def __init__(self, fail_at: int | None = None):
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.fail_at, self.steps = fail_at, 0
        self.hold = threading.Event()
        self.hold.set()
        self.model_name = "scripted"

    def add_request(self, request_id, prompt, params, arrival_time=None):
        if not prompt:
            raise ValueError("the prompt is empty")
        self.requests[request_id] = (prompt, params, [])

    def _output(self, rid, reason=None) -> RequestOutput:
        prompt, _, tokens = self.requests[rid]
        text = "".join(f"<{t}>" for t in tokens)
        return RequestOutput(rid, None, prompt, [CompletionOutput(0, text, list(tokens), None,
                                                                  None, reason)],
                             reason is not None, first_scheduled_time=0.0)

    def abort_request(self, rid):
        if rid not in self.requests:
            return None
        out = self._output(rid, "abort")
        del self.requests[rid]
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def check_health(self) -> None:  # no other ranks to lose
        pass

    def shutdown(self) -> None:
        self.shut_down = True

    def step(self) -> list[RequestOutput]:
        self.hold.wait()
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("boom")
        outs = []
        for rid, (_, params, tokens) in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= params.max_tokens
            outs.append(self._output(rid, "length" if done else None))
            if done:
                del self.requests[rid]
        return outs

    @property
    def stats(self) -> dict:
        zero = ("prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries",
                "prefix_cache_hits", "kv_cache_usage", "kv_blocks_used", "kv_blocks_cached_free")
        waiting = sum(not tokens for _, _, tokens in self.requests.values())  # no step yet
        return {**dict.fromkeys(zero, 0), "num_running": len(self.requests) - waiting,
                "num_waiting": waiting, "kv_blocks_total": 8}


def launch(engine: Scripted, **kw) -> AsyncEngine:
    return AsyncEngine.launch(lambda: engine, lambda e: Metrics(e.model_name, 64), **kw)


async def collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def sample(aengine: AsyncEngine, name: str, **labels) -> float:
    value = aengine.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_requests_stream_their_outputs_and_the_metrics_count_them():
    aengine = launch(Scripted())
    try:
        async def run():
            a = await aengine.add_request("a", [1, 2], SamplingParams(max_tokens=3))
            b = await aengine.add_request("b", [3], SamplingParams(max_tokens=1))
            return await asyncio.gather(collect(a), collect(b))
        outs_a, outs_b = asyncio.run(run())
        assert [o.outputs[0].token_ids for o in outs_a] == [[0], [0, 1], [0, 1, 2]]
        assert outs_a[-1].finished and outs_a[-1].outputs[0].finish_reason == "length"
        assert len(outs_b) == 1 and outs_b[0].finished
        labels = {"model_name": "scripted"}
        assert sample(aengine, "kvserve:request_success_total", finished_reason="length",
                      **labels) == 2
        assert sample(aengine, "kvserve:time_to_first_token_seconds_count", **labels) == 2
        # a's 2nd and 3rd tokens; b had one
        assert sample(aengine, "kvserve:inter_token_latency_seconds_count", **labels) == 2
        assert sample(aengine, "kvserve:request_generation_tokens_sum", **labels) == 4
        assert sample(aengine, "kvserve:request_queue_time_seconds_count", **labels) == 2
        assert aengine.num_unfinished == 0
    finally:
        aengine.stop()
    assert aengine.engine.shut_down  # stop() lets the engine stop its other ranks


def test_a_refusal_and_a_timeout():
    aengine = launch(Scripted(), request_timeout=1e-9)
    try:
        async def run():
            with pytest.raises(ValueError, match="empty"):  # the engine's own refusal
                await aengine.add_request("e", [], SamplingParams())
            # past its deadline at once: aborted before any step, finish_reason "timeout"
            outs = await collect(await aengine.add_request("t", [1], SamplingParams()))
            assert [o.outputs[0].finish_reason for o in outs] == ["timeout"]
        asyncio.run(run())
        assert sample(aengine, "kvserve:request_success_total", finished_reason="timeout",
                      model_name="scripted") == 1
    finally:
        aengine.stop()


def test_a_full_queue_and_a_drain():
    engine = Scripted()
    aengine = launch(engine, max_queue=1)
    try:
        async def run():
            engine.hold.clear()  # the thread stops in its next step: "w" stays waiting
            waiting = await aengine.add_request("w", [1], SamplingParams(max_tokens=10 ** 9))
            with pytest.raises(QueueFull):  # --max-queue 1
                await aengine.add_request("q", [1], SamplingParams())
            engine.hold.set()
            assert await aengine.drain(timeout=0.0) == 1  # "w" runs on: aborted
            outs = await collect(waiting)
            assert outs[-1].outputs[0].finish_reason == "abort"
            with pytest.raises(Draining):
                await aengine.add_request("d", [1], SamplingParams())
        asyncio.run(run())
        assert aengine.num_unfinished == 0
    finally:
        aengine.stop()


def test_a_failed_step_ends_every_stream_and_the_engine():
    failures = []
    aengine = launch(Scripted(fail_at=2))
    aengine.on_failure = failures.append
    try:
        async def run():
            stream = await aengine.add_request("a", [1], SamplingParams(max_tokens=5))
            outs = []
            with pytest.raises(EngineDead, match="boom"):
                async for out in stream:
                    outs.append(out)
            assert len(outs) == 1  # the first step's token, then the failure
            with pytest.raises(EngineDead):
                await aengine.add_request("b", [1], SamplingParams())
        asyncio.run(run())
    finally:
        aengine.stop()  # joins the thread: the failure callback has run
    assert not aengine.healthy and isinstance(aengine.error, RuntimeError)
    assert [str(e) for e in failures] == ["boom"]


def test_a_request_posted_as_the_engine_stops_hears_engine_dead():
    """The thread can stop between add_request's liveness check and its put into the inbox,
    which nobody reads then: the request must hear EngineDead, not wait forever."""
    aengine = launch(Scripted())
    aengine.stop()

    class PassesTheCheck:  # the check ran just before the thread ended
        @staticmethod
        def is_alive():
            return True
    aengine._thread = PassesTheCheck()

    async def run():
        with pytest.raises(EngineDead):
            await asyncio.wait_for(aengine.add_request("a", [1], SamplingParams()), 30)
    asyncio.run(run())
    assert aengine.num_unfinished == 0


def test_a_failed_build_is_raised_by_launch():
    def build():
        raise FileNotFoundError("no such model")
    with pytest.raises(FileNotFoundError, match="no such model"):
        AsyncEngine.launch(build)


def test_request_timing_is_the_metrics_own():
    m = Metrics("m", 64)
    timing = RequestTiming(arrival=10.0)

    def out(n, reason=None):
        return RequestOutput("r", None, [1], [CompletionOutput(0, "", list(range(n)), None,
                                                               None, reason)], bool(reason))
    m.on_output(timing, out(1), now=10.5)
    m.on_output(timing, out(1), now=10.7)   # no new token: nothing observed
    m.on_output(timing, out(3), now=11.5)   # two tokens in one step: 0.5 s each
    assert (timing.first_token, timing.last_token, timing.num_tokens) == (10.5, 11.5, 3)
    get = m.registry.get_sample_value
    labels = {"model_name": "m"}
    assert get("kvserve:time_to_first_token_seconds_sum", labels) == 0.5
    assert get("kvserve:inter_token_latency_seconds_sum", labels) == 1.0
    assert get("kvserve:inter_token_latency_seconds_count", labels) == 2
    timing.scheduled = 10.25
    m.on_finished(timing, out(3, "stop"), now=12.0)
    assert get("kvserve:e2e_request_latency_seconds_sum", labels) == 2.0
    assert get("kvserve:request_queue_time_seconds_sum", labels) == 0.25
    assert get("kvserve:request_success_total", {**labels, "finished_reason": "stop"}) == 1
