"""The decision-log writer: a bounded queue and one writer thread per sink.

Calls only enqueue; the writer thread turns records into JSON lines through a structlog
processor chain and writes them. A full queue drops the record and counts it; the writer
reports the drops as a record of their own once it catches up. Logs are flushed at exit and by
`flush_logs()`.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from safeserve.decisions import SCHEMA_VERSION, new_id, now_utc

if TYPE_CHECKING:
    from structlog.typing import Processor


class Record(Protocol):
    """Anything with a JSON-safe `to_record()` (decisions, breaker events, profiles)."""

    def to_record(self) -> dict[str, Any]: ...


Sink = str | Path | Callable[[dict[str, Any]], Any]


def _serializer() -> Callable[..., bytes]:
    try:
        import orjson
    except ImportError:  # the `fast` extra is optional

        def dumps(obj: Any, **_: Any) -> bytes:
            return json.dumps(obj, separators=(",", ":"), default=repr).encode()

        return dumps

    option = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY

    def orjson_dumps(obj: Any, **_: Any) -> bytes:
        return orjson.dumps(obj, option=option, default=repr)

    return orjson_dumps


def _renderable(value: Any) -> Any:
    """`value` with what JSON allows but the renderer refuses made writable: lone surrogates in
    strings (keys too) become U+FFFD, integers beyond 64 bits their decimal strings."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, dict):
        return {_renderable(k): _renderable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_renderable(v) for v in value]
    return value


class LogWriter:
    """Writes records to one sink from a background thread, never blocking the caller."""

    def __init__(self, sink: Sink, queue_size: int) -> None:
        self.sink = sink
        self.dropped = 0  # records refused by a full queue (reported later as a drops record)
        self.failed = 0  # records the sink refused (a write error, a raising callable)
        self._last_error: str | None = None
        self._failed_reported = 0  # `failed` as of the last flush
        self._reported_drops = 0
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.synchronous = False
        self._fd: int | None = None
        # structlog's processor chain, run directly on each record: a bound logger's own
        # bookkeeping (context copies, method lookup) cost four times the rendering itself.
        # A callable sink gets the event dict; a file or stdout gets JSON lines. Imported here:
        # structlog takes 0.1 s to import (rich with it, when installed), and a process that
        # writes no log should not wait for it.
        self._processors: list[Processor] = []
        self._pending: list[Any] = []
        if not callable(sink):
            from structlog.processors import JSONRenderer

            self._processors.append(JSONRenderer(serializer=_serializer()))
            if sink != "stdout":
                self._fd = self._open()  # a sink that cannot be opened fails now, not per record

    def _open(self) -> int:
        path = Path(self.sink)  # type: ignore[arg-type]
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # -- caller side -------------------------------------------------------------------------
    def submit(self, record: Record) -> bool:
        """Queue a record; False (and a counted drop) when the queue is full."""
        if self.synchronous:
            with self._lock:
                self._write([record])
            return True
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            return False
        return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is written; False on timeout, or when the sink
        refused records since the previous flush."""
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                self._drain_inline()
            return self._nothing_lost()
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s) and self._nothing_lost()

    def _nothing_lost(self) -> bool:
        lost, self._failed_reported = self.failed - self._failed_reported, self.failed
        return not lost

    # -- writer side -------------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="safeserve-log-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            batch: list[Any] = []
            markers: list[threading.Event] = []
            while True:
                (markers if isinstance(item, threading.Event) else batch).append(item)
                if len(batch) >= 512:
                    break
                try:
                    item = get(block=False)
                except queue.Empty:
                    break
            try:
                with self._lock:
                    self._write(batch)
            except Exception as exc:  # the writer thread must outlive any one bad batch
                print(f"safeserve: decision log writer error: {exc!r}", file=sys.stderr)
            for m in markers:
                m.set()

    def _drain_inline(self) -> None:
        batch = []
        while True:
            try:
                item = self._queue.get(block=False)
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                item.set()
            else:
                batch.append(item)
        self._write(batch)

    def _write(self, batch: list[Any]) -> None:
        """Render and write a batch of records (called with the lock held)."""
        if self.dropped > self._reported_drops:
            batch.append(_DropsRecord(self.dropped - self._reported_drops))
            self._reported_drops = self.dropped
        for record in batch:
            try:
                self._pending.append(self._render(record.to_record()))
            except Exception:  # a lone surrogate ("\ud800") or a 70-bit integer in a JSON body
                self._render_scrubbed(record)
        lost = self._emit()
        if lost:
            self.failed += lost

    def _render_scrubbed(self, record: Any) -> None:
        """A record that failed to render, again with its values made renderable (`_renderable`);
        if even that fails, a drops record in its place, counted as lost."""
        try:
            self._pending.append(self._render(_renderable(record.to_record())))
        except Exception as exc:  # a record that cannot be rendered must not stop the log
            self.failed += 1
            bad = _DropsRecord(1, f"unrenderable: {type(exc).__name__}")
            self._pending.append(self._render(bad.to_record()))

    @property
    def name(self) -> str:
        """The sink as a label: its path, "stdout", or the callable's name."""
        if callable(self.sink):
            return str(getattr(self.sink, "__qualname__", type(self.sink).__name__))
        return str(self.sink)

    def _failed(self, exc: Exception) -> None:
        """Say once per kind of error (not once per record) that the sink refuses records."""
        error = f"{type(exc).__name__}: {exc}"
        if error != self._last_error:
            self._last_error = error
            print(f"safeserve: decision log {self.name} refused records: {error}", file=sys.stderr)

    def _render(self, event: Any) -> Any:
        for processor in self._processors:
            event = processor(None, "msg", event)
        return event

    def _emit(self) -> int:
        """Hand the pending records to the sink; the number it refused."""
        pending, self._pending = self._pending, []
        if not self._processors:
            lost = 0
            for event in pending:
                try:
                    self.sink(event)  # type: ignore[operator]
                except Exception as exc:  # the user's callable: count and carry on
                    lost += 1
                    self._failed(exc)
            return lost
        lines: list[bytes] = pending
        if not lines:
            return 0
        data = b"\n".join(lines) + b"\n"
        written = 0
        try:
            if self.sink == "stdout":
                sys.stdout.write(data.decode())
                sys.stdout.flush()
                return 0
            if self._fd is None:
                self._fd = self._open()
            # One write of whole lines, appended: replicas sharing a file never split a line.
            view = memoryview(data)
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except (OSError, ValueError) as exc:
            self._failed(exc)
            return len(lines) - data.count(b"\n", 0, written)  # the lines not (wholly) written
        return 0

    def _after_fork(self) -> None:
        self._thread = None
        self._lock = threading.Lock()
        self._queue = queue.Queue(self._queue.maxsize)


