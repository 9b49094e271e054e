"""The OpenAI-compatible HTTP API over an AsyncEngine.

Routes: /v1/completions, /v1/chat/completions (both stream as SSE), /v1/models, /health,
/metrics, /tokenize, /detokenize, /tokenizer_info, /version; their bodies and chunks are
built by server/formatting.py.  Every error is OpenAI's shape
{"error": {"message", "type", "param", "code"}}: bad input is 400 (FastAPI's 422 remapped),
an unknown model 404, a missing/wrong API key 401, a full queue 429 with Retry-After, a
failed or stopping engine 503.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import RequestOutput, SamplingParams
from server.async_engine import AsyncEngine, Draining, EngineDead, QueueFull
from server.formatting import Formatter, sse_event
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                             CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                             HealthResponse, ModelList, TokenizeRequest, TokenizeResponse,
                             TokenizerInfoResponse,
                             VersionResponse, error_responses)

VERSION = "0.1.0"
OPEN_PATHS = {"/health", "/metrics"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# request fields an engine-side ValueError may name as its first word ("top_p must be ...")
_FIELDS = frozenset(CompletionRequest.model_fields) | frozenset(ChatCompletionRequest.model_fields)


def _bad(e: ValueError, default: str | None = None) -> APIError:
    message = str(e)
    first = message.split(" ", 1)[0].rstrip(":") if message else ""
    return APIError(400, message, param=first if first in _FIELDS else default)


class _BearerAuth:
    """`Authorization: Bearer <key>` on every path but OPEN_PATHS.  Plain ASGI on purpose: an
    @app.middleware("http") (BaseHTTPMiddleware) wraps `receive` so that a handler's
    request.is_disconnected() never sees the client leave, and nothing would be aborted."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(401, "invalid or missing API key (Authorization: "
                                          "Bearer <key>)", "authentication_error")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# Request bodies above this many bytes get 413 before they are read whole (`kvserve serve
