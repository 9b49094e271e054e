"""Exceptions of the client: one class per HTTP status a kvserve route answers, each carrying
the server's OpenAI-shaped error {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from typing import Any


class KVServeError(Exception):
    """Base of every client error. `status` is the HTTP status (None without a response);
    `message`, `type`, `param` and `code` come from the server's error body, `body` is that
    body as parsed; `retry_after` is the server's Retry-After in seconds; `attempts` is how
    many requests were sent before giving up."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: Any = None, body: Any = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.status, self.type = message, status, type
        self.param, self.code, self.body = param, code, body
        self.retry_after = retry_after
        self.attempts = 1

    def __str__(self) -> str:
        head = " ".join(str(x) for x in (self.status, self.type) if x)
        param = f" (param: {self.param})" if self.param else ""
        return f"[{head}] {self.message}{param}" if head else f"{self.message}{param}"


class BadRequestError(KVServeError):
    """400 (or 422): the request is invalid; `param` names the field when the server knows it."""


class AuthenticationError(KVServeError):
    """401: missing or wrong API key."""


class PermissionDeniedError(KVServeError):
    """403."""


class NotFoundError(KVServeError):
    """404: unknown model or route."""


class RateLimitError(KVServeError):
    """429: the server's queue is full; retried with backoff before it is raised."""


class InternalServerError(KVServeError):
    """A 5xx other than 503."""


class ServiceUnavailableError(KVServeError):
    """503: the engine failed or the server is shutting down; also an error event that ends
    a stream."""


class APIConnectionError(KVServeError):
    """No (complete) response: the connection failed or broke, or a stream was cut short."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


_BY_STATUS: dict[int, type[KVServeError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 422: BadRequestError, 429: RateLimitError,
    503: ServiceUnavailableError}


def error_class(status: int | None) -> type[KVServeError]:
    if status is None:
        return KVServeError
    return _BY_STATUS.get(status, InternalServerError if status >= 500 else KVServeError)


def error_from_body(status: int | None, body: Any, fallback: str = "",
                    retry_after: float | None = None) -> KVServeError:
    """The typed error for an HTTP status and its (parsed JSON, or text) body: OpenAI's
    shape, FastAPI's {"detail": ...}, or anything else as text."""
    info = body.get("error") if isinstance(body, dict) else None
    if isinstance(info, dict):
        message = str(info.get("message") or fallback or "unknown error")
        kind, param, code = info.get("type"), info.get("param"), info.get("code")
    else:
        if isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
        elif isinstance(info, str):
            message = info
        else:
            message = (body if isinstance(body, str) else "") or fallback or "unknown error"
        kind, param, code = None, None, status
    if status is None and isinstance(code, int) and 400 <= code < 600:
        status = code  # an error event inside a stream carries its status as the code
    return error_class(status)(message, status=status, type=kind, param=param, code=code,
                               body=body, retry_after=retry_after)
