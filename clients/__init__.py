"""Clients for kvserve (and any OpenAI-compatible server).

The client library needs only httpx: nothing here imports the engine, torch or the server.

    from clients import Client
    with Client("http://127.0.0.1:8000") as c:
        print(c.completions("Hello", max_tokens=8, temperature=0).text)
"""
from clients._retry import backoff_delay, parse_retry_after
from clients._types import (ChatChoice, ChatChunk, ChatCompletion, ChatDelta, Completion,
                            CompletionChoice, CompletionChunk, CompletionDelta, Message, Usage)
from clients.async_client import AsyncClient, AsyncStream
from clients.client import Client, Stream
from clients.errors import (APIConnectionError, APITimeoutError, AuthenticationError,
                            BadRequestError, InternalServerError, KVServeError, NotFoundError,
                            PermissionDeniedError, RateLimitError, ServiceUnavailableError)
from clients.prometheus import Histogram, MetricsSnapshot, Sample, parse_prometheus

KVServeClient = Client
AsyncKVServeClient = AsyncClient

__all__ = [
    "Client", "AsyncClient", "KVServeClient", "AsyncKVServeClient", "Stream", "AsyncStream",
    "Completion", "CompletionChoice", "CompletionChunk", "CompletionDelta",
    "ChatCompletion", "ChatChoice", "ChatChunk", "ChatDelta", "Message", "Usage",
    "KVServeError", "BadRequestError", "AuthenticationError", "PermissionDeniedError",
    "NotFoundError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "APIConnectionError", "APITimeoutError",
    "MetricsSnapshot", "Sample", "Histogram", "parse_prometheus",
    "backoff_delay", "parse_retry_after",
]
