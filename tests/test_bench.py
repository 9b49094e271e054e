"""`kvserve bench`: the metrics on hand-made timings, arrivals, datasets, SSE parsing, streams
from a mock transport (llama.cpp's usage shape, no usage at all), and end to end against a
real kvserve (one server for the module, in process, on a real socket)."""
from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics

import httpx
import pytest

from clients.bench import BenchConfig, arrival_offsets, main, run_benchmark
from clients.bench_dataset import (WordTokenizer, load_jsonl, local_tokenizer, random_dataset,
                                   sample_lengths)
from clients.bench_metrics import (RequestResult, compute_metrics, latency_stats, meets_slos,
                                   parse_goodput, percentile, token_rate_series)
from clients.bench_request import parse_event, request_body
from clients.sse import sse_data


def req(i, start, ttft, e2e, itl, out, prompt=10, ok=True) -> RequestResult:
    chunks = [start + ttft]
    for gap in itl:
        chunks.append(chunks[-1] + gap)
    return RequestResult(index=i, expected_input_len=prompt, max_tokens=out, success=ok,
                         error=None if ok else "HTTP 500: boom", start=start,
                         ttft=ttft if ok else None, e2e=e2e, itl=list(itl) if ok else [],
                         chunk_times=chunks if ok else [], prompt_tokens=prompt if ok else None,
                         output_tokens=out if ok else None)


# ---------------------------------------------------------------- metrics

def test_percentile_interpolates_like_numpy():
    xs = list(range(1, 11))
    assert percentile(xs, 50) == 5.5
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    s = latency_stats([0.001, 0.002, 0.003, 0.004])      # seconds in, ms out
    assert s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5)
    assert s["p90"] == pytest.approx(3.7) and s["count"] == 4


def test_compute_metrics_on_hand_made_timings():
    results = [req(0, 0.0, 0.5, 2.0, [0.5, 0.5, 0.5], out=4, prompt=10),   # tpot 0.5
               req(1, 1.0, 1.0, 2.0, [1.0], out=2, prompt=20),              # tpot 1.0
               req(2, 1.0, 0.2, 0.2, [], out=1, prompt=5),                   # no tpot
               req(3, 2.0, 0, 1.0, [], out=0, ok=False)]
    m = compute_metrics(results, duration=4.0, slos={"ttft": 600, "tpot": 600})
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (35, 7)
    assert m["request_throughput"] == pytest.approx(3 / 4)
    assert m["output_throughput"] == pytest.approx(7 / 4)
    assert m["total_token_throughput"] == pytest.approx(42 / 4)
    assert m["ttft_ms"]["mean"] == pytest.approx((500 + 1000 + 200) / 3)
    assert m["ttft_ms"]["median"] == pytest.approx(500)
    assert m["tpot_ms"]["count"] == 2 and m["tpot_ms"]["mean"] == pytest.approx(750)
    assert m["itl_ms"]["count"] == 4 and m["itl_ms"]["mean"] == pytest.approx(625)
    assert m["e2el_ms"]["median"] == pytest.approx(2000)
    # request 0 meets both SLOs; 1 misses TTFT; 2 (one token: TPOT 0) meets both
    assert m["good_requests"] == 2 and m["request_goodput"] == pytest.approx(0.5)
    assert m["peak_concurrency"] == 3       # 0, 1 and 2 overlap in [1.0, 1.2)
    # tokens per 1 s bucket: request 0 chunks at 0.5,1.0,1.5,2.0; request 1 at 2.0,3.0; 2 at 1.2
    starts, rates = token_rate_series(results, 4.0, 1.0)
    assert starts == [0.0, 1.0, 2.0, 3.0] and rates == [1.0, 3.0, 2.0, 1.0]
    assert m["peak_output_throughput"] == 3.0
    starts, rates = token_rate_series(results, 3.5, 1.0)    # the last bucket is half a second
    assert starts == [0.0, 1.0, 2.0, 3.0] and rates == [1.0, 3.0, 2.0, 2.0]
    assert compute_metrics(results, 3.5, {})["peak_output_throughput"] == 3.0


