"""One streaming request, timed chunk by chunk: what each event says, and the clock.

TTFT is the time to the first chunk with non-empty content, ITL the gaps between later
content chunks, E2E the time to the end of the stream. Token counts are the last `usage`
object the stream carried, whether on a chunk with choices (llama.cpp's /v1/completions) or
on its own chunk with empty choices (OpenAI's include_usage, kvserve, vLLM).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from clients.bench_dataset import Prompt
from clients.bench_metrics import RequestResult
from clients.sse import aiter_sse

MAX_ERROR_CHARS = 500


@dataclass
class Chunk:
    """What the benchmark needs from one `data:` event."""
    content: str = ""
    usage: dict | None = None
    error: str | None = None
    done: bool = False


def parse_event(data: str) -> Chunk:
    """One `data:` payload of a completions or chat-completions stream."""
    if data.strip() == "[DONE]":
        return Chunk(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return Chunk(error=f"unparsable stream event: {data[:200]!r}")
    if not isinstance(obj, dict):
        return Chunk(error=f"unexpected stream event: {data[:200]!r}")
    if obj.get("error"):
        err = obj["error"]
        return Chunk(error=str(err.get("message", err) if isinstance(err, dict) else err))
    parts = []
    for choice in obj.get("choices") or ():
        if choice.get("text"):
            parts.append(choice["text"])
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            if isinstance(delta.get(key), str):
                parts.append(delta[key])
    usage = obj.get("usage")
    return Chunk(content="".join(parts), usage=usage if isinstance(usage, dict) else None)


def request_body(endpoint: str, model: str, p: Prompt, temperature: float,
                 ignore_eos: bool) -> dict:
    """The JSON body of one streaming request."""
    body: dict = {"model": model, "max_tokens": p.output_len, "temperature": temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = p.messages or [{"role": "user", "content": p.prompt}]
        body["max_completion_tokens"] = p.output_len
    else:
        if p.prompt is None:
            raise ValueError("a chat (messages) prompt needs --endpoint chat")
        body["prompt"] = p.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _http_error(status: int, text: str) -> str:
    try:
        err = json.loads(text).get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (json.JSONDecodeError, AttributeError):
        message = None
    return f"HTTP {status}: {message or text.strip() or 'no body'}"[:MAX_ERROR_CHARS]


async def send(client, path: str, body: dict, result: RequestResult, t0: float) -> None:
    """POST `body` to `path` with `client` (httpx.AsyncClient) and fill in `result`.

    Never raises for a failed request: `result.error` says what went wrong. Times are
    time.perf_counter() seconds; `t0` is the run's zero."""
    start = time.perf_counter()
    result.start = start - t0
    last = None
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = _http_error(resp.status_code, text)
                return
            async for data in aiter_sse(resp.aiter_lines()):
                now = time.perf_counter()
                chunk = parse_event(data)
                if chunk.error:
                    result.error = f"stream error: {chunk.error}"[:MAX_ERROR_CHARS]
                    return
                if chunk.done:
                    break
                if chunk.usage is not None:
                    result.prompt_tokens = _int(chunk.usage.get("prompt_tokens"))
                    result.output_tokens = _int(chunk.usage.get("completion_tokens"))
                if chunk.content:
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    result.chunk_times.append(now - t0)
                    last = now
        result.e2e = time.perf_counter() - start
        result.success = True
    except Exception as e:  # noqa: BLE001 - any transport failure is this request's failure
        result.error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS] if str(e) else type(e).__name__
    finally:
        if not result.success:
            result.e2e = time.perf_counter() - start


def _int(x) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None
