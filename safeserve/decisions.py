"""Decision records: what a guard did for one call, and why.

A record is built only for calls that were degraded, flagged or sampled (or when `.call()` asks
for one); building it is the cost of a degradation, never of a healthy call.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from safeserve.recording import REDACTED, InputRecorder, Recorded, Scrubber, json_safe

__all__ = [  # `InputRecorder` and `json_safe` live in `recording`; re-exported for their users
    "SCHEMA_VERSION",
    "Attempt",
    "Decision",
    "InputRecorder",
    "OpenAggregate",
    "Outcome",
    "RawAttempt",
    "RawReason",
    "Reason",
    "Record",
    "describe_error",
    "json_safe",
    "new_id",
    "now_utc",
]
SCHEMA_VERSION = 1
_ERROR_CHARS = 200

_id_prefix = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_id() -> str:
    """A unique, process-ordered 32-hex-digit id (random process prefix + counter)."""
    return f"{_id_prefix}{next(_id_counter):016x}"


def now_utc() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


class Reason(BaseModel):
    """Why a call degraded: a code from the fixed list, the stage that found it, a short detail."""

    model_config = ConfigDict(frozen=True)

    code: str
    stage: str
    detail: str | None = None


class Attempt(BaseModel):
    """One try of the primary or of a fallback, in call order."""

    model_config = ConfigDict(frozen=True)

    name: str
    ok: bool
    latency_ms: float
    error: str | None = None


class Decision(BaseModel):
    """The record of one degraded, flagged or sampled call (SPEC 2)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: Literal["decision"] = "decision"
    schema_version: int = SCHEMA_VERSION
    id: str
    ts: datetime
    policy: str
    owner: str | None = None
    model_version: str | None = None
    served_by: str | None = None
    degraded: bool = False
    flagged: bool = False
    reasons: list[Reason] = []
    attempts: list[Attempt] = []
    confidence: float | None = None
    breaker_state: str = "closed"
    latency_ms: float = 0.0
    inputs: Any = None
    output: Any = None
    row: int | None = None
    batch_id: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The JSON-safe log line: `inputs` only when logged, `output` only when asked for."""
        rec = self.model_dump(mode="json", exclude={"inputs", "output"})
        for name in ("inputs", "output"):
            if name in self.model_fields_set:
                rec[name] = json_safe(getattr(self, name))
        return rec


class RawReason(NamedTuple):
    """A reason as the call path keeps it; becomes a `Reason` model on demand."""

    code: str
    stage: str
    detail: str | None = None


class RawAttempt(NamedTuple):
    """An attempt as the call path keeps it; becomes an `Attempt` model on demand."""

    name: str
    ok: bool
    latency_ms: float
    error: str | None = None


_UNSET: Any = object()


class Record:
    """A decision as the call path makes it: plain slots, cheap to build.

    The pydantic `Decision` is built from it only when someone asks (`.call()`, `decisions()`,
    `NoFallbackAvailable.decision`); the log writer renders `to_record()` straight from it.
    """

    __slots__ = (
        "_decision",
        "_inputs",
        "_output",
        "_recorder",
        "_scrubber",
        "_secrets",
        "attempts",
        "batch_id",
        "breaker_state",
        "confidence",
        "degraded",
        "flagged",
        "id",
        "latency_ms",
        "model_version",
        "owner",
        "policy",
        "reasons",
        "row",
        "served_by",
        "ts",
    )

    def __init__(
        self,
        policy: str,
        owner: str | None,
        model_version: str | None,
        served_by: str | None,
        degraded: bool,
        flagged: bool,
        reasons: list[RawReason],
        attempts: list[RawAttempt],
        confidence: float | None,
        breaker_state: str,
        latency_ms: float,
    ) -> None:
        self.id = new_id()
        self.ts = time.time()
        self.policy = policy
        self.owner = owner
        self.model_version = model_version
        self.served_by = served_by
        self.degraded = degraded
        self.flagged = flagged
        self.reasons = reasons
        self.attempts = attempts
        self.confidence = confidence
        self.breaker_state = breaker_state
        self.latency_ms = latency_ms
        self._inputs: Any = _UNSET
        self._output: Any = _UNSET
        self._recorder: InputRecorder | None = None
        self._secrets: Sequence[tuple[Any, str]] = ()
        self._scrubber: Scrubber | None = None
        self.row: int | None = None
        self.batch_id: str | None = None
        self._decision: Decision | None = None

    @property
    def inputs(self) -> Any:
        """The recorded input (already redacted and hashed); `_UNSET` when not recorded."""
        return self._inputs

    @inputs.setter
    def inputs(self, value: Any) -> None:
        # `record.inputs = recorder(x)`: a `Recorded` also hands over what must stay out of the
        # log (the call's redacted and hashed values), scrubbed from every string at `to_record`.
        if isinstance(value, Recorded):
            self.keep(value)
            self._inputs = value.value
        else:
            self._inputs = value

    @property
    def output(self) -> Any:
        """The served answer: recorded by the recorder, or as given (then redacted by key when
        the record is rendered)."""
        out = self._output
        return out.value if isinstance(out, Recorded) else out

    @output.setter
    def output(self, value: Any) -> None:
        if isinstance(value, Recorded):  # already redacted by key; its values scrubbed too
            self._recorder = value.recorder
            self._scrubber = None
        self._output = value

    def keep(self, recorded: Recorded) -> None:
        """Add what the recorder found (values to scrub from the text) without recording the
        value itself: the call's input when inputs are not logged, or a whole batch's rows,
        whose shared error message may quote any of them."""
        self._recorder = recorded.recorder
        self._secrets = [*self._secrets, *recorded.secrets] if self._secrets else recorded.secrets
        self._scrubber = None

    def to_record(self) -> dict[str, Any]:
        """The JSON-safe log line (SPEC 2)."""
        rec: dict[str, Any] = {
            "kind": "decision",
            "schema_version": SCHEMA_VERSION,
            "id": self.id,
            "ts": datetime.fromtimestamp(self.ts, UTC).isoformat(),
            "policy": self.policy,
            "owner": self.owner,
            "model_version": self.model_version,
            "served_by": self.served_by,
            "degraded": self.degraded,
            "flagged": self.flagged,
            "reasons": [{"code": r[0], "stage": r[1], "detail": r[2]} for r in self.reasons],
            "attempts": [
                {"name": a[0], "ok": a[1], "latency_ms": a[2], "error": a[3]} for a in self.attempts
            ],
            "confidence": self.confidence,
            "breaker_state": self.breaker_state,
            "latency_ms": self.latency_ms,
            "row": self.row,
            "batch_id": self.batch_id,
        }
        if self._inputs is not _UNSET:
            rec["inputs"] = self._inputs
        if self._output is not _UNSET:
            rec["output"] = self.output
        if self._recorder is not None:
            self._redact(rec)
        return rec

    def _redact(self, rec: dict[str, Any]) -> None:
        """Keep the call's redacted and hashed values out of the rendered record: by key in the
        output, by value in every free-text field (at render time, off the call path)."""
        recorder = self._recorder
        assert recorder is not None
        if not self._secrets and "output" not in rec:
            return  # nothing met that could be written anywhere
        try:
            found: list[tuple[Any, str]] = []
            output = self._output
            if isinstance(output, Recorded):
                found = output.secrets
            elif "output" in rec:  # given as is (`json_safe`): redacted by key here
                rec["output"] = recorder.redact_keys(rec["output"], found)
            scrubber = self._scrubber
            if scrubber is None:  # the same answer finds the same fields: built once per record
                scrubber = self._scrubber = Scrubber([*self._secrets, *found])
            if scrubber:
                scrubber.record(rec)
        except Exception:  # fail closed: a record we could not scrub keeps no free text at all
            for item in (*rec["reasons"], *rec["attempts"]):
                for key in ("detail", "error"):
                    if item.get(key) is not None:
                        item[key] = REDACTED
            for key in ("inputs", "output"):
                if key in rec:
                    rec[key] = REDACTED

    def decision(self) -> Decision:
        """The pydantic `Decision` of this record (built once, from the log line)."""
        if self._decision is None:
            self._decision = Decision.model_validate(self.to_record())
        return self._decision


class Outcome:
    """What `.call()` returns: the answer (`value`) and the `decision` behind it."""

    __slots__ = ("_record", "value")

    def __init__(self, value: Any, record: Record | Decision) -> None:
        self.value = value
        self._record = record

    @property
    def decision(self) -> Decision:
        r = self._record
        return r if isinstance(r, Decision) else r.decision()

    def __repr__(self) -> str:
        return f"Outcome(value={self.value!r}, decision={self.decision!r})"


class OpenAggregate:
    """Counts calls rejected by an open breaker; one `rejected_while_open` record per second.

    An outage at 1000 calls/s then writes one line a second, with the count and the split by
    `served_by`, instead of a thousand decisions (`DecisionLogConfig(open_breaker="aggregate")`).
    """

    def __init__(self, writer: Any, policy: str, owner: str | None) -> None:
        self._writer = writer
        self._policy = policy
        self._owner = owner
        self._second = 0
        self._served: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def add(self, served_by: str | None) -> None:
        now = int(time.time())
        with self._lock:
            if now != self._second:
                self._flush_locked()
                self._second = now
            self._served[served_by] = self._served.get(served_by, 0) + 1

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._served:
            return
        served, self._served = self._served, {}
        if self._writer is not None:
            self._writer.submit(_Aggregate(self._policy, self._owner, self._second, served))


class _Aggregate:
    __slots__ = ("owner", "policy", "second", "served")

    def __init__(
        self, policy: str, owner: str | None, second: int, served: dict[str | None, int]
    ) -> None:
        self.policy, self.owner, self.second, self.served = policy, owner, second, served

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "rejected_while_open",
            "schema_version": SCHEMA_VERSION,
            "id": new_id(),
            "ts": datetime.fromtimestamp(self.second, UTC).isoformat(),
            "policy": self.policy,
            "owner": self.owner,
            "count": sum(self.served.values()),
            "served_by": {str(k) if k is not None else "none": v for k, v in self.served.items()},
        }


def describe_error(exc: BaseException) -> str:
    """`TypeName: short message`, never a traceback."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    name = type(exc).__name__
    out = f"{name}: {text}" if text else name
    return out if len(out) <= _ERROR_CHARS else out[: _ERROR_CHARS - 1] + "…"