def test_goodput_parsing_and_counting():
    assert parse_goodput(["ttft:500", "TPOT:50", "e2el:2000.5"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["ttft:-1"], ["ttft:inf"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    r = req(0, 0.0, 0.4, 1.4, [0.5, 0.5], out=3)          # ttft 400, tpot 500, e2e 1400 ms
    assert meets_slos(r, {"ttft": 400, "tpot": 500, "e2el": 1400})
    assert not meets_slos(r, {"ttft": 399})
    assert not meets_slos(r, {"tpot": 499})
    r.output_tokens = None                                  # no usage: TPOT unknown, not good
    assert not meets_slos(r, {"tpot": 10_000}) and meets_slos(r, {"ttft": 500})


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    offsets = arrival_offsets(20_000, 10.0, random.Random(0))
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)
    assert arrival_offsets(50, 10.0, random.Random(1)) == arrival_offsets(50, 10.0,
                                                                            random.Random(1))
    assert arrival_offsets(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]


def test_config_validation():
    for bad in (dict(endpoint="embeddings"), dict(num_prompts=0), dict(range_ratio=1.0),
                dict(request_rate=0), dict(max_concurrency=0), dict(goodput=("x:1",)),
                dict(warmup=-1)):
        with pytest.raises(ValueError):
            BenchConfig(**bad)
    with pytest.raises(FileNotFoundError):
        BenchConfig(dataset="/no/such/file.jsonl")


# ---------------------------------------------------------------- datasets

def test_random_lengths_stay_in_range():
    lens = sample_lengths(random.Random(0), 2000, 100, 0.25)
    assert min(lens) >= 75 and max(lens) <= 125 and len(set(lens)) > 40
    assert sample_lengths(random.Random(0), 5, 100, 0.0) == [100] * 5
    assert min(sample_lengths(random.Random(0), 100, 2, 0.9)) >= 1
    words = random_dataset(WordTokenizer(), 50, 40, 8, 0.5, seed=3)
    assert all(20 <= len(p.prompt.split()) <= 60 and 4 <= p.output_len <= 12 for p in words)
    assert len({p.prompt for p in words}) == 50
    assert [p.prompt for p in random_dataset(WordTokenizer(), 5, 40, 8, 0.5, seed=3)] == \
        [p.prompt for p in words[:5]]


def test_random_prompts_hit_the_token_length():
    tok = local_tokenizer(None)          # the default model's (cached for the e2e tests too)
    prompts = random_dataset(tok, 12, 48, 8, 0.25, seed=0)
    assert len({p.prompt for p in prompts}) == 12
    for p in prompts:
        assert 36 <= p.input_len <= 60
        assert len(tok.encode(p.prompt)) == p.input_len


def test_jsonl_loading(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}\n'
                    '{"prompt": "third"}\n')
    ps = load_jsonl(str(path), 5, output_len=7)
    assert [p.output_len for p in ps] == [5, 3, 7, 5, 3]
    assert ps[0].prompt == "hello there" and ps[1].messages[0]["content"] == "hi"
    assert ps[3] == ps[0]
    assert request_body("chat", "m", ps[2], 0.0, False)["messages"] == [
        {"role": "user", "content": "third"}]
    with pytest.raises(ValueError, match="needs --endpoint chat|--endpoint chat"):
        request_body("completions", "m", ps[1], 0.0, False)
    for bad in ('{"text": "x"}\n', 'not json\n', '{"prompt": "x", "output_len": 0}\n', ''):
        path.write_text(bad)
        with pytest.raises(ValueError):
            load_jsonl(str(path), 1, 7)


def test_request_bodies():
    from clients.bench_dataset import Prompt
    p = Prompt(prompt="abc", messages=None, output_len=9)
    body = request_body("completions", "m", p, 0.0, ignore_eos=False)
    assert body == {"model": "m", "prompt": "abc", "max_tokens": 9, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}}
    chat = request_body("chat", "m", p, 0.5, ignore_eos=True)
    assert chat["messages"] == [{"role": "user", "content": "abc"}]
    assert chat["max_completion_tokens"] == chat["max_tokens"] == 9 and chat["ignore_eos"]


