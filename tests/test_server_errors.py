"""server/errors.py and server/middleware.py in-process: OpenAI's error shape, the mapping of
engine errors (ParamError's field, 429, 503), FastAPI's validation errors as 400s, and the
API-key and body-limit middlewares, driven over httpx.ASGITransport against a tiny app (no
model, no server process)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ParamError
from server.async_engine import Draining, EngineDead, QueueFull
from server.errors import APIError, api_error, install_error_handlers
from server.middleware import OPEN_PATHS, BearerAuth, BodyLimit


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    prompt: str
    n: int = Field(1, ge=1)


def tiny_app(api_key: str | None = None, limit: int | None = None) -> FastAPI:
    """Routes that raise what real routes raise, or echo the body they were given."""
    app = FastAPI()
    install_error_handlers(app)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if limit is not None:
        app.add_middleware(BodyLimit, limit=limit)

    @app.post("/echo")
    async def echo(request: Request):
        raw = await request.body()
        return {"bytes": len(raw), "json": json.loads(raw)}

    @app.post("/typed")
    async def typed(body: Body):
        return {"prompt": body.prompt, "n": body.n}

    @app.get("/param-error")
    async def param_error():
        raise ParamError("top_p", "top_p must be in (0, 1], got 2")

    @app.get("/api-error")
    async def api_error_route():
        raise APIError(429, "slow down", "rate_limit_error", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        return {"status": "ok"}
    return app


def call(app: FastAPI, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


def error_of(r: httpx.Response, status: int) -> dict:
    """The response's error object, its shape checked: OpenAI's four fields, code = status."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    assert isinstance(err["message"], str) and err["message"]
    return err


# ---------------------------------------------------------------- the mapping


def test_param_error_names_its_field_and_a_plain_value_error_gets_the_default():
    e = api_error(ParamError("top_k", "top_k must be -1 or >= 1"), "prompt")
    assert (e.status, e.param, e.message, e.type) == (400, "top_k", "top_k must be -1 or >= 1",
                                                     "invalid_request_error")
    # a ValueError is about the field the caller says; the first word is not parsed
    e = api_error(ValueError("temperature is not a field here"), "prompt")
    assert (e.status, e.param) == (400, "prompt")
    assert api_error(ValueError("n is bad")).param is None
    # a ParamError without a field falls back to the caller's too
    assert api_error(ParamError(None, "the request is bad"), "messages").param == "messages"


def test_queue_full_and_a_stopped_engine():
    e = api_error(QueueFull("3 requests are waiting"))
    assert (e.status, e.type, e.headers) == (429, "rate_limit_error", {"Retry-After": "1"})
    for error in (Draining("shutting down"), EngineDead("the engine failed")):
        e = api_error(error, "prompt")
        assert (e.status, e.type, e.param, e.message) == (503, "server_error", None, str(error))


# ---------------------------------------------------------------- the handlers


def test_errors_raised_in_routes_have_openai_shape():
    app = tiny_app()
    err = error_of(call(app, "GET", "/param-error"), 400)
    assert err["param"] == "top_p" and err["type"] == "invalid_request_error"
    assert err["message"] == "top_p must be in (0, 1], got 2"
    r = call(app, "GET", "/api-error")
    assert error_of(r, 429)["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"


@pytest.mark.parametrize("body,param", [
    ({"prompt": 5}, "prompt"),            # wrong type
    ({}, "prompt"),                       # missing
    ({"prompt": "x", "n": 0}, "n"),       # out of bounds
    ({"prompt": "x", "n": "2"}, "n"),     # strict: no "2" for 2
])
def test_validation_errors_are_400_naming_the_first_field(body, param):
    err = error_of(call(tiny_app(), "POST", "/typed", json=body), 400)
    assert err["param"] == param and param in err["message"]


@pytest.mark.parametrize("raw", ['{"prompt": "x"', "not json", ""])
def test_a_body_that_is_not_json_blames_no_field(raw):
    r = call(tiny_app(), "POST", "/typed", content=raw,
             headers={"content-type": "application/json"})
    assert error_of(r, 400)["param"] is None


def test_unknown_route_and_wrong_method():
    app = tiny_app()
    assert error_of(call(app, "GET", "/nowhere"), 404)["type"] == "not_found_error"
    r = call(app, "GET", "/typed")
    assert error_of(r, 405)["type"] == "invalid_request_error"
    assert r.headers["allow"] == "POST"  # Starlette's header survives the reshaping


# ---------------------------------------------------------------- the middlewares


def test_bearer_auth():
    app = tiny_app(api_key="sesame")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"},
                    {"Authorization": "Basic sesame"}):
        err = error_of(call(app, "POST", "/typed", json={"prompt": "x"}, headers=headers), 401)
        assert err["type"] == "authentication_error"
    for given in ("Bearer sesame", "bearer sesame", "Bearer  sesame "):
        r = call(app, "POST", "/typed", json={"prompt": "x"}, headers={"Authorization": given})
        assert r.status_code == 200 and r.json() == {"prompt": "x", "n": 1}, given
    assert "/health" in OPEN_PATHS
    assert call(app, "GET", "/health").json() == {"status": "ok"}


def test_body_limit_from_content_length_and_while_reading_a_chunked_body():
    app = tiny_app(limit=1000)
    big = json.dumps({"pad": "x" * 2000}).encode()
    err = error_of(call(app, "POST", "/echo", content=big), 413)
    assert "1000 bytes" in err["message"] and "--max-request-bytes" in err["message"]

    async def chunks(data: bytes, size: int):  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(data), size):
            yield data[i:i + size]
    error_of(call(app, "POST", "/echo", content=chunks(big, 300)), 413)
    # under the limit, a chunked body reaches the route whole
    small = json.dumps({"pad": "y" * 700}).encode()
    r = call(app, "POST", "/echo", content=chunks(small, 100))
    assert r.status_code == 200 and r.json() == {"bytes": len(small), "json": {"pad": "y" * 700}}


def test_body_limit_refuses_utf16_and_utf32_but_reads_a_utf8_bom():
    app = tiny_app(limit=10_000)
    body = {"prompt": "Hello"}
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        r = call(app, "POST", "/typed", content=json.dumps(body).encode(encoding),
                 headers={"content-type": "application/json"})
        assert "must be UTF-8" in error_of(r, 400)["message"], encoding
    r = call(app, "POST", "/typed", content=json.dumps(body).encode("utf-8-sig"),
             headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello"


def test_body_limit_comes_before_the_key():
    """build_app's order: an oversized body is 413 whatever its key (nothing is read)."""
    app = tiny_app(api_key="sesame", limit=100)
    error_of(call(app, "POST", "/echo", content=b"x" * 500), 413)
    error_of(call(app, "POST", "/echo", json={"a": 1}), 401)
