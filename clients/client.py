"""The synchronous client.

    with Client("http://127.0.0.1:8000") as c:
        c.completions("The capital of France is", max_tokens=8, temperature=0).text
        for chunk in c.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=16):
            print(chunk.content, end="")

Every call retries 429 and 503 answers (and connections that could not be made) up to
`max_retries` times, waiting `backoff * 2**attempt` seconds with jitter, at least the server's
Retry-After and at most `max_backoff`; a stream is retried only before its first event.
Failures raise the KVServeError subclass of their status, with the server's message.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import httpx

from clients._common import (CHAT, COMPLETIONS, DEFAULT_BASE_URL, DEFAULT_TIMEOUT, STREAM_CUT,
                             BaseClient, event_payload, json_body, model_ids,
                             status_error, transport_error)
from clients._retry import RETRY_STATUSES
from clients._types import ChatChunk, ChatCompletion, Completion, CompletionChunk, Usage
from clients.errors import APIConnectionError, ServiceUnavailableError
from clients.prometheus import MetricsSnapshot, parse_prometheus
from clients.sse import iter_sse

T = TypeVar("T")
Prompt = str | list[str] | list[int] | list[list[int]]
Messages = list[dict[str, Any]]


class Stream(Generic[T]):
    """The chunks of one streamed request, as an iterator. The request is sent on the first
    `next()`; close() (or leaving a `with` block) hangs up, and the server aborts the request.
    `usage` holds the usage the server sent with the last chunk, once it arrived."""

    def __init__(self, chunks: Iterator[T]):
        self._chunks = chunks
        self.usage: Usage | None = None

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        chunk = next(self._chunks)
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage
        return chunk

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client(BaseClient):
    """A kvserve (or any OpenAI-compatible) server. `base_url` may end in /v1 or not;
    `model=None` uses the server's first model; `timeout` (seconds or httpx.Timeout) applies
    when this client makes its own httpx.Client; one passed as `http_client` is used as it is
    and not closed here."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, *,
                 model: str | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 30.0,
                 http_client: httpx.Client | None = None):
        super().__init__(base_url, api_key, model, max_retries, backoff, max_backoff)
        self._own_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=timeout)

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- transport

    def _request(self, method: str, path: str, body: Any = None, *, stream: bool = False,
                 max_retries: int | None = None) -> httpx.Response:
        """Send with retries; returns a response with status < 400 (open if `stream`)."""
        retries = self.max_retries if max_retries is None else max_retries
        attempt = 0
        while True:
            request = self._http.build_request(**self._request_args(method, path, body))
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                error, retry = transport_error(e)
            else:
                if response.status_code < 400:
                    return response
                try:
                    response.read()
                except httpx.HTTPError:
                    pass
                finally:
                    response.close()
                error, retry = status_error(response), response.status_code in RETRY_STATUSES
            error.attempts = attempt + 1
            if not retry or attempt >= retries:
                raise error
            time.sleep(self._delay(attempt, error))
            attempt += 1

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        return json_body(self._request(method, path, body))

    def _events(self, path: str, key: str, value: Any, model: str | None, params: dict,
                parse: Callable[[dict], T]) -> Iterator[T]:
        body = self._generation_body(self._model(model), key, value, params, True)
        response = self._request("POST", path, body, stream=True)
        try:
            try:
                for data in iter_sse(response.iter_lines()):
                    payload = event_payload(data)
                    if payload is None:
                        return
                    yield parse(payload)
            except httpx.HTTPError as e:
                raise transport_error(e)[0] from e
            raise APIConnectionError(STREAM_CUT)
        finally:
            response.close()

    def _model(self, model: str | None) -> str:
        if model:
            return model
        if self.model is None:
            self.model = self._first_model(self._json("GET", "/v1/models"))
        return self.model

    # ---------------------------------------------------------------- API

    def completions(self, prompt: Prompt, model: str | None = None, **params) -> Completion:
        """POST /v1/completions; `params` go into the body as they are (max_tokens, ...)."""
        body = self._generation_body(self._model(model), "prompt", prompt, params, False)
        return Completion.parse(self._json("POST", COMPLETIONS, body))

    def chat(self, messages: Messages, model: str | None = None, **params) -> ChatCompletion:
        """POST /v1/chat/completions."""
        body = self._generation_body(self._model(model), "messages", messages, params, False)
        return ChatCompletion.parse(self._json("POST", CHAT, body))

    def stream_completions(self, prompt: Prompt, model: str | None = None,
                           **params) -> Stream[CompletionChunk]:
        """Streamed /v1/completions: text deltas per choice; usage on the last chunk unless
        `stream_options` says otherwise."""
        return Stream(self._events(COMPLETIONS, "prompt", prompt, model, params,
                                   CompletionChunk.parse))

    def stream_chat(self, messages: Messages, model: str | None = None,
                    **params) -> Stream[ChatChunk]:
        """Streamed /v1/chat/completions: content deltas per choice."""
        return Stream(self._events(CHAT, "messages", messages, model, params, ChatChunk.parse))

    def tokenize(self, prompt: str | Messages, model: str | None = None, **params) -> list[int]:
        """Token ids of a text, or of chat messages through the model's chat template."""
        body = self._tokenize_body(prompt, model, params)
        return list(self._json("POST", "/tokenize", body)["tokens"])

    def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        body: dict[str, Any] = {"tokens": list(tokens)}
        if model:
            body["model"] = model
        return self._json("POST", "/detokenize", body)["prompt"]

    def models(self) -> list[str]:
        """Ids of the served models."""
        return model_ids(self._json("GET", "/v1/models"))

    def health(self) -> bool:
        """True when /health is 200, False when it is 503; no retries. Other failures
        (connection refused, 5xx) raise."""
        try:
            self._request("GET", "/health", max_retries=0).close()
        except ServiceUnavailableError:
            return False
        return True

    def metrics(self) -> MetricsSnapshot:
        """GET /metrics, parsed."""
        return parse_prometheus(self._request("GET", "/metrics").text)

    def metric_value(self, name: str, **labels: str) -> float:
        """One scrape: the sum of the samples of `name` with these labels (KeyError if none)."""
        return self.metrics().value(name, **labels)

