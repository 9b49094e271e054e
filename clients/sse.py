"""Server-sent events: lines in, each event's data out. No I/O and no JSON here.

The one SSE framing for the client library, the benchmark, bench/ scripts and the tests; what
an event's data means (JSON, `[DONE]`, an error object) is up to each caller.

    for data in iter_sse(response.iter_lines()): ...
    async for data in aiter_sse(response.aiter_lines()): ...

The rules are the EventSource ones that OpenAI-style streams use: an event is the `data:`
lines before a blank line (joined by newlines), one space after the colon is dropped, lines
starting with ':' are comments (keep-alives), other fields (event:, id:, retry:) are ignored,
and a last event without its blank line still counts.
"""
from __future__ import annotations

from typing import AsyncIterable, AsyncIterator, Iterable, Iterator


def sse_field(line: str) -> tuple[str, str] | None:
    """(field, value) of one line; None for a blank line or a comment."""
    if not line or line.startswith(":"):
        return None
    name, _, value = line.partition(":")
    return name, value[1:] if value.startswith(" ") else value


def sse_data(line: str) -> str | None:
    """The value of a `data:` line; None for any other line."""
    field = sse_field(line)
    return field[1] if field is not None and field[0] == "data" else None


class SSEDecoder:
    """Fed line by line: returns each event's data when the blank line that ends it comes."""

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            return self.flush()
        data = sse_data(line)
        if data is not None:
            self._data.append(data)
        return None

    def flush(self) -> str | None:
        """The event in progress (a stream that ended without its blank line), if any."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def iter_sse(lines: Iterable[str]) -> Iterator[str]:
    """Each event's data, from lines without their line endings (httpx's iter_lines)."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data


async def aiter_sse(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """iter_sse for async lines (httpx's aiter_lines)."""
    decoder = SSEDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data
