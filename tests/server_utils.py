"""Servers for the tests: the app in this process, or a real `kvserve serve` process.

In process (most tests): the engine thread and the app built as `kvserve serve` builds them,
reached through httpx.ASGITransport, without uvicorn or a socket:

    from server_utils import InProcessServer   # tests/ is on sys.path under pytest
    with InProcessServer("--max-num-seqs", "8") as srv:
        with srv.client() as c:                 # a sync httpx.Client
            c.get("/health")
        async with srv.async_client() as c:     # an httpx.AsyncClient, on any event loop
            await c.post("/v1/completions", json={...})
        with srv.listening() as url:            # uvicorn on a thread, on a real socket
            ...

ASGITransport hands over a response once the app has sent all of it, so a client sees a
stream only whole (fine for reading it to its end) and can never hang up mid-way; timeouts
do not apply. `listening()` serves the same app on 127.0.0.1 for what needs a connection (a
client that hangs up, a tool that takes a URL). A real process is for signals, exit codes,
the CLI and process-wide settings (environment variables):

    from server_utils import start_server
    with start_server("--max-num-seqs", "8", env={"KVSERVE_FAULT_AT_STEP": "3"}) as srv:
        httpx.get(srv.url + "/health")
        ...
    # or: srv = start_server(); ...; rc = srv.stop()

A process's output (stdout and stderr together) goes to a temporary file, never a pipe, so a
chatty server can't block on a full pipe; `srv.log()` reads it back, also after stop(). The
file is removed when the ServerProcess object is garbage-collected. Both kinds have `.url`,
`.client()` and `.async_client()`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio.from_thread
import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small engine defaults so a test server stays light on a CPU box; explicit args win.
# float32: the tests compare the server's tokens with an offline float32 engine.
DEFAULT_ARGS = {"--kv-cache-memory": "256MiB", "--max-num-seqs": "16", "--dtype": "float32"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- in process


def serve_options(*args: str) -> tuple[dict, dict]:
    """`kvserve serve` flags (DEFAULT_ARGS under them) -> (LLMEngine.from_args kwargs, the
    app's options), read with server/cli.py's own flags; --host, --port and
    --shutdown-timeout belong to a process and are refused."""
    from server.cli import add_app_args, add_engine_args, app_options, engine_kwargs
    parser = argparse.ArgumentParser(prog="kvserve serve (in process)")
    add_engine_args(parser)
    add_app_args(parser)
    defaults = [x for kv in DEFAULT_ARGS.items() for x in kv]
    ns = parser.parse_args([*defaults, *map(str, args)])  # the later flag wins
    return engine_kwargs(ns), app_options(ns)


class _AsyncBody(httpx.AsyncByteStream):
    """A sync client's request body (bytes or an iterator of chunks), read on the loop."""

    def __init__(self, stream):
        self._stream = stream

    async def __aiter__(self):
        for chunk in self._stream:
            yield chunk


class _SyncASGITransport(httpx.BaseTransport):
    """httpx.ASGITransport for a sync httpx.Client: each request runs on `portal`'s event
    loop (another thread) and comes back with its body read, as ASGITransport has it."""

    def __init__(self, app, portal: anyio.from_thread.BlockingPortal):
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send():
            forward = httpx.Request(request.method, request.url, headers=request.headers,
                                    stream=_AsyncBody(request.stream),
                                    extensions=request.extensions)
            response = await self._asgi.handle_async_request(forward)
            return response.status_code, response.headers, await response.aread()

        status, headers, content = self._portal.call(send)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content))


class InProcessServer:
    """The engine thread and the app of `kvserve serve *args` (server/serve.py's
    build_server, as the CLI runs it), in this process; a context manager that stops the
    engine on exit."""

    url = "http://kvserve.test"  # any name: the transports never resolve it

    def __init__(self, *args: str):
        from server.serve import build_server
        engine_kw, opts = serve_options(*args)
        self.aengine, self.app = build_server(engine_kw, **opts)
        self._exit = contextlib.ExitStack()
        self._exit.callback(self.aengine.stop)
        try:
            # the event loop (on its own thread) that sync clients' requests run on
            self._portal = self._exit.enter_context(anyio.from_thread.start_blocking_portal())
        except BaseException:
            self._exit.close()
            raise

    def client(self, **kwargs) -> httpx.Client:
        """A sync httpx.Client for the app (pass it to clients.Client or openai.OpenAI as
        their http_client)."""
        return httpx.Client(transport=_SyncASGITransport(self.app, self._portal),
                            base_url=self.url, **kwargs)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        """An httpx.AsyncClient for the app; the app runs on the loop that awaits it."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                 base_url=self.url, **kwargs)

    @contextlib.contextmanager
    def listening(self):
        """The app on a real socket (uvicorn on a thread of this process) for tools that need
        a URL (lm-evaluation-harness): yields its base URL; stops listening on exit."""
        import uvicorn
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # connections wait in the backlog until uvicorn accepts: no start-up wait
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                  name="uvicorn", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join()
            sock.close()

    def stop(self) -> None:
        """Stop the engine thread (and the sync clients' loop); idempotent."""
        self._exit.close()

    def __enter__(self) -> "InProcessServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- a real process


class ServerProcess:
    """A `python -m server.cli serve` child process; a context manager that stops it on exit."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 startup_timeout: float = 90.0, log_level: str = "INFO"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        given = set(args)
        extra = [x for k, v in DEFAULT_ARGS.items() if k not in given for x in (k, v)]
        self.cmd = [sys.executable, "-m", "server.cli", "--log-level", log_level, "serve",
                    "--port", str(self.port), *extra, *map(str, args)]
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self._log_file = tempfile.NamedTemporaryFile(
            prefix=f"kvserve-{self.port}-", suffix=".log", delete=False)
        self.log_path = Path(self._log_file.name)
        self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=full_env,
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop(timeout=5)
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was "
                                   f"healthy; output tail:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout:.0f}s; output tail:\n"
                           f"{self.log_tail()}")

    def log(self) -> str:
        """Everything the process wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log()[-n_chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **kwargs)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, **kwargs)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log_file.closed:
            self._log_file.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leave a server running; drop the log
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log_file = getattr(self, "_log_file", None)
        if log_file is not None:
            log_file.close()
            self.log_path.unlink(missing_ok=True)


def start_server(*args: str, env: dict[str, str] | None = None,
                 startup_timeout: float = 90.0) -> ServerProcess:
    """Start `kvserve serve --port <free> *args` and wait until GET /health is 200."""
    return ServerProcess(*args, env=env, startup_timeout=startup_timeout)
