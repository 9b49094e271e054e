"""/v1/completions and /v1/chat/completions: a request body becomes prompts and
SamplingParams, each prompt a request on the AsyncEngine, and their outputs one response
(collected) or one SSE stream (merged as they come), shaped by server/formatting.py.
A client that goes away aborts its requests."""
from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from engine import RequestOutput, SamplingParams
from engine.limits import fit_max_tokens
from server.async_engine import EngineDead, RequestStream
from server.errors import ENGINE_ERRORS, APIError, api_error
from server.formatting import Formatter, sse_event
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                             CompletionResponse, error_responses)
from server.state import ServerState, server_state
from server.structured import for_field

router = APIRouter()  # build_app adds the 401 to these routes' docs when a key is set

# each server-sent event, as clients (and schemathesis) parse it: {"data": "...", ...}
_EVENT = {"type": "object", "required": ["data"],
          "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                         "id": {"type": "string"}}}
_SSE = {"text/event-stream": {"schema": _EVENT,
                              "description": "with stream: true, `data: {chunk}` events "
                                             "ending in `data: [DONE]`"}}
_ERRORS = error_responses(400, 404, 429, 503)


@router.post("/v1/completions", responses={200: {"model": CompletionResponse, "content": _SSE},
                                           **_ERRORS})
async def completions(body: CompletionRequest, request: Request):
    state = server_state(request)
    state.check_model(body.model)
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
    jobs = []
    for ids in state.prompt_ids(body.prompt):
        max_tokens = fit_max_tokens(len(ids), 1 if body.max_tokens == 0 else body.max_tokens,
                                    state.max_model_len)
        try:
            params = body.sampling_params(max_tokens, body.logprobs, prompt_k)
        except ValueError as e:
            raise api_error(e) from None
        jobs.append((ids, params))
    return await _run(state, request, "cmpl", jobs, body, chat=False)


@router.post("/v1/chat/completions",
             responses={200: {"model": ChatCompletionResponse, "content": _SSE}, **_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    state.check_model(body.model)
    state.need_tokenizer()
    body.use_tool_format(state.tool_format)  # "auto" needs the template's tool-call format
    calls = body.tool_calls()  # a tool_choice that can't be served: 400 before any work
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if calls else None
    ids = state.chat_ids(body.messages, body.add_generation_prompt, tools)
    if body.max_completion_tokens is None:
        max_tokens = fit_max_tokens(len(ids), body.max_tokens, state.max_model_len)
    else:
        max_tokens = fit_max_tokens(len(ids), body.max_completion_tokens, state.max_model_len,
                                    "max_completion_tokens")
    try:
        params = body.sampling_params(max_tokens, (body.top_logprobs or 0)
                                      if body.logprobs else None)
    except ValueError as e:
        raise api_error(e) from None
    return await _run(state, request, "chatcmpl", [(ids, params)], body, chat=True)


async def _start(state: ServerState, rid: str, ids: list[int], params: SamplingParams,
                 body) -> RequestStream:
    try:
        return await state.aengine.add_request(rid, ids, params)
    except ENGINE_ERRORS as e:  # a bad field (the prompt, unless it names another), 429, 503
        # a constraint the engine could not compile: name the field the client sent
        constraint = (body.constraint_fields() or [None])[0]
        raise api_error(for_field(e, constraint), "prompt") from None


async def _run(state: ServerState, request: Request, kind: str, jobs, body, chat: bool):
    base = f"{kind}-{uuid.uuid4().hex}"
    streams = []
    try:
        for i, (ids, params) in enumerate(jobs):
            streams.append(await _start(state, f"{base}-{i}", ids, params, body))
    except BaseException:
        for s in streams:
            s.abort()
        raise
    fmt = Formatter(base, state.model_name, chat, body, jobs, state.tokenizer)
    if body.stream:
        return StreamingResponse(_sse(streams, fmt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(request, streams, fmt)


async def _collect(request: Request, streams: list[RequestStream], fmt: Formatter):
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
        raise api_error(e) from None
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()
    return fmt.full(finals)


async def _sse(streams: list[RequestStream], fmt: Formatter) -> AsyncIterator[bytes]:
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
                yield sse_event({"error": {"message": str(item) or repr(item),
                                           "type": "server_error", "param": None, "code": 503}})
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
