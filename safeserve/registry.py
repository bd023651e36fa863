"""Live guards, for process-wide actions: drills, testing mode, flushing, admin routes."""

from __future__ import annotations

import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from safeserve.histograms import Histograms

if TYPE_CHECKING:
    from safeserve.guard import Guard

_guards: weakref.WeakSet[Guard] = weakref.WeakSet()
_lock = threading.Lock()
_drills: list[tuple[str, str | None]] = []  # (reason, policy name or None for all)
testing_mode = False
# set by an admin router that exports every guard: new guards keep histograms from the start
histograms_everywhere = False


class Remains:
    """What outlives a guard: its name, a reader of its counts (`Guard.stats`'s served_by,
    reasons and the rest, healthy calls in) and its histograms once kept. Hashed by identity."""

    __slots__ = ("histograms", "name", "tally")

    def __init__(
        self, name: str, tally: Callable[[], tuple[dict[str, int], dict[str, int], dict[str, int]]]
    ) -> None:
        self.name = name
        self.tally = tally
        self.histograms: Histograms | None = None


class Totals:
    """The counts of the guards of one name, added up: served_by, reasons, the calls nothing
    answered, the records dropped, and the histograms of those that kept them."""

    __slots__ = ("dropped", "histogrammed", "histograms", "reasons", "served", "unanswered")

    def __init__(self) -> None:
        self.served: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.unanswered = 0  # failed or rejected: served by none
        self.dropped = 0
        self.histograms = Histograms()
        self.histogrammed = False  # whether any of the guards kept histograms

    def add(self, remains: Remains) -> None:
        served, reasons, counts = remains.tally()
        self.served.update(served)
        self.reasons.update(reasons)
        self.unanswered += counts["failed"] + counts["rejected"]
        self.dropped += counts["dropped_records"]
        if remains.histograms is not None:
            self.add_histograms(remains.histograms)

    def add_histograms(self, histograms: Histograms) -> None:
        self.histograms.latency.merge(histograms.latency)
        self.histograms.confidence.merge(histograms.confidence)
        self.histogrammed = True

    def copy(self) -> Totals:
        copied = Totals()
        copied.served.update(self.served)
        copied.reasons.update(self.reasons)
        copied.unanswered, copied.dropped = self.unanswered, self.dropped
        if self.histogrammed:
            copied.add_histograms(self.histograms)
        return copied


# Once a router exports every guard (`histograms_everywhere`), every guard's remains, until it
# is gone and they are added up into `_retired`: a total over both is the same before and after
# a guard's death, however a scrape and the GC interleave (the GC clears a batch of weak
# references first, then runs their finalizers one by one). A finalizer may run inside any
# allocation, so it only appends to `_gone`; the lock is re-entrant, as a finalizer (a user's
# `__del__`) may make a guard while this thread adds up.
_remains: set[Remains] = set()
_gone: deque[Remains] = deque()
_retired: dict[str, Totals] = {}
_retired_lock = threading.RLock()


def register(guard: Guard) -> None:
    """Track a new guard and apply any drill already running."""
    with _lock:
        _guards.add(guard)
        guard.forced = _forced_for(guard.name)
    if histograms_everywhere:
        _keep_counts(guard)


def _keep_counts(guard: Guard) -> None:
    """From now on `totals` counts the guard, and keeps its counts once it is gone."""
    with _retired_lock:
        if guard.remains in _remains:
            return
        _remains.add(guard.remains)
        if len(_gone) >= 64:  # guards made and dropped in a loop, and no scrape adding them up
            _add_up_gone()
    weakref.finalize(guard, _gone.append, guard.remains).atexit = False


def _add_up_gone() -> None:
    while _gone:
        remains = _gone.popleft()
        _retired.setdefault(remains.name, Totals()).add(remains)
        _remains.discard(remains)


