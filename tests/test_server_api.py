"""The OpenAI-compatible HTTP API of `kvserve serve` on the default model, in process.

One engine and app are shared by the whole module (loading takes seconds), reached through
httpx.ASGITransport (server_utils.InProcessServer: no uvicorn, no socket); generation
requests keep max_tokens small because the CPU engine makes ~100-200 tokens/s in all.
"""
from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest

from clients.sse import iter_sse
from server_utils import InProcessServer

MAX_MODEL_LEN = 1024
CHAT = [{"role": "user", "content": "Name three colors."}]
EMOJI_CHAT = [{"role": "user", "content": "Write three emoji about cats."}]


@pytest.fixture(scope="module")
def server():
    with InProcessServer("--max-num-seqs", "16", "--max-model-len", str(MAX_MODEL_LEN)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client(timeout=120.0) as c:
        yield c


@pytest.fixture(scope="module")
def llm():
    from engine import LLM
    return LLM(dtype="float32", device="cpu", kv_cache_memory="64MiB",
               max_model_len=MAX_MODEL_LEN)


def post_ok(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, param: str | None = "<any>") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param != "<any>":
        assert err["param"] == param, err
    return err


def sse_events(r: httpx.Response) -> list[dict]:
    """A whole SSE body, its framing checked: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`."""
    assert r.status_code == 200, r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    raw = r.read().decode("utf-8")
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    blocks = blocks[:-1]
    assert blocks[-1] == "data: [DONE]"
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, repr(block)
    events = [json.loads(data) for data in list(iter_sse(raw.split("\n")))[:-1]]  # less [DONE]
    assert events and all("error" not in e for e in events), events
    return events


def stream(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        return sse_events(r)


def joined_text(events: list[dict], chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            piece = c["delta"].get("content") or "" if chat else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + piece
    return texts


def finish_reasons(events: list[dict]) -> dict[int, str]:
    return {c["index"]: c["finish_reason"] for e in events for c in e["choices"]
            if c["finish_reason"]}


# ---------------------------------------------------------------- simple routes


def test_models_health_version(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (m,) = models["data"]
    assert m["object"] == "model" and m["id"] == "SmolLM2-135M-Instruct"
    assert client.get("/health").status_code == 200
    v = client.get("/version")
    assert v.status_code == 200 and isinstance(v.json()["version"], str)


def test_tokenize_detokenize_round_trip(client, llm):
    text = "Hello world, héllo wörld 🐱!"
    tok = post_ok(client, "/tokenize", {"prompt": text})
    assert tok["tokens"] == llm.get_tokenizer().encode(text)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_MODEL_LEN
    back = post_ok(client, "/detokenize", {"tokens": tok["tokens"]})
    assert back["prompt"].endswith(text)

    chat = post_ok(client, "/tokenize", {"messages": CHAT})
    assert chat["tokens"] == llm.get_tokenizer().apply_chat_template(CHAT)
    back = post_ok(client, "/detokenize", {"tokens": chat["tokens"]})["prompt"]
    assert "Name three colors." in back and back.rstrip().endswith("assistant")

    assert_error(client.post("/tokenize", json={}), 400, "prompt")
    assert_error(client.post("/detokenize", json={"tokens": [10 ** 9]}), 400, "tokens")


# ---------------------------------------------------------------- completions


def test_completion_text_prompt_and_usage(client):
    r = post_ok(client, "/v1/completions",
                {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert r["model"] == "SmolLM2-135M-Instruct" and isinstance(r["created"], int)
    (c,) = r["choices"]
    assert c["index"] == 0 and isinstance(c["text"], str) and c["text"]
    assert c["finish_reason"] in ("length", "stop") and c["logprobs"] is None
    u = r["usage"]
    assert u["prompt_tokens"] == 5 and 1 <= u["completion_tokens"] <= 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_completion_prompt_list_n_and_token_ids(client, llm):
    prompts = ["One, two, three,", "The sky is"]
    r = post_ok(client, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 3,
                                            "temperature": 0.8, "seed": 7})
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]  # prompt i, sample j: i * n + j
    tok = llm.get_tokenizer()
    assert r["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    assert 4 <= r["usage"]["completion_tokens"] <= 12  # 4 choices, 1 to 3 tokens each

    # greedy choices of prompt i equal a single-prompt request for it, given as token ids
    r = post_ok(client, "/v1/completions", {"prompt": prompts, "max_tokens": 3, "temperature": 0})
    for i, p in enumerate(prompts):
        one = post_ok(client, "/v1/completions",
                      {"prompt": tok.encode(p), "max_tokens": 3, "temperature": 0})
        assert one["usage"]["prompt_tokens"] == len(tok.encode(p))
        assert one["choices"][0]["text"] == r["choices"][i]["text"]


def test_completion_n_with_seed_is_reproducible(client):
    body = {"prompt": "Once upon a time", "n": 2, "max_tokens": 6, "temperature": 1.0,
            "seed": 1234}
    a = post_ok(client, "/v1/completions", body)
    b = post_ok(client, "/v1/completions", body)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1]


def test_completion_echo(client):
    prompt = "Roses are red,"
    r = post_ok(client, "/v1/completions", {"prompt": prompt, "max_tokens": 3,
                                            "temperature": 0, "echo": True})
    plain = post_ok(client, "/v1/completions", {"prompt": prompt, "max_tokens": 3,
                                                "temperature": 0})
    assert r["choices"][0]["text"] == prompt + plain["choices"][0]["text"]


def test_completion_logprobs_match_offline_engine(client, llm):
    from engine import SamplingParams
    prompt, k = "The quick brown fox", 3
    r = post_ok(client, "/v1/completions", {"prompt": prompt, "max_tokens": 4,
                                            "temperature": 0, "logprobs": k})
    c = r["choices"][0]
    lp = c["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n = r["usage"]["completion_tokens"]
    assert n == 4 and all(len(lp[key]) == n for key in lp)
    assert "".join(lp["tokens"]) == c["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]

    (ref,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=k),
                          use_tqdm=False)
    out = ref.outputs[0]
    assert c["text"] == out.text
    for i, (tid, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        chosen = entry[tid]
        assert lp["tokens"][i] == chosen.decoded_token
        assert lp["token_logprobs"][i] == pytest.approx(chosen.logprob, abs=1e-3)
        top = lp["top_logprobs"][i]
        ref_top = {e.decoded_token: e.logprob for e in entry.values()
                   if e.rank is not None and e.rank <= k}
        assert len(top) == k  # greedy: the chosen token is the top-1
        assert set(top) == set(ref_top)
        for piece, value in ref_top.items():
            assert top[piece] == pytest.approx(value, abs=1e-3)
        assert max(top.values()) == pytest.approx(lp["token_logprobs"][i], abs=1e-6)


def test_completion_stop_string(client):
    body = {"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}
    full = post_ok(client, "/v1/completions", body)["choices"][0]["text"]
    assert " 6" in full, full  # the test needs the stop string inside the free continuation
    r = post_ok(client, "/v1/completions", {**body, "stop": [" 6"]})
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == " 6"
    assert c["text"] == full[:full.index(" 6")]


def test_completion_best_of_rejected(client):
    r = client.post("/v1/completions", json={"prompt": "x", "n": 1, "best_of": 2})
    assert_error(r, 400, "best_of")
    post_ok(client, "/v1/completions", {"prompt": "x", "n": 1, "best_of": 1, "max_tokens": 1})


# ---------------------------------------------------------------- chat


def test_chat_uses_chat_template(client, llm):
    r = post_ok(client, "/v1/chat/completions",
                {"messages": CHAT, "max_completion_tokens": 4, "temperature": 0})
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    (c,) = r["choices"]
    assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
    assert c["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens"] == len(llm.get_tokenizer().apply_chat_template(CHAT))
    assert r["usage"]["completion_tokens"] == 4  # max_completion_tokens wins over max_tokens

    from engine import SamplingParams
    (ref,) = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert c["message"]["content"] == ref.outputs[0].text


def test_chat_logprobs_shape(client):
    r = post_ok(client, "/v1/chat/completions",
                {"messages": CHAT, "max_tokens": 3, "temperature": 0, "logprobs": True,
                 "top_logprobs": 2})
    c = r["choices"][0]
    content = c["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 3
    assert "".join(e["token"] for e in content) == c["message"]["content"]
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0 and isinstance(e["bytes"], list)
        assert len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        assert all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
    plain = post_ok(client, "/v1/chat/completions",
                    {"messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert plain["choices"][0]["logprobs"] is None


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("body", [
    {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0},
    {"prompt": ["Hello, my name is", "1 2 3"], "n": 2, "max_tokens": 5, "temperature": 0.9,
     "seed": 11},
    {"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": " 6"},
], ids=["greedy", "n2-seed", "stop"])
def test_completion_stream_equals_non_stream(client, body):
    full = post_ok(client, "/v1/completions", body)
    events = stream(client, "/v1/completions", body)
    assert all(e["object"] == "text_completion" for e in events)
    assert len({e["id"] for e in events}) == 1
    want = {c["index"]: c["text"] for c in full["choices"]}
    assert joined_text(events, chat=False) == want
    assert finish_reasons(events) == {c["index"]: c["finish_reason"] for c in full["choices"]}


@pytest.mark.parametrize("body", [
    {"messages": CHAT, "max_tokens": 6, "temperature": 0},
    {"messages": CHAT, "n": 2, "max_tokens": 5, "temperature": 0.9, "seed": 5},
    {"messages": [{"role": "user", "content": "Count from 1 to 10 with commas."}],
     "max_tokens": 20, "temperature": 0, "stop": ["4"]},
], ids=["greedy", "n2-seed", "stop"])
def test_chat_stream_equals_non_stream(client, body):
    full = post_ok(client, "/v1/chat/completions", body)
    events = stream(client, "/v1/chat/completions", body)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    first = events[0]["choices"]
    assert all(c["delta"].get("role") == "assistant" for c in first)
    want = {c["index"]: c["message"]["content"] for c in full["choices"]}
    assert joined_text(events, chat=True) == want
    assert finish_reasons(events) == {c["index"]: c["finish_reason"] for c in full["choices"]}
    if "stop" in body:
        assert full["choices"][0]["finish_reason"] == "stop"


def test_stream_include_usage(client):
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0,
            "stream_options": {"include_usage": True}}
    events = stream(client, "/v1/completions", body)
    last = events[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 1 and last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == 4
    assert all("usage" not in e or e["usage"] is None for e in events[:-1])

    chat = stream(client, "/v1/chat/completions",
                  {"messages": CHAT, "max_tokens": 2, "stream_options": {"include_usage": True}})
    assert chat[-1]["choices"] == [] and chat[-1]["usage"]["completion_tokens"] == 2


def test_stream_never_splits_utf8(client):
    body = {"messages": EMOJI_CHAT, "max_tokens": 12, "temperature": 0}
    full = post_ok(client, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    assert any(ord(ch) > 0x7FF for ch in full), full  # has multi-byte characters to split
    assert "\ufffd" not in full
    events = stream(client, "/v1/chat/completions", body)
    deltas = [c["delta"].get("content") or "" for e in events for c in e["choices"]]
    # logprobs carry each token's own bytes, even for a token that is part of a character
    lp = post_ok(client, "/v1/chat/completions", {**body, "logprobs": True})
    content = lp["choices"][0]["logprobs"]["content"]
    assert bytes(b for e in content for b in e["bytes"]).decode() == full
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == full

    jp = {"prompt": "日本の首都は", "max_tokens": 10, "temperature": 0}
    text = post_ok(client, "/v1/completions", jp)["choices"][0]["text"]
    events = stream(client, "/v1/completions", jp)
    deltas = [c["text"] for e in events for c in e["choices"]]
    if "\ufffd" not in text:
        assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_p", 2), ("top_k", 0), ("min_p", 2), ("n", 0),
    ("max_tokens", 0), ("stop", ""), ("stop", ["ok", ""]), ("logprobs", 21),
    ("presence_penalty", 3), ("repetition_penalty", 0), ("min_tokens", -1),
])
def test_completion_bad_values(client, field, value):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, field: value})
    assert_error(r, 400, field)


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("n", 0), ("max_tokens", 0),
    ("max_completion_tokens", 0), ("top_logprobs", 21), ("stop", ""),
])
def test_chat_bad_values(client, field, value):
    body = {"messages": CHAT, "logprobs": True, field: value}
    assert_error(client.post("/v1/chat/completions", json=body), 400, field)


def test_extreme_values_never_break_the_engine(client):
    """Schema-valid extremes that once overflowed the sampler or beam scores and killed the
    engine thread (every later request 503): now greedy or a 400, and the server stays up."""
    body = {"prompt": "The capital of France is", "max_tokens": 3}
    greedy = post_ok(client, "/v1/completions", {**body, "temperature": 0})["choices"][0]["text"]
    for t in (1e-300, 1e-45):
        r = post_ok(client, "/v1/completions", {**body, "temperature": t, "top_k": 5})
        assert r["choices"][0]["text"] == greedy
    for field, value in [("repetition_penalty", 1e-300), ("repetition_penalty", 1e308),
                         ("length_penalty", 1e308), ("length_penalty", -1e308)]:
        r = client.post("/v1/completions", json={**body, field: value, "use_beam_search": True,
                                                 "n": 2})
        assert_error(r, 400, field)
    post_ok(client, "/v1/completions", {**body, "use_beam_search": True, "n": 2,
                                        "length_penalty": 10.0, "repetition_penalty": 0.01})
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_numbers(client, literal, field):
    raw = '{"prompt": "x", "max_tokens": 2, "%s": %s}' % (field, literal)
    r = client.post("/v1/completions", content=raw,
                    headers={"content-type": "application/json"})
    assert_error(r, 400, field)


def test_context_limits_name_the_numbers(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10 ** 12})
    err = assert_error(r, 400, "max_tokens")
    assert str(MAX_MODEL_LEN) in err["message"] and str(10 ** 12) in err["message"]

    long_prompt = [42] * (MAX_MODEL_LEN + 5)
    r = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
    err = assert_error(r, 400, "prompt")
    assert str(MAX_MODEL_LEN) in err["message"] and str(MAX_MODEL_LEN + 5) in err["message"]

    long_chat = [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 50)}]
    r = client.post("/v1/chat/completions", json={"messages": long_chat})
    err = assert_error(r, 400)
    assert str(MAX_MODEL_LEN) in err["message"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 1.5}, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "perhaps"}, "stream"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": [10 ** 9]}, "prompt"),
    ("/v1/chat/completions", {"messages": "x"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages"),
])
def test_wrong_types_and_missing_fields(client, path, body, param):
    assert_error(client.post(path, json=body), 400, param)


@pytest.mark.parametrize("raw", ['{"prompt": "x"', "not json", "[1, 2]", '"x"', ""])
def test_malformed_body(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, None)


def test_unknown_model_and_routes(client):
    err = assert_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
                       404, "model")
    assert "gpt-9" in err["message"]
    assert_error(client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT}),
                 404, "model")
    r = client.get("/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    assert_error(client.get("/v1/chat/completions"), 405)
    assert_error(client.get("/no/such/route"), 404)
    assert_error(client.post("/v1/models"), 405)


# ---------------------------------------------------------------- metrics


def _generation_tokens(client) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("kvserve:generation_tokens_total"))


