"""Failure handling of `kvserve serve`: client disconnects, overload, request timeouts, an
engine fault, the API key and SIGTERM.

Overload and request timeouts run in process (server_utils.InProcessServer, over
httpx.ASGITransport); what needs a real child process uses one: clients that hang up
mid-request, the exit code after an engine fault, SIGTERM (and the API key, on the process
the disconnect tests start anyway). Nothing under test is mocked. Waiting is always a poll
of a condition with a deadline, never a bare sleep.
"""
from __future__ import annotations

import ast
import asyncio
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from clients.sse import aiter_sse
from server_utils import InProcessServer, start_server

KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Write a short story about a lighthouse keeper."
SMALL = ("--kv-cache-memory", "256MiB")


# ---------------------------------------------------------------- helpers

def metrics(srv) -> dict[str, float]:
    """kvserve:* samples by name (labels other than model_name folded into the name) of a
    server_utils server (in process or not)."""
    out = {}
    with srv.client(timeout=10) as http:
        text = http.get("/metrics").text
    for line in text.splitlines():
        m = re.match(r"(kvserve:\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = ",".join(x for x in m.group(2).split(",") if not x.startswith("model_name="))
            out[m.group(1) + (f"{{{labels}}}" if labels else "")] = float(m.group(3))
    return out


def wait_until(cond, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"not within {timeout}s: {what} (last: {last!r})")


def wait_idle(srv, timeout: float = 30.0) -> dict[str, float]:
    """Running, waiting and KV usage all back to 0."""
    def idle():
        m = metrics(srv)
        busy = (m["kvserve:num_requests_running"], m["kvserve:num_requests_waiting"],
                m["kvserve:kv_cache_usage_perc"])
        return m if busy == (0, 0, 0) else None
    return wait_until(idle, timeout, "running/waiting/kv usage back to 0", 0.2)


def aborted(m: dict[str, float], reason: str = "abort") -> float:
    return m.get(f'kvserve:request_success_total{{finished_reason="{reason}"}}', 0.0)


def body(max_tokens: int, stream: bool = False, **kw) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": stream, **kw}


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["message"] and isinstance(err["message"], str)
    return err


async def read_sse(resp: httpx.Response, events: list, started: asyncio.Event | None = None):
    """Append each event's data (parsed JSON, or the string "[DONE]") to events; set `started`
    at the first."""
    async for data in aiter_sse(resp.aiter_lines()):
        events.append(data if data == "[DONE]" else json.loads(data))
        if started is not None:
            started.set()


async def stream_to_end(client: httpx.AsyncClient, url: str, payload: dict,
                        started: asyncio.Event | None = None) -> list:
    events: list = []
    async with client.stream("POST", url + "/v1/completions", json=payload) as resp:
        assert resp.status_code == 200, await resp.aread()
        await read_sse(resp, events, started)
    return events


def finish_reasons(events: list) -> list:
    return [c["finish_reason"] for e in events if isinstance(e, dict) and "choices" in e
            for c in e["choices"] if c.get("finish_reason")]


def timed_completion(srv, max_tokens: int = 16, headers=None) -> float:
    t0 = time.monotonic()
    with srv.client(timeout=120) as http:
        r = http.post("/v1/completions", json=body(max_tokens), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == max_tokens
    return time.monotonic() - t0


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit within {timeout}s") from None


# ---------------------------------------------------------------- client disconnects

@pytest.fixture(scope="module")
def server():
    """Shared by the disconnect and API-key tests (one process start fewer)."""
    with start_server(*SMALL, "--max-num-seqs", "16", "--api-key", KEY) as srv:
        yield srv


def test_stream_disconnect_storm_frees_everything(server):
    url = server.url
    baseline = timed_completion(server, headers=AUTH)
    before = metrics(server)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        chunks = 0
        async with client.stream("POST", url + "/v1/completions",
                                 json=body(400, stream=True)) as resp:
            assert resp.status_code == 200
            async for _ in aiter_sse(resp.aiter_lines()):
                chunks += 1
                if chunks >= 1 + i % 2:  # leave after the first chunk or two
                    break
        return chunks   # leaving the block closes the connection mid-stream

    async def storm():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits, headers=AUTH) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    assert all(n >= 1 for n in asyncio.run(storm()))
    after = wait_idle(server)
    # they were aborted, not run to their 400 tokens
    assert aborted(after) - aborted(before) == 50
    generated = (after["kvserve:generation_tokens_total"]
                 - before["kvserve:generation_tokens_total"])
    assert generated < 50 * 400 / 4, generated
    elapsed = timed_completion(server, headers=AUTH)
    assert elapsed < 3 * baseline + 2.0, (elapsed, baseline)


def test_non_stream_disconnect_aborts(server):
    url = server.url
    wait_idle(server)
    before = aborted(metrics(server))
    t0 = time.monotonic()
    # 2000 tokens take minutes on a CPU; the client gives up after 1.5 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body(2000), headers=AUTH,
                   timeout=httpx.Timeout(1.5))
    wait_until(lambda: aborted(metrics(server)) == before + 1, 15, "the request is aborted")
    wait_idle(server, timeout=10)
    assert time.monotonic() - t0 < 20
    # a client going away is normal: no ERROR traceback in the log for it
    log = server.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-2000:]


