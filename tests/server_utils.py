"""Start a real `kvserve serve` process on a free port for tests, and stop it.

    from server_utils import start_server   # tests/ is on sys.path under pytest
    with start_server("--max-num-seqs", "8", env={"KVSERVE_FAULT_AT_STEP": "3"}) as srv:
        httpx.get(srv.url + "/health")
        ...
    # or: srv = start_server(); ...; rc = srv.stop()

Output (stdout and stderr together) goes to a temporary file, never a pipe, so a chatty
server can't block on a full pipe; `srv.log()` reads it back, also after stop(). The file is
removed when the ServerProcess object is garbage-collected.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small engine defaults so a test server stays light on a CPU box; explicit args win.
# float32: the tests compare the server's tokens with an offline float32 engine.
DEFAULT_ARGS = {"--kv-cache-memory": "256MiB", "--max-num-seqs": "16", "--dtype": "float32"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
