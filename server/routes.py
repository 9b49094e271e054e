"""The routes besides generation: /health, /metrics (open: `open_router`), /version,
/v1/models, /tokenize, /tokenizer_info, /detokenize (`router`). Each reads the server's
state from the request (server/state.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.limits import check_token_ids
from server.errors import APIError, error_response
from server.protocol import (DetokenizeRequest, DetokenizeResponse, HealthResponse, ModelList,
                             TokenizeRequest, TokenizeResponse, TokenizerInfoResponse,
                             VersionResponse, error_responses)
from server.state import server_state

VERSION = "0.1.0"

open_router = APIRouter()  # no API key needed (server/middleware.py's OPEN_PATHS)
router = APIRouter()       # build_app adds the 401 to these routes' docs when a key is set


@open_router.get("/health", response_model=None,
                 responses={200: {"model": HealthResponse}, **error_responses(503)})
async def health(request: Request):
    aengine = server_state(request).aengine
    if not aengine.healthy:
        return error_response(503, f"the engine failed: {aengine.error!r}", "server_error")
    if aengine.draining:
        return error_response(503, "shutting down", "server_error")
    return {"status": "ok"}


@open_router.get("/metrics", response_class=Response,
                 responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                  "description": "Prometheus text exposition"}})
async def metrics(request: Request):
    m = server_state(request).aengine.metrics
    return Response(m.render() if m else b"", media_type="text/plain; version=0.0.4")


@router.get("/version", responses={200: {"model": VersionResponse}})
async def version():
    return {"version": VERSION}


@router.get("/v1/models", responses={200: {"model": ModelList}})
async def models(request: Request):
    state = server_state(request)
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.created,
        "owned_by": "kvserve", "root": state.root_model_name,
        "max_model_len": state.max_model_len}]}


@router.post("/tokenize", responses={200: {"model": TokenizeResponse},
                                     **error_responses(400, 404)})
async def tokenize(body: TokenizeRequest, request: Request):
    state = server_state(request)
    state.check_model(body.model)
    tokenizer = state.need_tokenizer()
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        ids = state.chat_ids(body.messages, body.add_generation_prompt)
    else:
        ids = tokenizer.encode(body.prompt, body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}


@router.get("/tokenizer_info", responses={200: {"model": TokenizerInfoResponse},
                                          **error_responses(400)})
async def tokenizer_info(request: Request):
    """vLLM's route for remote tokenizers (lm-evaluation-harness's "remote" backend)."""
    state = server_state(request)
    return state.need_tokenizer().info(state.max_model_len)


@router.post("/detokenize", responses={200: {"model": DetokenizeResponse},
                                       **error_responses(400, 404)})
async def detokenize(body: DetokenizeRequest, request: Request):
    state = server_state(request)
    state.check_model(body.model)
    tokenizer = state.need_tokenizer()
    check_token_ids(body.tokens, state.vocab_size, "tokens", what="tokens")
    return {"prompt": tokenizer.decode(body.tokens, False)}