# ---------------------------------------------------------------- overload

def test_overload_429_and_accepted_finish():
    with InProcessServer(*SMALL, "--max-queue", "2", "--max-num-seqs", "1") as srv:
        url = srv.url

        async def one(client: httpx.AsyncClient, i: int):
            t0 = time.monotonic()
            payload = body(8, stream=i % 2 == 1, stream_options={"include_usage": True})
            if payload["stream"]:
                async with client.stream("POST", url + "/v1/completions", json=payload) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return r, None, time.monotonic() - t0
                    events: list = []
                    await read_sse(r, events)
                    return r, events, time.monotonic() - t0
            r = await client.post(url + "/v1/completions", json=payload)
            return r, None, time.monotonic() - t0

        async def flood():
            async with srv.async_client(timeout=60) as client:
                return await asyncio.wait_for(
                    asyncio.gather(*(one(client, i) for i in range(16))), 60)

        results = asyncio.run(flood())
        rejected = [(r, dt) for r, _, dt in results if r.status_code == 429]
        accepted = [(r, ev) for r, ev, _ in results if r.status_code == 200]
        assert len(rejected) + len(accepted) == len(results), [r.status_code for r, *_ in results]
        assert rejected and len(accepted) >= 2, (len(rejected), len(accepted))
        slowest_ok = max(dt for r, _, dt in results if r.status_code == 200)
        for r, dt in rejected:
            err = assert_openai_error(r, 429)
            assert err["code"] == 429 and err["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
            assert dt < slowest_ok  # turned away at once, not after waiting its turn
        for r, events in accepted:
            if events is None:
                out = r.json()
                assert out["choices"][0]["finish_reason"] == "length"
                assert out["usage"]["completion_tokens"] == 8
            else:
                assert events[-1] == "[DONE]"
                assert finish_reasons(events) == ["length"]
                assert events[-2]["usage"]["completion_tokens"] == 8
        wait_idle(srv)
        timed_completion(srv, 4)  # still serving


# ---------------------------------------------------------------- request timeout

def test_request_timeout_non_stream_and_stream():
    with InProcessServer(*SMALL, "--request-timeout", "1") as srv, srv.client() as http:
        url = srv.url
        t0 = time.monotonic()
        r = http.post(url + "/v1/completions", json=body(2000), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "timeout"
        assert 0 < r.json()["usage"]["completion_tokens"] < 2000
        assert time.monotonic() - t0 < 10

        async def streamed():
            async with srv.async_client(timeout=60) as client:
                return await stream_to_end(client, url, body(2000, stream=True))
        events = asyncio.run(streamed())
        assert events[-1] == "[DONE]"
        assert finish_reasons(events) == ["timeout"]

        m = wait_idle(srv, timeout=10)
        assert aborted(m, "timeout") == 2
        timed_completion(srv, 4)  # keeps serving, and short requests are not cut


# ---------------------------------------------------------------- engine fault

def test_engine_fault_fails_requests_and_health():
    with start_server(*SMALL, env={"KVSERVE_FAULT_AT_STEP": "25"}) as srv:
        url = srv.url

        async def in_flight():
            async with httpx.AsyncClient(timeout=60) as client:
                started = [asyncio.Event(), asyncio.Event()]
                streams = [asyncio.ensure_future(
                    stream_to_end(client, url, body(1000, stream=True), ev)) for ev in started]
                plain = asyncio.ensure_future(
                    client.post(url + "/v1/completions", json=body(1000)))
                await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 30)
                return await asyncio.wait_for(asyncio.gather(*streams, plain), 60)

        *stream_events, plain = asyncio.run(in_flight())
        for events in stream_events:
            assert any("choices" in e for e in events if isinstance(e, dict))
            errors = [e for e in events if isinstance(e, dict) and "error" in e]
            assert len(errors) == 1 and errors[0]["error"]["message"], events[-3:]
            assert set(errors[0]["error"]) >= {"message", "type", "param", "code"}
            assert "finish_reason" not in json.dumps(events[-1])
        assert_openai_error(plain, 503)
        # then the server shuts itself down with a non-zero exit code (it used to stay up
        # answering 503 and exit 0 on SIGTERM, so a supervisor never saw the failure)
        assert wait_exit(srv.proc, 30) == 1
        log = srv.log()
        assert "injected engine fault" in log
        assert "the engine failed" in log and "exit code 1" in log


# ---------------------------------------------------------------- API key

ROUTES = [("GET", "/v1/models", None), ("GET", "/version", None),
          ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
          ("POST", "/v1/chat/completions",
           {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
          ("POST", "/tokenize", {"prompt": "Hi"}),
          ("POST", "/detokenize", {"tokens": [19556]})]
BAD_AUTH = [None, "", "Bearer", "Bearer wrong", "Bearer secreT", "Bearer secret2",
            "Basic secret", "Token secret", "secret", "Bearersecret"]


def test_api_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/health", "/metrics"):
            assert c.get(path).status_code == 200
        for method, path, payload in ROUTES + [("GET", "/no/such/route", None)]:
            for auth in BAD_AUTH:
                headers = {"Authorization": auth} if auth is not None else {}
                r = c.request(method, path, json=payload, headers=headers)
                err = assert_openai_error(r, 401)
                assert err["type"] == "authentication_error", (path, auth)
        for method, path, payload in ROUTES:
            r = c.request(method, path, json=payload, headers=AUTH)
            assert r.status_code == 200, (path, r.text)


def test_api_key_compared_in_constant_time():
    """The code that reads the Authorization header compares with hmac.compare_digest and
    never with == / != (which return at the first differing byte)."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "server" / "middleware.py").read_text())
    checks = [node for node in ast.walk(tree)
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              and "authorization" in ast.unparse(node).lower()
              and not any(isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))
                          for inner in ast.walk(node) if inner is not node)]
    assert checks, "no function reads the Authorization header"
    for fn in checks:
        calls = [ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)]
        assert "hmac.compare_digest" in calls, fn.name
        for cmp in (n for n in ast.walk(fn) if isinstance(n, ast.Compare)):
            names = ast.unparse(cmp).lower()
            plain = any(isinstance(op, (ast.Eq, ast.NotEq)) for op in cmp.ops)
            assert not (plain and ("key" in names or "token" in names)), ast.unparse(cmp)


# ---------------------------------------------------------------- SIGTERM

def _sigterm_case(shutdown_timeout: float, max_tokens: int, signals: int = 1):
    """Three streams in flight, then SIGTERM (`signals` times once draining): returns their
    events, what new requests and /health got while draining, the exit code and the time
    from signal to exit."""
    with start_server(*SMALL, "--shutdown-timeout", str(shutdown_timeout)) as srv:
        url = srv.url

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                started = [asyncio.Event() for _ in range(3)]
                payload = body(max_tokens, stream=True, stream_options={"include_usage": True})
                streams = [asyncio.ensure_future(stream_to_end(client, url, payload, ev))
                           for ev in started]
                await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 30)
                t_signal = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)

                async def health_is_503():
                    while (await client.get(url + "/health")).status_code != 503:
                        await asyncio.sleep(0.05)
                await asyncio.wait_for(health_is_503(), 10)
                refused = await client.post(url + "/v1/completions", json=body(4))
                for _ in range(signals - 1):
                    srv.proc.send_signal(signal.SIGTERM)
                events = await asyncio.wait_for(asyncio.gather(*streams), 60)
                return events, refused, t_signal

        events, refused, t_signal = asyncio.run(run())
        rc = wait_exit(srv.proc, shutdown_timeout + 15)
        return events, refused, rc, time.monotonic() - t_signal


def _assert_aborted_cleanly(events, refused, rc: int, max_tokens: int) -> None:
    """New requests were refused while draining; every stream ended with finish_reason
    "abort", its usage and [DONE]; the process exited 0."""
    assert_openai_error(refused, 503)
    for ev in events:
        assert ev[-1] == "[DONE]"
        assert finish_reasons(ev) == ["abort"]
        assert ev[-2]["usage"]["completion_tokens"] < max_tokens
    assert rc == 0


def test_sigterm_aborts_streams_past_shutdown_timeout():
    events, refused, rc, exit_after = _sigterm_case(shutdown_timeout=3, max_tokens=2000)
    _assert_aborted_cleanly(events, refused, rc, max_tokens=2000)
    assert 3 <= exit_after < 3 + 15


def test_second_sigterm_aborts_at_once_and_streams_still_end():
    """A second SIGTERM while draining: no more waiting for the 60 s, but every stream still
    gets finish_reason "abort", its usage and [DONE] (they used to be cut off mid-stream)."""
    events, refused, rc, exit_after = _sigterm_case(shutdown_timeout=60, max_tokens=2000,
                                                    signals=2)
    _assert_aborted_cleanly(events, refused, rc, max_tokens=2000)
    assert exit_after < 20


def test_sigterm_lets_short_streams_finish():
    events, refused, rc, exit_after = _sigterm_case(shutdown_timeout=60, max_tokens=24)
    assert_openai_error(refused, 503)
    for ev in events:
        assert ev[-1] == "[DONE]"
        assert finish_reasons(ev) == ["length"]
        assert ev[-2]["usage"]["completion_tokens"] == 24
    assert rc == 0
    assert exit_after < 30  # the requests took seconds: it did not wait out the 60 s
