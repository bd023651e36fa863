"""A real `redis-server` on a free loopback port, for tests and benchmarks.

`RedisServer` starts Debian's `redis-server` in a temporary directory with persistence off
(`--save '' --appendonly no`), waits until it answers PING, and stops it. It can also be killed
mid-test (`kill()`), restarted on the same port (`start()` again), and hung (`pause()` sends
SIGSTOP, `resume()` SIGCONT) to imitate a Redis that accepts connections but never answers.
The `redis_server_fixture` fixture (registered as `redis_server`) gives each test its own server.
A missing `redis-server` is an error, never a skip: the store is only tested against the real one.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

DEBIAN_PATH = "/usr/bin/redis-server"


def redis_server_binary() -> str:
    """The path of `redis-server`; raises when it is not installed."""
    found = shutil.which("redis-server") or (DEBIAN_PATH if Path(DEBIAN_PATH).exists() else None)
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: `apt-get install redis-server` (the store tests "
            "run against a real server and do not skip)"
        )
    return found


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def send_command(port: int, *args: str, timeout_s: float = 0.5) -> bytes:
    """Send one command in RESP and return its raw reply, stripped (no redis-py needed)."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.rstrip(b"\r\n")


class RedisServer:
    """One `redis-server` process on a fixed loopback port, started and stopped on demand."""

    def __init__(self, workdir: str | Path | None = None, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="safeserve-redis-")
            workdir = self._own_dir.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        """The `redis://` URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server (again on the same port after `kill()`/`stop()`); wait for PING."""
        if self.running:
            return self
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        deadline = time.monotonic() + timeout_s
        while True:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.workdir,
            )
            self.paused = False
            if self._wait_for_ping(deadline):
                return self
            code = self.process.poll()
            self._reap()
            if code is None or time.monotonic() >= deadline:
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING\n{self.log()}"
                )
            # The port was taken between free_port() and bind (or is still held): try again.
            time.sleep(0.05)

    def _wait_for_ping(self, deadline: float) -> bool:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.01)
        return False

    def ping(self, timeout_s: float = 0.5) -> bool:
        """True when the server answers PING within `timeout_s`."""
        try:
            return send_command(self.port, "PING", timeout_s=timeout_s) == b"+PONG"
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Run one command (e.g. `FLUSHALL`) and return its raw reply."""
        return send_command(self.port, *args, timeout_s=2.0)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, connections reset (the port stays reserved)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL if it lingers)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if self.paused:
                self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket open but never answers (a hung Redis)."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self.running and self.paused:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _reap(self) -> None:
        if self.process is not None:
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.paused = False

    def close(self) -> None:
        """Stop the server and remove its directory when this object made it."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh `redis-server` for one test; `.url` to connect, `.kill()`/`.start()` to cut it."""
    try:
        server = RedisServer(tmp_path / "redis")
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        yield server
