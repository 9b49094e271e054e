"""The asyncio client: Client's API with `async def` methods and async stream iterators.

    async with AsyncClient("http://127.0.0.1:8000") as c:
        out = await c.chat([{"role": "user", "content": "Hi"}], max_tokens=16)
        async for chunk in c.stream_completions("Once upon", max_tokens=16):
            print(chunk.text, end="")
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import httpx

from clients._common import (CHAT, COMPLETIONS, DEFAULT_BASE_URL, DEFAULT_TIMEOUT, STREAM_CUT,
                             BaseClient, event_payload, json_body, model_ids,
                             status_error, transport_error)
from clients._retry import RETRY_STATUSES
from clients._types import ChatChunk, ChatCompletion, Completion, CompletionChunk, Usage
from clients.client import Messages, Prompt
from clients.errors import APIConnectionError, ServiceUnavailableError
from clients.prometheus import MetricsSnapshot, parse_prometheus
from clients.sse import aiter_sse

T = TypeVar("T")


class AsyncStream(Generic[T]):
    """Stream's async twin: `async for chunk in stream`, `await stream.aclose()`,
    `async with`."""

    def __init__(self, chunks: AsyncIterator[T]):
        self._chunks = chunks
        self.usage: Usage | None = None

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        chunk = await self._chunks.__anext__()
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage
        return chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncClient(BaseClient):
    """See Client; `http_client` is an httpx.AsyncClient."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, *,
                 model: str | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 30.0,
                 http_client: httpx.AsyncClient | None = None):
        super().__init__(base_url, api_key, model, max_retries, backoff, max_backoff)
        self._own_http = http_client is None
        self._http = http_client if http_client is not None else \
            httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- transport

    async def _request(self, method: str, path: str, body: Any = None, *,
                       stream: bool = False, max_retries: int | None = None) -> httpx.Response:
        retries = self.max_retries if max_retries is None else max_retries
        attempt = 0
        while True:
            request = self._http.build_request(**self._request_args(method, path, body))
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as e:
                error, retry = transport_error(e)
            else:
                if response.status_code < 400:
                    return response
                try:
                    await response.aread()
                except httpx.HTTPError:
                    pass
                finally:
                    await response.aclose()
                error, retry = status_error(response), response.status_code in RETRY_STATUSES
            error.attempts = attempt + 1
            if not retry or attempt >= retries:
                raise error
            await asyncio.sleep(self._delay(attempt, error))
            attempt += 1

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        return json_body(await self._request(method, path, body))

    async def _events(self, path: str, key: str, value: Any, model: str | None, params: dict,
                      parse: Callable[[dict], T]) -> AsyncIterator[T]:
        body = self._generation_body(await self._model(model), key, value, params, True)
        response = await self._request("POST", path, body, stream=True)
        try:
            try:
                async for data in aiter_sse(response.aiter_lines()):
                    payload = event_payload(data)
                    if payload is None:
                        return
                    yield parse(payload)
            except httpx.HTTPError as e:
                raise transport_error(e)[0] from e
            raise APIConnectionError(STREAM_CUT)
        finally:
            await response.aclose()

    async def _model(self, model: str | None) -> str:
        if model:
            return model
        if self.model is None:
            self.model = self._first_model(await self._json("GET", "/v1/models"))
        return self.model

    # ---------------------------------------------------------------- API

    async def completions(self, prompt: Prompt, model: str | None = None,
                          **params) -> Completion:
        body = self._generation_body(await self._model(model), "prompt", prompt, params, False)
        return Completion.parse(await self._json("POST", COMPLETIONS, body))

    async def chat(self, messages: Messages, model: str | None = None,
                   **params) -> ChatCompletion:
        body = self._generation_body(await self._model(model), "messages", messages, params,
                                     False)
        return ChatCompletion.parse(await self._json("POST", CHAT, body))

    def stream_completions(self, prompt: Prompt, model: str | None = None,
                           **params) -> AsyncStream[CompletionChunk]:
        return AsyncStream(self._events(COMPLETIONS, "prompt", prompt, model, params,
                                        CompletionChunk.parse))

    def stream_chat(self, messages: Messages, model: str | None = None,
                    **params) -> AsyncStream[ChatChunk]:
        return AsyncStream(self._events(CHAT, "messages", messages, model, params,
                                        ChatChunk.parse))

    async def tokenize(self, prompt: str | Messages, model: str | None = None,
                       **params) -> list[int]:
        body = self._tokenize_body(prompt, model, params)
        return list((await self._json("POST", "/tokenize", body))["tokens"])

    async def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        body: dict[str, Any] = {"tokens": list(tokens)}
        if model:
            body["model"] = model
        return (await self._json("POST", "/detokenize", body))["prompt"]

    async def models(self) -> list[str]:
        return model_ids(await self._json("GET", "/v1/models"))

    async def health(self) -> bool:
        try:
            await (await self._request("GET", "/health", max_retries=0)).aclose()
        except ServiceUnavailableError:
            return False
        return True

    async def metrics(self) -> MetricsSnapshot:
        return parse_prometheus((await self._request("GET", "/metrics")).text)

    async def metric_value(self, name: str, **labels: str) -> float:
        return (await self.metrics()).value(name, **labels)