def totals() -> dict[str, Totals]:
    """The counts of every guard since a router started exporting every guard, by name, those
    gone since included: a guard's death changes none of them."""
    with _retired_lock:
        _add_up_gone()
        out = {name: gone.copy() for name, gone in list(_retired.items())}
        for remains in list(_remains):
            out.setdefault(remains.name, Totals()).add(remains)
    return out


def collect_histograms_everywhere() -> None:
    """Every guard, now and to come, keeps its histograms (`Guard.collect_histograms`)."""
    global histograms_everywhere
    histograms_everywhere = True
    for guard in live_guards():
        guard.collect_histograms()
        _keep_counts(guard)


def live_guards() -> list[Guard]:
    """Every guard still referenced somewhere."""
    with _lock:
        return list(_guards)


def _forced_for(name: str) -> str | None:
    for reason, policy in reversed(_drills):
        if policy is None or policy == name:
            return reason
    return None


def _apply_drills() -> None:
    for g in list(_guards):
        g.forced = _forced_for(g.name)


@contextmanager
def force_degradation(reason: str = "timeout", policy: str | None = None) -> Iterator[None]:
    """Make guards (all, or those of one policy) take their degradation path without calling
    the model: outage drills and tests. Nested drills stack; the innermost wins."""
    entry = (reason, policy)
    with _lock:
        _drills.append(entry)
        _apply_drills()
    try:
        yield
    finally:
        with _lock:
            _drills.remove(entry)
            _apply_drills()


def flush_guards() -> None:
    """Let each guard write what it holds back (profiles, aggregated records)."""
    for g in live_guards():
        g.flush()


class testing:
    """Testing mode for users' suites: no backoff sleeps, synchronous log writes, breakers reset.

    Use `with ss.testing():` or the `safeserve_testing` pytest fixture.
    """

    def __init__(self, reset_breakers: bool = True) -> None:
        self._reset = reset_breakers
        self._was = False

    def __enter__(self) -> testing:
        from safeserve.logwriter import set_synchronous

        global testing_mode
        self._was = testing_mode
        testing_mode = True
        set_synchronous(True)
        if self._reset:
            for g in live_guards():
                g.breaker.reset()
        return self

    def __exit__(self, *exc: object) -> None:
        from safeserve.logwriter import set_synchronous

        global testing_mode
        testing_mode = self._was
        set_synchronous(self._was)


class _OutcomeRecord:
    __slots__ = ("decision_id", "outcome", "policy")

    def __init__(self, decision_id: str, outcome: Any, policy: str) -> None:
        self.decision_id = decision_id
        self.outcome = outcome
        self.policy = policy

    def to_record(self) -> dict[str, Any]:
        from safeserve.decisions import SCHEMA_VERSION, json_safe, new_id, now_utc

        return {
            "kind": "outcome",
            "schema_version": SCHEMA_VERSION,
            "id": new_id(),
            "ts": now_utc().isoformat(),
            "policy": self.policy,
            "decision_id": self.decision_id,
            "outcome": json_safe(self.outcome),
        }


def record_outcome(decision_id: str, outcome: Any, *, policy: str | None = None) -> None:
    """Record a label that arrived later (a `kind: "outcome"` record joined to its decision by
    id), so the skew report can show quality by `served_by` and by reason.

    Written to the decision log of the guard(s) of `policy`; without `policy`, to the one
    decision log in use. Raises `SafeServeError` when that is ambiguous or there is no log.
    """
    from safeserve.errors import SafeServeError

    guards = [g for g in live_guards() if policy is None or g.name == policy]
    writers = {id(w): (w, g.name) for g in guards if (w := g.policy_writer()) is not None}
    if not writers:
        raise SafeServeError(
            f"no decision log to record the outcome in (policy={policy!r}): "
            "configure DecisionLogConfig(sink=...)"
        )
    if len(writers) > 1:
        names = sorted({name for _, name in writers.values()})
        raise SafeServeError(f"several decision logs ({', '.join(names)}): pass policy=...")
    writer, name = next(iter(writers.values()))
    writer.submit(_OutcomeRecord(decision_id, outcome, name))
