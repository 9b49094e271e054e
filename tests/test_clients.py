"""The client library (clients/) against `kvserve serve`, in process and in real processes.

`main` (plain) runs in process (server_utils.InProcessServer): over httpx.ASGITransport, and
on a real socket (uvicorn on a thread) for the tests whose client hangs up mid-request, which
ASGITransport can't. Two real processes, started together once for the module: `busy` (API
key, --max-num-seqs 1 --max-queue 1: with one request running and one waiting, held open as
streams, every new generation request is turned away with 429) and `faulty` (the engine
raises in its first step; then the process exits 1). Retries are counted with httpx event
hooks on the requests really sent; backoffs are tiny; waiting is a poll of /metrics with a
deadline, never a bare sleep.
"""
from __future__ import annotations

import asyncio
import email.utils
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest

from clients import (APIConnectionError, APITimeoutError, AsyncClient, AuthenticationError,
                     BadRequestError, Client, InternalServerError, KVServeError,
                     NotFoundError, RateLimitError, ServiceUnavailableError, backoff_delay,
                     parse_prometheus, parse_retry_after)
from clients.errors import error_from_body
from server_utils import REPO_ROOT, InProcessServer, free_port, start_server

KEY = "test-key"
MAX_LEN = ("--max-model-len", "1024")
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)
FAST = dict(backoff=0.001, max_backoff=0.01)  # retries without real waiting
RUNNING, WAITING = "kvserve:num_requests_running", "kvserve:num_requests_waiting"
COMPLETIONS = "/v1/completions"


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def main():
    """The main server's engine and app in process."""
    with InProcessServer(*MAX_LEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def servers():
    specs = {"busy": (("--api-key", KEY, "--max-num-seqs", "1", "--max-queue", "1", *MAX_LEN),
                      None),
             "faulty": (MAX_LEN, {"KVSERVE_FAULT_AT_STEP": "1"})}
    with ThreadPoolExecutor(len(specs)) as pool:  # start-up is mostly waiting: overlap it
        futures = {name: pool.submit(start_server, *args, env=env, startup_timeout=240)
                   for name, (args, env) in specs.items()}
    started, errors = {}, []
    for name, f in futures.items():
        try:
            started[name] = f.result()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are stopped
            errors.append(e)
    try:
        if errors:
            raise errors[0]
        yield SimpleNamespace(**started)
    finally:
        with ThreadPoolExecutor(len(specs)) as pool:
            list(pool.map(lambda srv: srv.stop(), started.values()))


@pytest.fixture(scope="module")
def client(main):
    with main.client(timeout=120) as http, Client(main.url, http_client=http) as c:
        yield c


@pytest.fixture(scope="module")
def socket_client(main):
    """A Client of the main server on a real socket, for tests whose client hangs up."""
    with main.listening() as url, Client(url, timeout=120) as c:
        yield c


class Sent:
    """An httpx request hook that records the path of every request really sent."""

    def __init__(self):
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)

    async def hook(self, request: httpx.Request) -> None:
        self(request)

    def count(self, path: str = COMPLETIONS) -> int:
        return self.paths.count(path)


def _http(server, cls, **kwargs):
    """(base URL, an httpx client `cls` for it) of `server`: a URL, or a server_utils server
    (in process or not), whose own client it is."""
    if isinstance(server, str):
        return server, cls(**kwargs)
    make = server.client if cls is httpx.Client else server.async_client
    return server.url, make(**kwargs)


@contextmanager
def counted(server, **kwargs):
    """A Client of `server` (see _http) whose requests are recorded: yields (client, Sent)."""
    sent = Sent()
    hooks = kwargs.pop("event_hooks", {})
    timeout = kwargs.pop("http_timeout", 120)
    url, http = _http(server, httpx.Client, timeout=timeout,
                      event_hooks={"request": [sent], **hooks})
    with http:
        yield Client(url, http_client=http, **kwargs), sent


def counted_async(server, **kwargs) -> tuple[AsyncClient, Sent]:
    sent = Sent()
    url, http = _http(server, httpx.AsyncClient, timeout=120,
                      event_hooks={"request": [sent.hook]})
    return AsyncClient(url, http_client=http, **kwargs), sent