def test_metrics_after_requests(client):
    before = _generation_tokens(client)
    post_ok(client, "/v1/completions", {"prompt": "Metrics please", "max_tokens": 2,
                                        "ignore_eos": True})
    # the counters are updated before the response is released, so a scrape right after it
    # already has its tokens
    assert _generation_tokens(client) == before + 2
    text = client.get("/metrics").text
    assert "_created" not in text
    for name in ("kvserve:num_requests_running", "kvserve:kv_cache_usage_perc",
                 "kvserve:time_to_first_token_seconds", "kvserve:prompt_tokens_total",
                 "kvserve:prefix_cache_hits_total", "kvserve:request_success_total"):
        assert f"\n{name}" in text, name
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    assert any(k.startswith("kvserve:prompt_tokens_total") and v > 0 for k, v in samples.items())
    assert any(k.startswith("kvserve:request_success_total") and v > 0
               for k, v in samples.items())
    assert any(k.startswith("kvserve:time_to_first_token_seconds_count") and v > 0
               for k, v in samples.items())
    assert all(math.isfinite(v) for v in samples.values())


# ---------------------------------------------------------------- the official SDK


def test_openai_sdk(server):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                    http_client=server.client())
    (model,) = client.models.list().data
    c = client.completions.create(model=model.id, prompt="Hello, my name is", max_tokens=4,
                                  temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 4
    chunks = list(client.completions.create(model=model.id, prompt="Hello, my name is",
                                            max_tokens=4, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text

    chat = client.chat.completions.create(model=model.id, messages=CHAT, max_tokens=4,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    text = chat.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model=model.id, messages=CHAT, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == 4

    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model.id, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_openai_async_sdk_streaming(server):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                             http_client=server.async_client())

        async def one(prompt):
            s = await client.chat.completions.create(
                model="SmolLM2-135M-Instruct", max_tokens=4, temperature=0, stream=True,
                messages=[{"role": "user", "content": prompt}])
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
        try:
            return await asyncio.gather(one("Hi!"), one("Name a fruit."), one("Say yes."))
        finally:
            await client.close()
    texts = asyncio.run(main())
    assert all(isinstance(t, str) and t for t in texts)


# ---------------------------------------------------------------- schemathesis
#
# schemathesis' own pytest loader (`schemathesis.pytest.from_fixture`) fails on pytest 9
# ("'Function' object has no attribute '_nodeid'"), so each operation's cases are drawn
# from `operation.as_strategy(mode)` under hypothesis directly.

OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/version"),
              ("GET", "/v1/models"), ("GET", "/tokenizer_info"), ("POST", "/tokenize"),
              ("POST", "/detokenize"), ("GET", "/v1/kv/state"),
              ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
GENERATION = ("/v1/completions", "/v1/chat/completions")
QUERIES = ("/v1/kv/state",)  # the GETs that take input (a query parameter)


@pytest.fixture(scope="module")
def api_schema(server):
    """The app's spec; its cases are sent to the app in process (schemathesis' ASGI client)."""
    import schemathesis
    from schemathesis.python.asgi import shutdown_lifespans
    yield schemathesis.openapi.from_asgi("/openapi.json", server.app)
    shutdown_lifespans()  # schemathesis keeps each app it served until then: let ours go


def openapi_checks():
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   negative_data_rejection,
                                                   response_headers_conformance,
                                                   response_schema_conformance,
                                                   status_code_conformance)
    return [not_a_server_error, status_code_conformance, content_type_conformance,
            response_schema_conformance, response_headers_conformance, negative_data_rejection]


def keep_generation_short(case) -> None:
    """Cap a valid token budget at 2 so random bodies finish fast on a CPU; values the
    server must reject (0, negative, past the context, wrong types) are left as they are."""
    body = case.body
    if case.path not in GENERATION or not isinstance(body, dict):
        return
    keys = ["max_tokens"] + (["max_completion_tokens"] if case.path.endswith("chat/completions")
                             else [])
    if all(body.get(k) is None for k in keys):  # absent or null: up to the context length
        body["max_tokens"] = 2
    for key in keys:
        value = body.get(key)
        if type(value) is int and 2 < value <= MAX_MODEL_LEN:
            body[key] = 2


def test_openapi_lists_every_route(api_schema):
    spec_ops = {(method.upper(), path) for path, ops in api_schema.raw_schema["paths"].items()
                for method in ops}
    assert spec_ops == set(OPERATIONS)
    for path in GENERATION:  # errors are documented in OpenAI's shape, and never as 422
        responses = api_schema.raw_schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "400", "404"} <= set(responses)


@pytest.mark.parametrize("method,path,mode", [
    (m, p, mode) for m, p in OPERATIONS
    for mode in (["positive", "negative"] if m == "POST" or p in QUERIES else ["positive"])])
def test_openapi_fuzz(api_schema, method, path, mode):
    """No 5xx on any body, schema-valid or not, and every response matches the spec."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    operation = api_schema[path][method]
    checks = openapi_checks()
    budget = 40 if path in GENERATION else 12

    @settings(max_examples=budget, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(GenerationMode(mode)))
    def run(case):
        keep_generation_short(case)
        case.call_and_validate(checks=checks, timeout=60)
    run()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a\udfffb"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2, "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": "ok", "max_tokens": 2, "stop": ["\ud800"]}, "stop"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]},
     "messages"),
])
def test_lone_surrogate_is_a_400_not_a_500(client, path, body, param):
    """JSON can carry "\\ud800", which is no Unicode text: a 400 naming the field (it was a
    plain-text 500 from the tokenizer that reset the keep-alive connection)."""
    raw = json.dumps(body).encode()  # ASCII escapes: "\ud800" as the six characters
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    err = assert_error(r, 400, param)
    assert "surrogate" in err["message"]
    post_ok(client, "/v1/completions", {"prompt": "ok", "max_tokens": 1})  # same connection


def test_metrics_tell_used_from_cached_blocks(client):
    """used + cached_free + free == total; once idle nothing is used, and a finished prompt
    of several full blocks stays behind as cached-free blocks (reusable prefix)."""
    prompt = "A long prompt whose full blocks stay in the prefix cache. " * 6
    post_ok(client, "/v1/completions", {"prompt": prompt, "max_tokens": 2})

    def scrape() -> dict[str, float]:
        out = {}
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("kvserve:") and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key.split("{")[0]] = float(value)
        return out

    deadline = time.monotonic() + 30
    m = scrape()
    while m["kvserve:num_requests_running"] > 0 and time.monotonic() < deadline:
        m = scrape()
    blocks = {k: m[f"kvserve:kv_cache_blocks_{k}"] for k in ("used", "cached_free", "free",
                                                              "total")}
    assert blocks["used"] == 0, blocks
    assert blocks["cached_free"] >= 2, blocks
    assert blocks["used"] + blocks["cached_free"] + blocks["free"] == blocks["total"] > 0
    assert m["kvserve:kv_cache_usage_perc"] == 0
    # the process's own memory, as vLLM's /metrics has it (a leak shows from outside)
    rss = [float(line.split()[1]) for line in client.get("/metrics").text.splitlines()
           if line.startswith("process_resident_memory_bytes ")]
    assert len(rss) == 1 and rss[0] > 100 * 2**20  # torch and a model are loaded


def test_a_body_that_is_not_utf8_is_a_400(client):
    """Python's json would read UTF-16/32 bodies; JSON between systems is UTF-8 (RFC 8259),
    so they are refused with a message saying so. UTF-8 with a BOM is still read."""
    body = {"prompt": "Hello", "max_tokens": 1}
    for enc in ("utf-16", "utf-16-le", "utf-32"):
        r = client.post("/v1/completions", content=json.dumps(body).encode(enc),
                        headers={"content-type": "application/json"})
        assert r.status_code == 400, (enc, r.text[:200])
        assert "must be UTF-8" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=json.dumps(body).encode("utf-8-sig"),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:200]


def test_request_body_over_the_limit_is_413(client):
    """Bodies above --max-request-bytes (4 MiB by default) get 413 in OpenAI's error shape,
    whether the size is announced (Content-Length) or only seen while reading (chunked)."""
    big = json.dumps({"prompt": "x" * (5 * 1024 * 1024), "max_tokens": 1}).encode()
    r = client.post("/v1/completions", content=big,
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == 413 and "max-request-bytes" in r.json()["error"]["message"]

    def chunks():
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]
    r = client.post("/v1/completions", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    post_ok(client, "/v1/completions", {"prompt": "still fine", "max_tokens": 1})


@pytest.mark.parametrize("extra,status,param", [
    ({"seed": 2 ** 64}, 400, "seed"),              # beyond int64: was accepted
    ({"seed": -2 ** 63 - 1}, 400, "seed"),
    ({"stop_token_ids": [10 ** 9]}, 400, "stop_token_ids"),  # beyond the vocabulary
    ({"model": ""}, 404, "model"),                 # no such model, like any other name
])
def test_out_of_range_fields_are_clear_errors(client, extra, status, param):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **extra})
    assert_error(r, status, param)


def test_int64_seed_is_accepted(client):
    post_ok(client, "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "seed": 2 ** 63 - 1,
                                        "temperature": 1.0})
