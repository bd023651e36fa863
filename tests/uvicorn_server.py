"""A real uvicorn process serving an ASGI app on a free loopback port, for tests and benchmarks.

`UvicornServer("asgi_app:app")` runs `python -m uvicorn` in a subprocess (app directory
`tests/` by default), waits until the port accepts connections, and stops the process (SIGTERM,
then SIGKILL) on exit. The `uvicorn_server` fixture serves `tests/asgi_app.py` for one module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

TESTS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UvicornServer:
    """`uvicorn APP` on 127.0.0.1:PORT in a child process."""

    def __init__(
        self, app: str, app_dir: Path = TESTS_DIR, port: int | None = None, *extra: str
    ) -> None:
        self.app = app
        self.app_dir = app_dir
        self.port = port if port is not None else free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> UvicornServer:
        """Start the server and wait until it accepts connections; raise if it exits first."""
        args = [sys.executable, "-m", "uvicorn", self.app, "--app-dir", str(self.app_dir)]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"]
        args += ["--log-level", "warning", *self.extra]
        # uvicorn's stderr goes to a file (a pipe could fill and block it); closed by stop()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stderr=self.log, env={**os.environ}
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                raise RuntimeError(f"uvicorn exited with {self.process.returncode}:\n{err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"uvicorn did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        """Stop the process: SIGTERM, then SIGKILL after 5 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.log.close()

    def __enter__(self) -> UvicornServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="module")
def uvicorn_server() -> Iterator[UvicornServer]:
    """`tests/asgi_app.py:app` served by a real uvicorn on a free loopback port."""
    with UvicornServer("asgi_app:app") as server:
        yield server
