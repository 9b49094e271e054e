"""`kvserve serve`: the engine, its thread, the app and uvicorn, with a graceful SIGTERM.

On SIGTERM/SIGINT the server keeps listening but admits nothing new (503), lets running
requests finish for up to --shutdown-timeout seconds, aborts the rest, then stops uvicorn and
exits 0.  A second signal aborts the running requests at once (each stream still ends with
finish_reason "abort" and [DONE]); a third stops without waiting for anything.  If the
engine fails, every request hears about it (an error event, or 503), then the server shuts
down and exits 1, as vLLM's does: a supervisor watching exit codes sees the failure.
"""
from __future__ import annotations

import asyncio
import logging

import uvicorn
from fastapi import FastAPI

from server.app import MAX_REQUEST_BYTES, build_app
from server.async_engine import AsyncEngine
from server.metrics import Metrics

logger = logging.getLogger("kvserve.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, aengine: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.aengine = aengine
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._hurried = False
        self._drain_task: asyncio.Task | None = None  # held: the loop keeps only weak refs
        self.engine_failed = False
        aengine.on_failure = self._on_engine_failure

    def _on_engine_failure(self, error: BaseException) -> None:  # the engine thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._shut_down_failed, error)

    def _shut_down_failed(self, error: BaseException) -> None:
        self.engine_failed = True
        logger.error("the engine failed (%r): shutting the server down, exit code 1", error)
        self.should_exit = True  # uvicorn lets the in-flight responses finish first

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._loop is None or self._hurried:
            return super().handle_exit(sig, frame)
        if self._draining:
            self._hurried = True
            logger.info("signal %s again: aborting the running requests now (a third signal "
                        "stops at once)", sig)
            self.aengine.hurry()
            return
        self._draining = True
        logger.info("signal %s: draining (up to %.0fs), then exiting", sig, self.shutdown_timeout)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        aborted = await self.aengine.drain(self.shutdown_timeout)
        if aborted:
            logger.info("aborted %d unfinished requests at shutdown", aborted)
        self.should_exit = True


def build_server(engine_kwargs: dict, api_key: str | None = None,
                 max_queue: int | None = None, request_timeout: float | None = None,
                 served_model_name: str | None = None,
                 max_request_bytes: int | None = None) -> tuple[AsyncEngine, FastAPI]:
    """The engine on its thread and the app over it (what `kvserve serve` runs, and what the
    tests run in process); stop the AsyncEngine when done."""
    from engine import LLMEngine
    aengine = AsyncEngine.launch(
        lambda: LLMEngine.from_args(**engine_kwargs),
        lambda engine: Metrics(served_model_name or engine.model_name,
                               engine.config.max_model_len),
        max_queue=max_queue, request_timeout=request_timeout)
    try:
        app = build_app(aengine, served_model_name=served_model_name or aengine.engine.model_name,
                        api_key=api_key, max_request_bytes=max_request_bytes or MAX_REQUEST_BYTES)
    except BaseException:
        aengine.stop()
        raise
    return aengine, app


def page_url(host: str, port: int) -> str:
    """The KV inspector's URL as a browser on this machine reaches it (a wildcard address
    listens on loopback too)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}/kv"


def serve(engine_kwargs: dict, host: str = "127.0.0.1", port: int = 8000,
          shutdown_timeout: float = 30.0, log_level: str = "info", **app_options) -> int:
    """Serve until SIGTERM (see the module docstring); app_options: build_server's."""
    aengine, app = build_server(engine_kwargs, **app_options)
    try:
        name = app.state.server.model_name
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                                timeout_graceful_shutdown=5, access_log=False)
        server = _Server(config, aengine, shutdown_timeout)
        logger.info("serving %s on http://%s:%d (OpenAI API under /v1)", name, host, port)
        logger.info("KV inspector: %s%s", page_url(host, port),
                    " (the page asks for the API key)" if app_options.get("api_key") else "")
        server.run()
    finally:
        aengine.stop()
    return 0 if server.started and not server.engine_failed else 1