# --max-request-bytes`): 4 MiB holds ~1M characters of prompt, far beyond any context here.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class _BodyLimit:
    """413 in OpenAI's error shape for a body over `limit` bytes: at once from Content-Length;
    a body without one (chunked) is read here up to the limit first (the handler would read
    it whole anyway) and replayed to the app. A body in UTF-16 or UTF-32 (which Python's
    json would decode) is a 400: JSON between systems is UTF-8 (RFC 8259, 8.1), and a client
    that sends anything else is better told than guessed for. Plain ASGI, like _BearerAuth,
    so handlers still see disconnects."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        parts, seen = [], 0
        while True:  # all of a chunked body; the first message of a sized one
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body ended
                return
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                return await self._too_large(scope, receive, send)
            if length is not None or not message.get("more_body", False):
                break
        head = b"".join(parts)
        encoding = json.detect_encoding(head[:4]) if len(head) >= 2 else "utf-8"
        if encoding not in ("utf-8", "utf-8-sig"):
            return await error_response(
                400, f"the request body is {encoding.upper()}; JSON must be UTF-8")(
                    scope, receive, send)
        replayed = False
        more = message.get("more_body", False)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": head, "more_body": more}
            return await receive()
        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than {self.limit} bytes "
                                       f"(kvserve serve --max-request-bytes)")
        await response(scope, receive, send)


def build_app(aengine: AsyncEngine, served_model_name: str | None = None,
              api_key: str | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    eng = aengine.engine
    model_name = served_model_name or eng.model_name
    max_model_len = eng.config.max_model_len
    # the engine thread detokenizes with its own tokenizer; a transformers tokenizer object
    # used from two threads at once can fail ("Already borrowed")
    tokenizer = copy.deepcopy(eng.tokenizer) if eng.tokenizer is not None else None
    created = int(time.time())
    app = FastAPI(title="kvserve", version=VERSION)
    app.state.aengine = aengine

    # ---------------------------------------------------------------- errors and auth

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        # a body that is not JSON has loc ("body", <char offset>): no field to blame
        param = loc[0] if loc and first.get("type") != "json_invalid" else None
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body')}: "
                            f"{err.get('msg')}" for err in errors[:5]) or "invalid request"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        # keep Starlette's headers: a 405 lists the allowed methods in Allow
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)

    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)
    app.add_middleware(_BodyLimit, limit=max_request_bytes)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:  # "" too: no such model
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model")

    def need_tokenizer() -> None:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")

    # ---------------------------------------------------------------- simple routes

    auth = (401,) if api_key else ()
    # each server-sent event, as clients (and schemathesis) parse it: {"data": "...", ...}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                            "id": {"type": "string"}}}
    sse = {"text/event-stream": {"schema": event,
                                 "description": "with stream: true, `data: {chunk}` events "
                                                "ending in `data: [DONE]`"}}

    @app.get("/health", response_model=None,
             responses={200: {"model": HealthResponse}, **error_responses(503)})
    async def health():
        if not aengine.healthy:
            return error_response(503, f"the engine failed: {aengine.error!r}", "server_error")
        if aengine.draining:
            return error_response(503, "shutting down", "server_error")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def metrics():
        m = aengine.metrics
        return Response(m.render() if m else b"", media_type="text/plain; version=0.0.4")

    @app.get("/version", responses={200: {"model": VersionResponse}, **error_responses(*auth)})
    async def version():
        return {"version": VERSION}

    @app.get("/v1/models", responses={200: {"model": ModelList}, **error_responses(*auth)})
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "kvserve",
            "root": eng.model_name, "max_model_len": max_model_len}]}

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse},
                                      **error_responses(400, *auth, 404)})
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        need_tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = _chat_ids(body.messages, body.add_generation_prompt)
        else:
            ids = tokenizer.encode(body.prompt) if body.add_special_tokens else \
                tokenizer.hf.encode(body.prompt, add_special_tokens=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.get("/tokenizer_info", responses={200: {"model": TokenizerInfoResponse},
                                           **error_responses(400, *auth)})
    async def tokenizer_info():
        """vLLM's route for remote tokenizers (lm-evaluation-harness's "remote" backend)."""
        need_tokenizer()
        return tokenizer.info(max_model_len)

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse},
                                        **error_responses(400, *auth, 404)})
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        need_tokenizer()
        vocab = eng.config.model.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"tokens must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, False)}

    def _chat_ids(messages, add_generation_prompt: bool) -> list[int]:
        try:
            conv = [{"role": m.role, "content": m.text()} for m in messages]
            return tokenizer.apply_chat_template(conv, add_generation_prompt)
        except ValueError as e:
            raise _bad(e, "messages") from None
        except Exception as e:  # a template that rejects the conversation (e.g. roles)
            raise APIError(400, f"messages: the chat template failed: {e}",
                           param="messages") from None

    # ---------------------------------------------------------------- generation

    def prompt_ids(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            need_tokenizer()
            return [tokenizer.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], str):
            need_tokenizer()
            return [tokenizer.encode(p) for p in prompt]
        return [list(p) for p in prompt]

    def limit_tokens(ids: list[int], max_tokens: int | None, param: str = "max_tokens") -> int:
        if len(ids) >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} "
                           f"tokens. However, your prompt has {len(ids)} tokens.", param="prompt")
        if max_tokens is None:
            return max_model_len - len(ids)
        if max_tokens < 1:
            raise APIError(400, f"{param} must be >= 1, got {max_tokens}", param=param)
        if len(ids) + max_tokens > max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} "
                           f"tokens. However, you requested {len(ids) + max_tokens} tokens "
                           f"({len(ids)} in the prompt, {max_tokens} in the completion). "
                           f"Please reduce the length of the prompt or completion.",
                           param=param)
        return max_tokens

    async def start(rid: str, ids: list[int], params: SamplingParams):
        try:
            return await aengine.add_request(rid, ids, params)
        except ValueError as e:  # the engine names the field, or it is about the prompt
            raise _bad(e, "prompt") from None
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}) from None
        except (Draining, EngineDead) as e:
            raise APIError(503, str(e), "server_error") from None

    generation_errors = error_responses(400, *auth, 404, 429, 503)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse, "content": sse},
                                            **generation_errors})
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported (use n, or use_beam_search)",
                           param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo: score the prompt "
                                "without generating)", param="max_tokens")
        # echo + logprobs scores the prompt too (teacher forcing: how harnesses evaluate);
        # max_tokens 0 generates one token that nobody sees
        prompt_k = body.prompt_logprobs
        if body.echo and body.logprobs is not None:
            prompt_k = max(prompt_k or 0, body.logprobs)
        prompts = prompt_ids(body.prompt)
        jobs = []
        for ids in prompts:
            max_tokens = limit_tokens(ids, 1 if body.max_tokens == 0 else body.max_tokens)
            try:
                params = body.sampling_params(max_tokens, body.logprobs, prompt_k)
            except ValueError as e:
                raise _bad(e) from None
            jobs.append((ids, params))
        return await _run(request, "cmpl", jobs, body, chat=False)

    @app.post("/v1/chat/completions",
              responses={200: {"model": ChatCompletionResponse, "content": sse},
                         **generation_errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        need_tokenizer()
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise APIError(400, "response_format other than text is not supported",
                           param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        ids = _chat_ids(body.messages, body.add_generation_prompt)
        if body.max_completion_tokens is None:
            max_tokens = limit_tokens(ids, body.max_tokens)
        else:
            max_tokens = limit_tokens(ids, body.max_completion_tokens, "max_completion_tokens")
        try:
            params = body.sampling_params(max_tokens, (body.top_logprobs or 0)
                                          if body.logprobs else None)
        except ValueError as e:
            raise _bad(e) from None
        return await _run(request, "chatcmpl", [(ids, params)], body, chat=True)

    async def _run(request: Request, kind: str, jobs, body, chat: bool):
        base = f"{kind}-{uuid.uuid4().hex}"
        streams = []
        try:
            for i, (ids, params) in enumerate(jobs):
                streams.append(await start(f"{base}-{i}", ids, params))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        fmt = Formatter(base, model_name, chat, body, jobs, tokenizer)
        if body.stream:
            return StreamingResponse(_sse(streams, fmt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(request, streams, fmt)

    async def _collect(request: Request, streams, fmt: "Formatter"):
        finals: list[RequestOutput | None] = [None] * len(streams)

        async def one(i, s):
            async for out in s:
                finals[i] = out
        tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(streams)]
        try:
            while not all(t.done() for t in tasks):
                done, _ = await asyncio.wait(tasks, timeout=0.5)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                if await request.is_disconnected():
                    # the client went away: its streams are aborted below; nothing to send
                    # (499, nginx's "client closed request", for the record), no traceback
                    return Response(status_code=499)
            for t in tasks:
                t.result()
        except EngineDead as e:
            raise APIError(503, str(e), "server_error") from None
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.abort()
        return fmt.full(finals)

    async def _sse(streams, fmt: "Formatter") -> AsyncIterator[bytes]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, s):
            try:
                async for out in s:
                    await merged.put((i, out))
            except asyncio.CancelledError:  # the response is over: nobody reads `merged`
                raise
            except BaseException as e:  # noqa: BLE001 - reported as an error event
                await merged.put((i, e))
            finally:
                await merged.put((i, None))
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        open_streams = len(streams)
        try:
            for chunk in fmt.start_chunks():
                yield sse_event(chunk)
            while open_streams:
                i, item = await merged.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, BaseException):
                    kind = "server_error"
                    yield sse_event({"error": {"message": str(item) or repr(item), "type": kind,
                                            "param": None, "code": 503}})
                    return
                else:
                    for chunk in fmt.delta_chunks(i, item):
                        yield sse_event(chunk)
            usage = fmt.usage_chunk()
            if usage is not None:
                yield sse_event(usage)
            yield b"data: [DONE]\n\n"
        finally:  # a client that goes away cancels this generator: free its requests
            for t in tasks:
                t.cancel()
            for s in streams:
                s.abort()

    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's spec, less the 422 it documents for every body: bad input is 400 here."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in spec.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = spec
    return app.openapi_schema