class _DropsRecord:
    """Reports records lost to a full queue, written when the writer catches up."""

    def __init__(self, count: int, detail: str = "queue full") -> None:
        self.count = count
        self.detail = detail

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "drops",
            "schema_version": SCHEMA_VERSION,
            "id": new_id(),
            "ts": now_utc().isoformat(),
            "count": self.count,
            "detail": self.detail,
        }


_writers: dict[Any, LogWriter] = {}
_registry_lock = threading.Lock()
_synchronous = False


def writer_for(sink: Sink, queue_size: int) -> LogWriter:
    """The one writer of a sink (a path, "stdout" or a callable), created on first use."""
    key: Any = sink if callable(sink) or sink == "stdout" else str(Path(sink).resolve())
    with _registry_lock:
        writer = _writers.get(key)
        if writer is None:
            writer = _writers[key] = LogWriter(sink, queue_size)
            writer.synchronous = _synchronous
        return writer


def flush_logs(timeout_s: float = 5.0) -> bool:
    """Write every queued record (and each guard's pending profile); True when all done in time."""
    from safeserve.registry import flush_guards

    flush_guards()
    with _registry_lock:
        writers = list(_writers.values())
    results = [w.flush(timeout_s) for w in writers]
    return all(results)


def set_synchronous(on: bool) -> None:
    """Testing mode: write records in the calling thread (flushing what is queued first)."""
    global _synchronous
    with _registry_lock:
        _synchronous = on
        writers = list(_writers.values())
    for w in writers:
        if on:
            w.flush()
        w.synchronous = on


def _reset_after_fork() -> None:
    for w in _writers.values():
        w._after_fork()


atexit.register(flush_logs, 5.0)
os.register_at_fork(after_in_child=_reset_after_fork)
