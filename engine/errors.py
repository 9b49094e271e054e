"""Errors the engine raises about a caller's input."""
from __future__ import annotations


class ParamError(ValueError):
    """A bad request parameter: `param` names the field (OpenAI's error `param`), the message
    says what is wrong. A ValueError, so callers that catch those keep working."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param
