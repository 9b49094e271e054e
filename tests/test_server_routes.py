"""server/routes.py and server/generation.py in-process: an app built around a hand-made
ServerState whose engine answers with canned outputs or raises what the real one raises
(no model, no server process). The real engine behind these routes is tested in
test_server_api.py."""
from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI

from engine import RequestOutput
from engine.errors import ParamError
from engine.outputs import CompletionOutput
from server import generation, routes
from server.async_engine import EngineDead, QueueFull
from server.errors import install_error_handlers
from server.messages import RequestChannel, RequestStream
from server.state import ServerState
from test_server_errors import call, error_of  # tests/ is on sys.path under pytest

MAX_MODEL_LEN, VOCAB = 64, 100


class CannedEngine:
    """Stands in for AsyncEngine: each request gets `outputs(request_id)` (RequestOutputs or
    an exception that ends the stream), or add_request raises `refuse`."""

    def __init__(self, outputs=None, refuse: Exception | None = None):
        self.outputs, self.refuse = outputs, refuse
        self.added: list[tuple[str, list[int], object]] = []
        self.aborted: list[str] = []
        self.healthy, self.draining, self.error, self.metrics = True, False, None, None

    async def add_request(self, request_id, prompt, params) -> RequestStream:
        if self.refuse is not None:
            raise self.refuse
        self.added.append((request_id, prompt, params))
        channel = RequestChannel(request_id, asyncio.get_running_loop())
        for item in self.outputs(request_id):
            channel.queue.put_nowait(item)
        return RequestStream(channel, self.aborted.append)


class Letters:
    """A tokenizer stub: "a".."z" are ids 1..26; a special <s> (0) leads when asked for."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * add_special_tokens + [ord(ch) - 96 for ch in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join("<s>" if i == 0 else chr(i + 96) for i in ids)


def done(rid: str, text: str, ids: list[int], reason="length") -> RequestOutput:
    return RequestOutput(rid, None, [1, 2], [CompletionOutput(0, text, ids, None, None, reason)],
                         True)


def app_with(engine: CannedEngine, tokenizer=None) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    for router in (routes.open_router, routes.router, generation.router):
        app.include_router(router)
    app.state.server = ServerState(engine, "served", "root", tokenizer, MAX_MODEL_LEN, VOCAB,
                                   created=123)
    return app


def test_models_and_health_read_the_state():
    engine = CannedEngine()
    app = app_with(engine)
    assert call(app, "GET", "/v1/models").json()["data"] == [{
        "id": "served", "object": "model", "created": 123, "owned_by": "kvserve",
        "root": "root", "max_model_len": MAX_MODEL_LEN}]
    assert call(app, "GET", "/health").json() == {"status": "ok"}
    engine.draining = True
    assert error_of(call(app, "GET", "/health"), 503)["message"] == "shutting down"


def test_without_a_tokenizer_text_is_refused():
    app = app_with(CannedEngine())
    for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]}),
                       ("/v1/completions", {"prompt": "hi"}), ("/tokenizer_info", None)]:
        r = call(app, "POST" if body else "GET", path, json=body)
        assert "no tokenizer" in error_of(r, 400)["message"], path


def test_tokenize_and_detokenize_with_the_states_tokenizer():
    app = app_with(CannedEngine(), Letters())
    assert call(app, "POST", "/tokenize", json={"prompt": "hi"}).json() == {
        "tokens": [0, 8, 9], "count": 3, "max_model_len": MAX_MODEL_LEN}
    r = call(app, "POST", "/tokenize", json={"prompt": "hi", "add_special_tokens": False})
    assert r.json()["tokens"] == [8, 9]
    assert call(app, "POST", "/detokenize", json={"tokens": [0, 8, 9]}).json() == {
        "prompt": "<s>hi"}
    err = error_of(call(app, "POST", "/detokenize", json={"tokens": [1, VOCAB]}), 400)
    assert err["param"] == "tokens" and str(VOCAB) in err["message"]
    assert error_of(call(app, "POST", "/detokenize", json={"model": "x", "tokens": [1]}),
                    404)["param"] == "model"


def test_a_completion_collected():
    engine = CannedEngine(lambda rid: [done(rid, " world", [7, 8])])
    r = call(app_with(engine), "POST", "/v1/completions",
             json={"prompt": [1, 2], "max_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "served"
    assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [(" world", "length")]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    (rid, ids, params), = engine.added
    assert rid.startswith("cmpl-") and ids == [1, 2] and params.max_tokens == 2
    assert engine.aborted == []  # it finished: nothing to abort


def test_a_completion_streamed_and_an_engine_failure_mid_stream():
    engine = CannedEngine(lambda rid: [done(rid, "ok", [5], "stop")])
    app = app_with(engine)
    r = call(app, "POST", "/v1/completions", json={"prompt": [1, 2], "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = [json.loads(block[len("data: "):]) for block in r.text.split("\n\n")[:-2]]
    assert [(c["text"], c["finish_reason"]) for e in events for c in e["choices"]] == \
        [("ok", "stop")]

    engine.outputs = lambda rid: [EngineDead("the engine failed: boom")]
    r = call(app, "POST", "/v1/completions", json={"prompt": [1, 2], "stream": True})
    assert "[DONE]" not in r.text
    error = json.loads(r.text.split("\n\n")[0][len("data: "):])["error"]
    assert error["code"] == 503 and "boom" in error["message"]
    # without stream the same failure is a 503
    assert error_of(call(app, "POST", "/v1/completions", json={"prompt": [1, 2]}), 503)


def test_engine_refusals_become_http_errors():
    for refuse, status, param in [
            (ParamError("n", "n (40) exceeds max_num_seqs (16)"), 400, "n"),
            (ValueError("the prompt is empty"), 400, "prompt"),  # no field named: the prompt
            (QueueFull("9 requests are waiting"), 429, None),
            (EngineDead("the engine is not running"), 503, None)]:
        r = call(app_with(CannedEngine(refuse=refuse)), "POST", "/v1/completions",
                 json={"prompt": [1, 2], "max_tokens": 1})
        err = error_of(r, status)
        assert (err["param"], err["message"]) == (param, str(refuse))
        assert (r.headers.get("retry-after") == "1") == (status == 429)


def test_context_limits_come_from_engine_limits():
    app = app_with(CannedEngine(lambda rid: []))
    err = error_of(call(app, "POST", "/v1/completions",
                        json={"prompt": [1] * MAX_MODEL_LEN, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and str(MAX_MODEL_LEN) in err["message"]
    err = error_of(call(app, "POST", "/v1/completions",
                        json={"prompt": [1, 2], "max_tokens": MAX_MODEL_LEN}), 400)
    assert err["param"] == "max_tokens" and str(MAX_MODEL_LEN + 2) in err["message"]
    err = error_of(call(app, "POST", "/v1/completions",
                        json={"prompt": [1], "logit_bias": {"1": 1.0}}), 400)
    assert err["param"] == "logit_bias"