def wait_until(cond, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def state(c: Client) -> tuple[float, float]:
    m = c.metrics()
    return m.value(RUNNING), m.value(WAITING)


def wait_idle(c: Client) -> None:
    wait_until(lambda: state(c) == (0, 0), what="running and waiting back to 0")


# ---------------------------------------------------------------- no server needed

PROM_TEXT = r"""# HELP kvserve:num_requests_running Requests in the running batch.
# TYPE kvserve:num_requests_running gauge
kvserve:num_requests_running{model_name="m"} 3.0
# HELP kvserve:request_success_total Finished requests.\nSecond line, back\\slash.
# TYPE kvserve:request_success_total counter
kvserve:request_success_total{finished_reason="length",model_name="m"} 5.0
kvserve:request_success_total{finished_reason="stop",model_name="m"} 2.0
# TYPE kvserve:ttft_seconds histogram
kvserve:ttft_seconds_bucket{le="0.1",model_name="m"} 1.0
kvserve:ttft_seconds_bucket{model_name="m",le="1.0"} 4.0
kvserve:ttft_seconds_bucket{le="+Inf",model_name="m"} 6.0
kvserve:ttft_seconds_sum{model_name="m"} 7.5
kvserve:ttft_seconds_count{model_name="m"} 6.0
# a plain comment
odd_labels{path="a \"quoted\" \\ value\nnext", empty="", trailing="x",} -Inf 1700000000000
no_labels NaN
"""


def test_prometheus_parser():
    m = parse_prometheus(PROM_TEXT)
    assert m["kvserve:num_requests_running"][0].labels == {"model_name": "m"}
    assert m.value("kvserve:num_requests_running", model_name="m") == 3.0
    assert m.value("kvserve:request_success_total") == 7.0  # summed over finish reasons
    assert m.value("kvserve:request_success_total", finished_reason="stop") == 2.0
    assert m.value("kvserve:request_success_total", finished_reason="abort", default=0) == 0
    with pytest.raises(KeyError):
        m.value("kvserve:nope")
    assert m.types["kvserve:ttft_seconds"] == "histogram"
    assert m.family("kvserve:ttft_seconds_bucket") == "kvserve:ttft_seconds"
    assert m.family("kvserve:request_success_total") == "kvserve:request_success_total"
    assert m.help["kvserve:request_success_total"].endswith("Second line, back\\slash.")
    h = m.histogram("kvserve:ttft_seconds", model_name="m")
    assert h.buckets == ((0.1, 1.0), (1.0, 4.0), (float("inf"), 6.0))
    assert (h.sum, h.count) == (7.5, 6.0)
    odd = m["odd_labels"][0]
    assert odd.labels == {"path": 'a "quoted" \\ value\nnext', "empty": "", "trailing": "x"}
    assert odd.value == float("-inf") and odd.timestamp == 1700000000000
    assert m.value("no_labels") != m.value("no_labels")  # NaN
    for bad in ("x{a=1} 2", 'x{a="1" b="2"} 3', "x", "x 1 2 3", "1x 2"):
        with pytest.raises(ValueError):
            parse_prometheus(bad)


def test_backoff_schedule_and_retry_after():
    # base * 2**attempt, upper half jittered, capped
    assert [backoff_delay(k, 0.5, 30.0, rand=1.0) for k in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff_delay(k, 0.5, 30.0, rand=0.0) for k in range(4)] == [0.25, 0.5, 1.0, 2.0]
    assert backoff_delay(10, 0.5, 30.0, rand=1.0) == 30.0
    assert 15.0 <= backoff_delay(10, 0.5, 30.0, rand=0.3) <= 30.0
    # Retry-After is a floor, still under the cap
    assert backoff_delay(0, 0.5, 30.0, retry_after=3.0, rand=1.0) == 3.0
    assert backoff_delay(4, 0.5, 30.0, retry_after=3.0, rand=1.0) == 8.0
    assert backoff_delay(0, 0.5, 30.0, retry_after=3600.0) == 30.0
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 120, usegmt=True)
    assert 118 <= parse_retry_after(date, now=now) <= 121
    assert parse_retry_after(email.utils.formatdate(now - 50, usegmt=True), now=now) == 0.0


def test_connection_refused_is_retried_then_raises():
    url = f"http://127.0.0.1:{free_port()}"
    with counted(url, model="m", max_retries=2, **FAST) as (c, sent):
        with pytest.raises(APIConnectionError) as e:
            c.completions("hi")
        assert sent.count() == 3 and e.value.attempts == 3 and e.value.status is None
        with pytest.raises(APIConnectionError):
            list(c.stream_completions("hi"))
        assert sent.count() == 6
        with pytest.raises(APIConnectionError):
            c.health()  # a probe: no retries
        assert sent.count("/health") == 1

    async def run():
        a, sent = counted_async(url, model="m", max_retries=1, **FAST)
        async with a:
            with pytest.raises(APIConnectionError):
                await a.chat(CHAT)
        return sent.count("/v1/chat/completions")
    assert asyncio.run(run()) == 2