# ---------------------------------------------------------------- SSE

def test_sse_parsing():
    assert sse_data("data: {}") == "{}" and sse_data("data:{}") == "{}"
    assert sse_data(": keep-alive") is None and sse_data("") is None
    assert sse_data("event: x") is None
    assert parse_event("[DONE]").done
    c = parse_event('{"choices": [{"index": 0, "text": "Hi", "finish_reason": null}]}')
    assert c.content == "Hi" and c.usage is None
    c = parse_event('{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}')
    assert c.content == ""
    c = parse_event('{"choices": [{"index": 0, "delta": {"content": " there"}}]}')
    assert c.content == " there"
    # usage on its own chunk with empty choices (OpenAI include_usage, kvserve, vLLM)
    c = parse_event('{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}')
    assert c.content == "" and c.usage["completion_tokens"] == 3
    # usage on the last chunk that still has a choice (llama.cpp's /v1/completions)
    c = parse_event('{"choices": [{"text": "!", "finish_reason": "length"}], "usage": '
                    '{"prompt_tokens": 7, "completion_tokens": 4}, "timings": {}}')
    assert c.content == "!" and c.usage["prompt_tokens"] == 7
    assert "boom" in parse_event('{"error": {"message": "boom", "code": 503}}').error
    assert parse_event("{not json").error


