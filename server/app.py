"""The OpenAI-compatible HTTP API over an AsyncEngine: build_app puts the pieces together.

Routes: /v1/completions, /v1/chat/completions (both stream as SSE; server/generation.py),
/v1/models, /health, /metrics, /tokenize, /detokenize, /tokenizer_info, /version
(server/routes.py), /v1/kv/state and the page /kv (server/kv_inspector.py); they read a ServerState (server/state.py) from app.state.server, and
their bodies and chunks are built by server/formatting.py.  Every error is OpenAI's shape
{"error": {"message", "type", "param", "code"}} (server/errors.py): bad input is 400
(FastAPI's 422 remapped), an unknown model 404, a missing/wrong API key 401, a body over
the limit 413 (server/middleware.py), a full queue 429 with Retry-After, a failed or
stopping engine 503.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server import generation, kv_inspector, routes
from server.async_engine import AsyncEngine
from server.errors import APIError, error_response, install_error_handlers
from server.middleware import MAX_REQUEST_BYTES, OPEN_PATHS, BearerAuth, BodyLimit
from server.protocol import error_responses
from server.routes import VERSION
from server.state import ServerState

# importable from here as before (serve.py and tools import MAX_REQUEST_BYTES from server.app)
__all__ = ["build_app", "APIError", "error_response", "MAX_REQUEST_BYTES", "OPEN_PATHS",
           "VERSION", "ServerState"]


def build_app(aengine: AsyncEngine, served_model_name: str | None = None,
              api_key: str | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="kvserve", version=VERSION)
    app.state.aengine = aengine
    app.state.server = ServerState.from_engine(aengine, served_model_name)
    install_error_handlers(app)
    # the last added runs first: the body limit, then the key
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(BodyLimit, limit=max_request_bytes)

    app.include_router(routes.open_router)
    app.include_router(kv_inspector.page_router)
    auth = error_responses(401) if api_key else {}  # documented on every other route
    app.include_router(routes.router, responses=auth)
    app.include_router(generation.router, responses=auth)
    app.include_router(kv_inspector.router, responses=auth)
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
