"""What the sync and the async client share: configuration, request bodies, error mapping,
the retry delay and the meaning of a stream event (its framing is clients/sse.py). No I/O
here."""
from __future__ import annotations

import json
import random
from typing import Any

import httpx

from clients._retry import RETRY_TRANSPORT_ERRORS, backoff_delay, parse_retry_after
from clients.errors import APIConnectionError, APITimeoutError, KVServeError, error_from_body

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a long generation is not a hang
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def root_url(base_url: str) -> str:
    """The server root: kvserve's /health, /metrics and /tokenize live above /v1."""
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class BaseClient:
    def __init__(self, base_url: str, api_key: str | None, model: str | None,
                 max_retries: int, backoff: float, max_backoff: float):
        if max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("max_retries, backoff and max_backoff must be >= 0")
        self.base_url = root_url(base_url)
        self.api_key = api_key
        self.model = model  # None: the first model of /v1/models, looked up once
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self._rng = random.Random()

    def _request_args(self, method: str, path: str, body: Any) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return dict(method=method, url=self.base_url + path, json=body, headers=headers)

    def _delay(self, attempt: int, error: KVServeError) -> float:
        return backoff_delay(attempt, self.backoff, self.max_backoff, error.retry_after,
                             self._rng.random())

    @staticmethod
    def _generation_body(model: str, key: str, value: Any, params: dict,
                         stream: bool) -> dict:
        body = {**params, "model": model, key: value, "stream": stream}
        if stream:
            body.setdefault("stream_options", {"include_usage": True})
        else:
            body.pop("stream_options", None)
        return body

    @staticmethod
    def _tokenize_body(prompt: str | list, model: str | None, params: dict) -> dict:
        body = {**params, "messages" if isinstance(prompt, list) else "prompt": prompt}
        if model:
            body["model"] = model
        return body

    @staticmethod
    def _first_model(body: Any) -> str:
        ids = model_ids(body)
        if not ids:
            raise KVServeError("the server lists no model in /v1/models")
        return ids[0]


def model_ids(body: Any) -> list[str]:
    return [m["id"] for m in body.get("data") or () if isinstance(m, dict) and "id" in m]


def status_error(response: httpx.Response) -> KVServeError:
    """The typed error of a (read) response with status >= 400."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    except httpx.ResponseNotRead:  # the body could not be read: the status must do
        body = None
    return error_from_body(response.status_code, body, response.reason_phrase,
                           parse_retry_after(response.headers.get("retry-after")))


def transport_error(e: httpx.HTTPError) -> tuple[KVServeError, bool]:
    """The client error for an httpx failure, and whether sending again is safe."""
    cls = APITimeoutError if isinstance(e, httpx.TimeoutException) else APIConnectionError
    error = cls(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    error.__cause__ = e
    return error, isinstance(e, RETRY_TRANSPORT_ERRORS)


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise KVServeError(f"the server answered {response.status_code} with a body that is "
                           f"not JSON: {response.text[:200]!r}",
                           status=response.status_code) from None


def event_payload(data: str) -> dict | None:
    """One event's JSON object, None for `[DONE]`; an error event raises its typed error."""
    if data.strip() == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        raise APIConnectionError(f"a stream event is not JSON: {data[:200]!r}") from None
    if isinstance(obj, dict) and "error" in obj:
        raise error_from_body(None, obj)
    if not isinstance(obj, dict):
        raise APIConnectionError(f"a stream event is not an object: {data[:200]!r}")
    return obj


STREAM_CUT = "the stream ended before `data: [DONE]`"