def _mock(events: list[str], status: int = 200):
    """An httpx.MockTransport: /v1/models lists "mock"; completions stream `events`."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "mock"}]})
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "nope", "code": status}})
        body = "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(),
                              headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler)


def _run(transport, **kw):
    cfg = BenchConfig(base_url="http://mock", tokenizer="words", warmup=0, num_prompts=3,
                      input_len=8, output_len=3, **kw)
    return asyncio.run(run_benchmark(cfg, transport=transport))


def test_llama_cpp_style_usage_and_missing_usage():
    text = '{"choices": [{"index": 0, "text": "%s", "finish_reason": null}]}'
    final = ('{"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": '
             '{"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}}')
    res = _run(_mock([text % "a", text % "b", text % "c", final]))
    m = res.metrics
    assert res.model == "mock" and m["completed"] == 3 and m["token_counts_from_usage"]
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (24, 9)
    assert all(len(r.itl) == 2 and r.ttft <= r.e2e for r in res.requests)
    assert not res.warnings
    res = _run(_mock([text % "a", final.replace('"prompt_tokens": 8', '"prompt_tokens": 20')]))
    assert any("counted 20 prompt tokens on average where 8" in w for w in res.warnings)

    res = _run(_mock([text % "a", text % "b"]))                     # no usage anywhere
    m = res.metrics
    assert m["completed"] == 3 and not m["token_counts_from_usage"]
    assert m["total_output_tokens"] is None and m["output_throughput"] is None
    assert m["total_output_chunks"] == 6 and m["tpot_ms"]["count"] == 0
    assert any("no `usage`" in w for w in res.warnings)
    report = res.report()
    assert "n/a (no usage from the server)" in report and "WARNING" in report

    res = _run(_mock([text % "a", '{"error": {"message": "engine died"}}']))
    assert res.metrics["failed"] == 3 and "engine died" in res.requests[0].error

    res = _run(_mock([], status=429))
    assert res.metrics["failed"] == 3 and res.requests[0].error == "HTTP 429: nope"


def test_a_request_past_the_timeout_fails_alone(tmp_path):
    async def handler(request: httpx.Request) -> httpx.Response:
        if "slow" in request.content.decode():
            await asyncio.sleep(5)
        body = 'data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, content=body.encode())
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fast"}\n{"prompt": "slow"}\n{"prompt": "fast"}\n')
    cfg = BenchConfig(base_url="http://mock", model="m", dataset=str(path), warmup=0,
                      num_prompts=3, timeout=0.3)
    res = asyncio.run(run_benchmark(cfg, transport=httpx.MockTransport(handler)))
    assert [r.success for r in res.requests] == [True, False, True]
    assert res.requests[1].error == "timed out after 0.3s"


# ---------------------------------------------------------------- a real kvserve

@pytest.fixture(scope="module")
def url():
    """The base URL of `kvserve serve`'s app and engine in this process, served by uvicorn on
    a thread: the benchmark takes a URL, and times the chunks as they stream."""
    from server_utils import InProcessServer
    with InProcessServer() as srv, srv.listening() as base_url:
        yield base_url


def test_end_to_end_cli(url, tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--base-url", url, "--num-prompts", "6", "--input-len", "32",
               "--output-len", "8", "--ignore-eos", "--max-concurrency", "3", "--seed", "5",
               "--warmup", "0",
               "--goodput", "ttft:600000", "e2el:600000", "--no-progress",
               "--save-result", str(out_json), "--plot", str(out_png)])
    report = capsys.readouterr().out
    assert rc == 0, report
    assert "Serving Benchmark Result" in report and "Request goodput (req/s)" in report
    d = json.loads(out_json.read_text())
    assert {"config", "model", "tokenizer", "metrics", "requests", "errors",
            "warnings"} <= d.keys()
    m = d["metrics"]
    assert (m["completed"], m["failed"]) == (6, 0)
    assert m["total_output_tokens"] == 6 * 8 and m["token_counts_from_usage"]
    assert m["good_requests"] == 6 and m["peak_concurrency"] <= 3
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert {"mean", "median", "p90", "p99"} <= m[key].keys()
    # the prompts the run sent, rebuilt from the seed, as the server counts them
    prompts = random_dataset(local_tokenizer(None), 6, 32, 8, 0.0, seed=5)
    for r, p in zip(d["requests"], prompts):
        assert r["output_tokens"] == 8 and r["ttft"] <= r["e2e"]
        counted = httpx.post(url + "/tokenize", json={"prompt": p.prompt}).json()["count"]
        assert r["prompt_tokens"] == counted == r["expected_input_len"]
        # kvserve streams a token per chunk, except that the pieces of one character wait
        assert len(r["itl"]) == len(r["chunk_times"]) - 1 <= r["output_tokens"] - 1
    assert sum(len(r["itl"]) for r in d["requests"]) >= 6 * 7 - 6   # mostly a token a chunk
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"


def test_failures_are_counted_not_raised(url, capsys):
    rc = main(["--base-url", url, "--model", "no-such-model", "--num-prompts", "3",
               "--input-len", "8", "--output-len", "2", "--no-progress", "--tokenizer", "words"])
    report = capsys.readouterr().out
    assert rc == 1
    assert re.search(r"Successful requests:\s+0\n", report)
    assert re.search(r"Failed requests:\s+3\n", report)
    assert "warmup request failed: HTTP 404" in report and "does not exist" in report


def test_chat_with_poisson_arrivals(url):
    cfg = BenchConfig(base_url=url, endpoint="chat", num_prompts=2, input_len=16,
                      output_len=2, ignore_eos=True, request_rate=20.0, warmup=0,
                      tokenizer="server", range_ratio=0.5)
    res = asyncio.run(run_benchmark(cfg))
    assert res.metrics["completed"] == 2, res.errors()
    assert res.tokenizer == "the server's /tokenize"
    for r in res.requests:
        assert 1 <= r.output_tokens <= 3 and r.output_tokens == r.max_tokens
        assert r.prompt_tokens > r.expected_input_len    # the chat template adds tokens
        assert r.ttft <= r.e2e
    assert res.requests[1].start >= res.requests[0].start
