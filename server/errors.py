"""Errors in OpenAI's shape {"error": {"message", "type", "param", "code"}}, and the one
mapping from what the engine raises to them: a ParamError names its field, another
ValueError is about the field the caller says (or none), a full queue is 429 with
Retry-After, a stopping or failed engine 503. FastAPI's 422 for a body that does not fit
the schema becomes a 400 naming the first bad field."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import ParamError
from server.async_engine import Draining, EngineDead, QueueFull


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


# what the engine (AsyncEngine.add_request, SamplingParams, engine/limits.py) raises about a
# request, each with its HTTP error below
ENGINE_ERRORS = (ValueError, QueueFull, Draining, EngineDead)


def api_error(e: Exception, param: str | None = None) -> APIError:
    """The HTTP error for one of ENGINE_ERRORS. `param`: the field a ValueError that names
    none is about (a ParamError without one too)."""
    if isinstance(e, ValueError):  # ParamError included
        return APIError(400, str(e), param=getattr(e, "param", None) or param)
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, (Draining, EngineDead)):
        return APIError(503, str(e), "server_error")
    raise TypeError(f"no HTTP error for {e!r}") from e


def _field_path(err: dict) -> list[str]:
    """Where a validation error is, less where it came in (a body field or a query parameter
    is named alike)."""
    return [str(x) for x in err.get("loc", ()) if x not in ("body", "query")]


def _validation_error(e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = _field_path(first)
    # a body that is not JSON has loc ("body", <char offset>): no field to blame
    param = loc[0] if loc and first.get("type") != "json_invalid" else None
    message = "; ".join(f"{'.'.join(_field_path(err))}: {err.get('msg')}"
                        for err in errors[:5]) or "invalid request"
    return error_response(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(ParamError)  # a check that a route let through: it names its field
    async def _param_error(request: Request, e: ParamError):
        return await _api_error(request, api_error(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return _validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        # keep Starlette's headers: a 405 lists the allowed methods in Allow
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)
