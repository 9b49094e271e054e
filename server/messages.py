"""What passes between the event loop and the engine thread (server/async_engine.py).

To the engine thread: typed messages in its inbox (Add, Abort, AbortAll, KVStateQuery,
Wake). Back to the event loop, per request: a RequestChannel that the engine thread puts
into (through the loop's call_soon_threadsafe): first ACCEPTED or the error that refused the
request, then its RequestOutputs, or an exception that ends it. The route iterates a
RequestStream over it. A KVStateQuery is answered once, through its future.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from engine import RequestOutput, SamplingParams
from server.metrics import RequestTiming

ACCEPTED = object()  # the engine took the request: outputs follow


@dataclass
class RequestChannel:
    """One request's queue on its event loop (and its clock, for the metrics)."""
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    deadline: float | None = None  # time.monotonic(); past it the request is aborted
    timing: RequestTiming = field(default_factory=RequestTiming)

    def put(self, item) -> None:
        """From the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is gone, nobody listens
            pass


def deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    """On the event loop: a step's items for its requests, put at one wake-up."""
    for q, item in items:
        q.put_nowait(item)


class RequestStream:
    """What AsyncEngine.add_request returns: iterate it for the request's outputs; it ends
    after the finished one, or raises what ended the request (EngineDead)."""

    def __init__(self, channel: RequestChannel, abort: Callable[[str], None]):
        self._channel = channel
        self._abort = abort
        self.request_id = channel.request_id
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._channel.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)


# ---------------------------------------------------------------- to the engine thread


@dataclass
class Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    channel: RequestChannel  # hears ACCEPTED or the error, then the outputs


@dataclass
class Abort:
    request_id: str


@dataclass
class AbortAll:
    """drain() ran out of time (or was hurried): abort every request."""


@dataclass
class Wake:
    """stop(): wake the thread sleeping on an empty inbox so it sees the stop flag."""


@dataclass
class KVStateQuery:
    """GET /v1/kv/state: the engine thread answers with a KVSnapshot taken between two steps
    (or the EngineDead that says why it cannot)."""
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def answer(self, result: object) -> None:
        """From the engine thread."""
        def settle():
            if self.future.done():  # the client left (the handler was cancelled)
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody asks any more
            pass