def test_error_classes_from_bodies():
    body = {"error": {"message": "n must be >= 1", "type": "invalid_request_error",
                      "param": "n", "code": 400}}
    e = error_from_body(400, body)
    assert type(e) is BadRequestError and str(e) == \
        "[400 invalid_request_error] n must be >= 1 (param: n)"
    assert type(error_from_body(422, {"detail": "bad"})) is BadRequestError
    e = error_from_body(502, "<html>bad gateway</html>")
    assert type(e) is InternalServerError and e.message == "<html>bad gateway</html>"
    e = error_from_body(None, {"error": {"message": "engine died", "code": 503}})  # in a stream
    assert type(e) is ServiceUnavailableError and e.status == 503
    assert type(error_from_body(418, None, "I'm a teapot")) is KVServeError
    assert issubclass(APITimeoutError, APIConnectionError)


def test_client_package_imports_only_httpx():
    code = ("import sys, clients; heavy = {'torch', 'fastapi', 'engine', 'server', "
            "'prometheus_client', 'numpy', 'transformers', 'starlette'}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------- generation (main server)

def test_completion_sync_async_and_stream_agree(client, main):
    prompt_ids = client.tokenize(PROMPT)
    assert client.detokenize(prompt_ids) == PROMPT
    out = client.completions(PROMPT, **GREEDY)
    assert out.model == client.models()[0] and out.id.startswith("cmpl-")
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.text and out.text == out.raw["choices"][0]["text"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 8)
    assert out.usage.total_tokens == len(prompt_ids) + 8

    stream = client.stream_completions(PROMPT, **GREEDY)
    with stream:
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == out.text
    finishes = [d.finish_reason for c in chunks for d in c.choices if d.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == () and chunks[-1].usage == out.usage == stream.usage

    async def run():
        async with AsyncClient(client.base_url + "/v1/", http_client=main.async_client()) as a:
            full = await a.completions(PROMPT, **GREEDY)
            s = a.stream_completions(PROMPT, **GREEDY)
            async with s:
                text = "".join([c.text async for c in s])
            return full, text, s.usage
    full, text, usage = asyncio.run(run())
    assert full.text == text == out.text and usage == out.usage


def test_chat_sync_async_and_stream_agree(client, main):
    prompt_ids = client.tokenize(CHAT)
    out = client.chat(CHAT, **GREEDY)
    assert out.id.startswith("chatcmpl-") and out.choices[0].message.role == "assistant"
    assert out.content and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 8)

    stream = client.stream_chat(CHAT, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].role == "assistant"
    assert "".join(c.content for c in chunks) == out.content
    assert stream.usage == out.usage

    async def run():
        async with AsyncClient(client.base_url, http_client=main.async_client()) as a:
            full = await a.chat(CHAT, **GREEDY)
            return full, "".join([c.content async for c in a.stream_chat(CHAT, **GREEDY)])
    full, text = asyncio.run(run())
    assert full.content == text == out.content


def test_stream_deltas_by_choice_index(client):
    prompts = [PROMPT, "One, two, three,"]
    out = client.completions(prompts, max_tokens=4, temperature=0, ignore_eos=True)
    by_index: dict[int, str] = {}
    for chunk in client.stream_completions(prompts, max_tokens=4, temperature=0,
                                           ignore_eos=True, stream_options=None):
        assert chunk.usage is None  # stream_options=None: no usage chunk
        for d in chunk.choices:
            by_index[d.index] = by_index.get(d.index, "") + d.text
    assert by_index == {c.index: c.text for c in out.choices}
    assert sorted(by_index) == [0, 1] and by_index[0] != by_index[1]


def test_parameters_pass_through(client):
    out = client.completions(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp["tokens"]) == 4 and "".join(lp["tokens"]) == out.text
    stop = client.completions(PROMPT, **{**GREEDY, "ignore_eos": False}, stop=[out.text[:3]])
    assert stop.choices[0].finish_reason == "stop"
    seeded = [client.completions(PROMPT, max_tokens=4, temperature=1.0, seed=7).text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    chat = client.chat(CHAT, max_completion_tokens=3, temperature=0, ignore_eos=True,
                       logprobs=True, top_logprobs=1)
    assert chat.usage.completion_tokens == 3 and len(chat.choices[0].logprobs["content"]) == 3


def test_tokenize_models_health(client):
    assert len(client.models()) == 1
    ids = client.tokenize("hello world", add_special_tokens=False)
    assert client.detokenize(ids) == "hello world"
    with_prompt = client.tokenize(CHAT)
    without = client.tokenize(CHAT, add_generation_prompt=False)
    assert len(without) < len(with_prompt) and with_prompt[:len(without)] == without
    assert client.health() is True


def test_model_is_looked_up_once(main):
    with counted(main) as (c, sent):
        c.completions(PROMPT, max_tokens=1)
        c.stream_completions(PROMPT, max_tokens=1).close()  # never started: sends nothing
        list(c.stream_completions(PROMPT, max_tokens=1))
        assert sent.count("/v1/models") == 1 and sent.count() == 2
        assert c.model == c.models()[0]


def test_metrics_scrape(client):
    before = client.metrics()
    assert RUNNING in before and before.types[RUNNING] == "gauge"
    hist = before.histogram("kvserve:e2e_request_latency_seconds")
    client.completions(PROMPT, max_tokens=2, ignore_eos=True)
    after = client.metrics()
    assert after.histogram("kvserve:e2e_request_latency_seconds").count >= hist.count + 1
    assert after.value("kvserve:request_success_total", finished_reason="length") >= \
        before.value("kvserve:request_success_total", 0.0, finished_reason="length") + 1
    # the token counters are updated just after a step's outputs go out: poll
    tokens = before.value("kvserve:generation_tokens_total")
    wait_until(lambda: client.metric_value("kvserve:generation_tokens_total") >= tokens + 2,
               what="the generated tokens counted")
    assert client.metric_value(WAITING) == 0


def test_closing_a_stream_aborts_the_request(socket_client):
    client = socket_client  # a real connection, that the client closes mid-stream
    aborted = client.metrics().value("kvserve:request_success_total", 0.0,
                                     finished_reason="abort")
    with client.stream_completions(PROMPT, max_tokens=500, ignore_eos=True) as s:
        assert next(s).choices[0].finish_reason is None
    wait_until(lambda: client.metrics().value("kvserve:request_success_total", 0.0,
                                              finished_reason="abort") >= aborted + 1,
               what="the server aborts the request")
    wait_idle(client)


# ---------------------------------------------------------------- errors (main server)

def test_bad_request_raises_at_once_with_the_servers_message(main):
    with counted(main, **FAST) as (c, sent):
        with pytest.raises(BadRequestError) as e:
            c.completions(PROMPT, max_tokens=-1)
        err = e.value
        assert err.status == 400 and err.param == "max_tokens" and err.attempts == 1
        assert err.type == "invalid_request_error" and "greater than or equal to 0" in str(err)
        assert err.message == err.body["error"]["message"] and err.message in str(err)
        with pytest.raises(BadRequestError, match="context length"):
            c.completions(PROMPT, max_tokens=5000)
        with pytest.raises(BadRequestError) as e:  # a stream fails before its first chunk
            next(c.stream_chat(CHAT, top_logprobs=2))
        assert e.value.param == "top_logprobs"
        with pytest.raises(BadRequestError):
            c.detokenize([10 ** 9])
        assert sent.count() == 2  # never retried

    async def run():
        async with AsyncClient(main.url, http_client=main.async_client(), **FAST) as a:
            with pytest.raises(BadRequestError, match="temperature"):
                await a.completions(PROMPT, temperature=-1)
            with pytest.raises(BadRequestError):
                async for _ in a.stream_completions(PROMPT, n=0):
                    pass
    asyncio.run(run())


def test_unknown_model_is_not_found(client, main):
    with pytest.raises(NotFoundError, match="`no-such-model` does not exist") as e:
        client.completions(PROMPT, model="no-such-model", max_tokens=1)
    assert e.value.status == 404 and e.value.param == "model"
    with pytest.raises(NotFoundError):
        client.tokenize("x", model="no-such-model")
    with pytest.raises(NotFoundError):
        with Client(client.base_url, model="no-such-model", http_client=main.client()) as c:
            list(c.stream_chat(CHAT, max_tokens=1))


def test_read_timeout_is_not_retried(socket_client):
    client = socket_client  # a real connection, that the client drops at its read timeout
    model = client.models()[0]
    timeout = httpx.Timeout(0.3, connect=10.0)
    with counted(client.base_url, model=model, http_timeout=timeout, **FAST) as (c, sent):
        with pytest.raises(APITimeoutError) as e:  # the server may have started generating
            c.completions(PROMPT, max_tokens=400, ignore_eos=True)
        assert sent.count() == 1 and e.value.status is None
    wait_idle(client)  # the server noticed the hang-up and aborted it


# ---------------------------------------------------------------- API key and 429 (busy server)

def test_api_key(servers):
    url = servers.busy.url
    with counted(url, max_retries=3, **FAST) as (c, sent):
        with pytest.raises(AuthenticationError, match="API key") as e:
            c.models()
        assert e.value.status == 401 and sent.count("/v1/models") == 1  # not retried
        assert c.health() is True and c.metric_value(WAITING) == 0  # open paths
    with Client(url, "wrong") as c, pytest.raises(AuthenticationError):
        c.tokenize("x")
    with Client(url, KEY) as c:
        assert c.completions(PROMPT, max_tokens=2, ignore_eos=True).usage.completion_tokens == 2


@contextmanager
def backlog(url: str):
    """On the busy server: one long request running and one waiting, so that new generation
    requests get 429. Yields a function that hangs both up and waits until the server is
    idle (also called on exit)."""
    body = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    held: list[httpx.Response] = []
    monitor = Client(url, KEY)

    def release() -> None:
        for r in held:
            r.close()
        held.clear()
        wait_idle(monitor)

    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
        try:
            for _ in range(2):
                r = http.send(http.build_request("POST", url + COMPLETIONS, json=body),
                              stream=True)
                held.append(r)
                assert r.status_code == 200, r.read()
                # the gauges are published with the admission counters: once they show
                # the first request running, the second one is admitted (and waits)
                wait_until(lambda: state(monitor) == (1, len(held) - 1),
                           what=f"running, waiting == 1, {len(held) - 1}")
            yield release
        finally:
            release()
            monitor.close()


def test_rate_limit_is_retried_then_raised(servers):
    url = servers.busy.url
    with backlog(url), counted(url, api_key=KEY, max_retries=2, **FAST) as (c, sent):
        with pytest.raises(RateLimitError) as e:
            c.completions(PROMPT, max_tokens=2)
        err = e.value
        assert sent.count() == 3 and err.attempts == 3
        assert err.status == 429 and err.type == "rate_limit_error" and err.retry_after == 1.0
        assert "--max-queue 1" in err.message and err.message in str(err)
        with pytest.raises(RateLimitError):
            next(c.stream_completions(PROMPT, max_tokens=2))
        assert sent.count() == 6

        async def run():
            a, sent_async = counted_async(url, api_key=KEY, max_retries=1, **FAST)
            async with a:
                with pytest.raises(RateLimitError, match="retry later"):
                    await a.completions(PROMPT, max_tokens=2)
            return sent_async.count()
        assert asyncio.run(run()) == 2


def test_rate_limit_retry_succeeds_once_capacity_frees(servers):
    url = servers.busy.url
    with backlog(url) as release:
        def free_on_first_429(response: httpx.Response) -> None:
            if response.status_code == 429 and sent.count() == 1:
                release()  # both hung up and the server idle before the client retries
        with counted(url, api_key=KEY, max_retries=3, **FAST,
                     event_hooks={"response": [free_on_first_429]}) as (c, sent):
            out = c.completions(PROMPT, max_tokens=2, ignore_eos=True)
            assert out.usage.completion_tokens == 2 and sent.count() == 2


# ---------------------------------------------------------------- engine failure (faulty server)

def test_engine_failure_raises_inside_the_stream_then_the_server_is_gone(servers):
    """The engine fails in its first step: the open stream raises ServiceUnavailableError
    with the server's message; then the server shuts itself down (exit code 1), and the
    client reports a connection error after its retries."""
    srv = servers.faulty
    with counted(srv.url, max_retries=2, **FAST) as (c, sent):
        stream = c.stream_chat(CHAT, max_tokens=4)
        first = next(stream)  # the role chunk goes out before the engine's first step
        assert first.choices[0].role == "assistant"
        with pytest.raises(ServiceUnavailableError, match="injected engine fault") as e:
            next(stream)
        assert e.value.status == 503 and e.value.type == "server_error"
        assert srv.proc.wait(timeout=30) == 1
        with pytest.raises(APIConnectionError):  # health() raises when nobody answers
            c.health()
        before = sent.count()
        with pytest.raises(APIConnectionError) as e:
            c.completions(PROMPT, max_tokens=2)
        assert sent.count() - before == 3 and e.value.attempts == 3

    async def run():
        a, _ = counted_async(srv.url, max_retries=1, **FAST)
        async with a:
            with pytest.raises(APIConnectionError) as e:
                async for _ in a.stream_completions(PROMPT, max_tokens=2):
                    pass
        return e.value.attempts
    assert asyncio.run(run()) == 2  # one retry
