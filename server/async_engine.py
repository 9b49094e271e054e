"""The engine in its own thread, fed from the event loop through a thread-safe inbox.

The event loop never runs a step: `add_request` posts a message (server/messages.py) and
awaits the engine thread's answer (accepted, or the ValueError that names the bad field);
outputs come back per request through an asyncio.Queue, all of a step's in one
`loop.call_soon_threadsafe`.
The thread steps while there is work and sleeps on the inbox when there is none; `launch`
builds the engine on that same thread (see there why). `kv_state` is served the same way: the
thread copies the KV cache's state between two steps (waking if idle), so no other thread
ever reads the pool while a step changes it.

Failure modes handled here: a full waiting queue (QueueFull -> 429), a request past its
deadline (aborted, finish_reason "timeout"), a client that goes away (abort), an exception
inside a step (every stream ends with EngineDead, /health turns 503), and shutdown (stop
admitting, drain, abort the rest).
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import Callable

from engine import LLMEngine, RequestOutput, SamplingParams
from engine.kv_state import KVSnapshot
from server.messages import (ACCEPTED, Abort, AbortAll, Add, KVStateQuery, RequestChannel,
                             RequestStream, Wake, deliver)

logger = logging.getLogger("kvserve.server")


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


class EngineDead(Exception):
    """The engine failed (or shut down) and takes no more requests."""


class Draining(Exception):
    """The server is shutting down and admits nothing new."""


class AsyncEngine:
    """Made by launch(), which builds the engine on the engine thread."""

    def __init__(self, build: Callable[[], LLMEngine],
                 make_metrics: Callable[[LLMEngine], object] | None = None,
                 max_queue: int | None = None, request_timeout: float | None = None):
        self.engine: LLMEngine | None = None  # set once built on the engine thread
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.metrics = None                   # make_metrics(engine), once built
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestChannel] = {}  # owned by the engine thread
        self._lock = threading.Lock()
        self._pending_adds = 0                 # posted, not yet taken by the thread
        self._num_waiting = 0                  # the scheduler's queue, published per step
        self._num_requests = 0
        self.error: BaseException | None = None
        # called on the engine thread after a failed step has failed every request (the
        # server shuts itself down from it)
        self.on_failure: Callable[[BaseException], None] | None = None
        self.draining = False
        self._hurry = False  # hurry(): a drain stops waiting and aborts what is left now
        self._stop = threading.Event()
        self._closed = False  # the thread has left its loop: nothing in the inbox is read
        self._kv_snapshots = 0  # numbers each snapshot (engine thread)
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._build, self._make_metrics = build, make_metrics
        self._built = threading.Event()
        # test hook: raise inside the step with this number (engine-fault tests)
        self._fault_at = int(os.environ.get("KVSERVE_FAULT_AT_STEP", "0") or 0)

    # ---------------------------------------------------------------- event-loop side

    @classmethod
    def launch(cls, build: Callable[[], LLMEngine],
               make_metrics: Callable[[LLMEngine], object] | None = None,
               **kwargs) -> "AsyncEngine":
        """Build the engine on the engine thread itself, start stepping there, and return once
        it is built (raising what the build raised).

        Why not build it here and hand it over: libgomp gives each thread that runs a parallel
        torch op its own OpenMP team, and once it manages more threads than there are CPUs it
        stops spinning between parallel regions.  A model loaded on the main thread and
        stepped on another ran ~20% slower per step on a 2-core box; loaded and stepped on one
        thread, there is one team and the step runs as fast as offline."""
        self = cls(build, make_metrics, **kwargs)
        self._thread.start()
        self._built.wait()
        if self.engine is None:
            self._thread.join()
            raise self.error
        return self

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        return self._num_requests + self._pending_adds

    def _check_running(self) -> None:
        if self.error is not None or not self._thread.is_alive():
            raise EngineDead(f"the engine is not running: {self.error!r}")

    def _post(self, cmd) -> None:
        """Into the engine thread's inbox. A thread that failed or stopped between the
        caller's _check_running() and this put reads no more: the command is answered here."""
        self._inbox.put(cmd)
        if self.error is not None or self._closed:
            self._fail_inbox(self.error or EngineDead("the engine stopped"))

    async def add_request(self, request_id: str, prompt: list[int],
                          params: SamplingParams) -> RequestStream:
        self._check_running()
        if self.draining:
            raise Draining("the server is shutting down")
        if self.max_queue is not None and self._num_waiting + self._pending_adds >= self.max_queue:
            raise QueueFull(f"{self._num_waiting + self._pending_adds} requests are waiting "
                            f"(--max-queue {self.max_queue}); retry later")
        channel = RequestChannel(request_id, asyncio.get_running_loop())
        if self.request_timeout:
            channel.deadline = channel.timing.arrival + self.request_timeout
        with self._lock:
            self._pending_adds += 1
        self._post(Add(request_id, prompt, params, channel))
        try:
            ack = await channel.queue.get()
        except asyncio.CancelledError:  # the client left before the engine took it
            self.abort(request_id)
            raise
        if isinstance(ack, BaseException):
            raise ack
        return RequestStream(channel, self.abort)

    def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    async def kv_state(self) -> KVSnapshot:
        """The KV cache's blocks and tables, copied by the engine thread between two steps
        (queries that arrive together share one copy)."""
        self._check_running()
        loop = asyncio.get_running_loop()
        query = KVStateQuery(loop, loop.create_future())
        self._post(query)
        return await query.future

    async def drain(self, timeout: float) -> int:
        """Stop admitting, let running requests finish for up to `timeout` seconds, abort
        the rest; returns how many were aborted."""
        self.draining = True
        end = time.monotonic() + timeout
        while self.num_unfinished and time.monotonic() < end and self.healthy \
                and not self._hurry:
            await asyncio.sleep(0.05)
        left = self.num_unfinished
        if left:
            self._inbox.put(AbortAll())
            while self.num_unfinished and self.healthy and time.monotonic() < end + 5:
                await asyncio.sleep(0.02)
        return left

    def hurry(self) -> None:
        """A drain in progress aborts the unfinished requests now instead of waiting."""
        self._hurry = True

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(Wake())
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.engine is not None:
            self.engine.shutdown()  # the other tensor-parallel ranks, if any

    # ---------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            engine = self._build()
            self.metrics = self._make_metrics(engine) if self._make_metrics else None
            self.engine = engine
            from engine import tp
            if tp.WORKERS is not None:  # a rank that dies wakes an idle engine to fail
                tp.WORKERS.on_death.append(lambda why: self._inbox.put(Wake()))
        except BaseException as e:  # noqa: BLE001 - launch() re-raises it
            self.error = e
            return
        finally:
            self._built.set()
        steps = 0
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not engine.has_unfinished_requests())
                if self._stop.is_set():
                    break
                self._expire()
                if not engine.has_unfinished_requests():
                    engine.check_health()  # idle: woken by a lost rank (step() checks too)
                    continue
                steps += 1
                if self._fault_at and steps == self._fault_at:
                    raise RuntimeError(f"injected engine fault at step {steps}")
                t0 = time.monotonic()
                outputs = engine.step()
                self._publish(outputs, t0)
            # stopped: whoever still waits on the inbox hears it (kv_state has no other way)
            self._closed = True
            self._fail_inbox(EngineDead("the engine stopped"))
        except BaseException as e:  # noqa: BLE001 - every stream must hear about it
            logger.exception("engine step failed; failing every request")
            self.error = e
            for stream in list(self._streams.values()):
                stream.put(EngineDead(f"the engine failed: {e!r}"))
            self._streams.clear()
            self._num_requests = 0
            self._fail_inbox(e)
            if self.on_failure is not None:
                try:
                    self.on_failure(e)
                except Exception:  # noqa: BLE001 - the thread is ending either way
                    logger.exception("engine failure callback failed")

    def _fail_inbox(self, error: BaseException) -> None:
        """After a failure: answer whatever is in the inbox (either thread may call this)."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, Add):
                with self._lock:
                    self._pending_adds -= 1
                cmd.channel.put(EngineDead(f"the engine failed: {error!r}"))
            elif isinstance(cmd, KVStateQuery):
                cmd.answer(EngineDead(f"the engine is not running: {error!r}"))

    def _drain_inbox(self, block: bool) -> None:
        queries = []
        while True:
            try:
                cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            if isinstance(cmd, KVStateQuery):  # answered below, after the adds and aborts
                queries.append(cmd)
                continue
            if isinstance(cmd, Add):
                self._add(cmd)
            elif isinstance(cmd, Abort):
                self._abort(cmd.request_id, None)
            elif isinstance(cmd, AbortAll):
                for rid in list(self._streams):
                    self._abort(rid, None)
            self._refresh()  # after every message
        if queries:
            self._answer_kv_state(queries)

    def _answer_kv_state(self, queries: list[KVStateQuery]) -> None:
        self._kv_snapshots += 1
        try:
            result = self.engine.kv_state(self._kv_snapshots)
        except Exception as e:  # noqa: BLE001 - a bug here must not stop the serving
            logger.exception("taking the KV state failed")
            result = e
        for query in queries:
            query.answer(result)

    def _add(self, cmd: Add) -> None:
        request_id, stream = cmd.request_id, cmd.channel
        try:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self.engine.add_request(request_id, cmd.prompt, cmd.params,
                                    arrival_time=stream.timing.arrival)
        except ValueError as e:
            stream.put(e)
        except BaseException as e:  # an engine bug: fail this request too, then the engine
            stream.put(EngineDead(f"the engine failed: {e!r}"))
            raise
        else:
            self._streams[request_id] = stream
            # it waits until the next step; counted before it stops being pending below, so
            # --max-queue never sees a gap in which it is neither
            self._num_waiting += 1
            stream.put(ACCEPTED)
        finally:
            # counted as running before it stops counting as pending: drain() never sees a
            # gap in which an accepted request is neither
            self._num_requests = len(self._streams)
            with self._lock:
                self._pending_adds -= 1

    def _abort(self, request_id: str, reason: str | None) -> None:
        stream = self._streams.pop(request_id, None)
        out = self.engine.abort_request(request_id)
        if stream is None or out is None:
            return
        if reason:
            for c in out.outputs:
                if c.finish_reason == "abort":
                    c.finish_reason = reason
        if self.metrics:
            self.metrics.on_finished(stream.timing, out)
        stream.put(out)

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [rid for rid, stream in self._streams.items()
                   if stream.deadline is not None and now >= stream.deadline]
        for rid in expired:
            self._abort(rid, "timeout")
        if expired:
            self._refresh()

    def _refresh(self) -> dict:
        """Publish what the event loop reads (admission, drain) and the state gauges. Called
        after every step and after adds/aborts: an abort with nothing else running is followed
        by no step, and the gauges must still go back to 0."""
        stats = self.engine.stats
        self._num_requests = len(self._streams)
        self._num_waiting = stats["num_waiting"]
        if self.metrics:
            self.metrics.on_state(stats)
        return stats

    def _publish(self, outputs: list[RequestOutput], t0: float) -> None:
        now = time.monotonic()
        ready: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.timing.scheduled is None:
                stream.timing.scheduled = out.first_scheduled_time
            if self.metrics:
                self.metrics.on_output(stream.timing, out, now)
            if out.finished:
                del self._streams[out.request_id]
                if self.metrics:
                    self.metrics.on_finished(stream.timing, out)
            ready.setdefault(stream.loop, []).append((stream.queue, out))
        # counters and gauges first: a client reacting to its token must not find the queue
        # length (admission) or a metrics scrape from before this step
        stats = self._refresh()
        if self.metrics:
            self.metrics.on_step(stats, now - t0)
        for loop, items in ready.items():  # one wake-up of each loop per step, not per request
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the loop is closed: the server is gone
                pass
