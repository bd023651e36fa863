"""The circuit breaker: resilience4j's state machine over a sliding window.

`admit()` hands out a permit (an int: 0 means rejected); the guard returns it with the call's
one outcome, after retries. A permit is the breaker's epoch, so an outcome that arrives after a
state change is ignored instead of counted against the new state. The lock is held only for a
few counter updates, never across a model call; listeners run after it is released.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safeserve.decisions import RawReason, new_id, now_utc
from safeserve.policy import BreakerConfig

if TYPE_CHECKING:
    from safeserve.store import RedisStore
from safeserve.window import FAILURE, SLOW, TIMEOUT, CountWindow, TimeWindow

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
FORCED_OPEN = "forced_open"
DISABLED = "disabled"
METRICS_ONLY = "metrics_only"

REJECTED = 0
UNCOUNTED = -1  # admitted, but the outcome is not recorded (disabled, shadow overflow)

_STATES = {s: s for s in (CLOSED, OPEN, HALF_OPEN, FORCED_OPEN, DISABLED)}
_LEGAL = {
    (CLOSED, OPEN),
    (OPEN, HALF_OPEN),
    (HALF_OPEN, CLOSED),
    (HALF_OPEN, OPEN),
}
_log = logging.getLogger("safeserve.breaker")


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """One state change, as logged (`kind: "breaker"`) and as passed to `on_state_change`."""

    policy: str
    owner: str | None
    from_state: str
    to_state: str
    shadow: bool
    figures: dict[str, Any]
    reason: str = "threshold"
    id: str = field(default_factory=new_id)
    ts: str = field(default_factory=lambda: now_utc().isoformat())

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "breaker",
            "schema_version": 1,
            "id": self.id,
            "ts": self.ts,
            "policy": self.policy,
            "owner": self.owner,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "shadow": self.shadow,
            "reason": self.reason,
            "figures": self.figures,
        }


Listener = Callable[[BreakerEvent], Any]


class Breaker:
    """An in-process circuit breaker for one guard."""

    def __init__(
        self,
        config: BreakerConfig,
        policy: str = "",
        owner: str | None = None,
        listeners: list[Listener] | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.owner = owner
        self.clock = config.clock
        self.listeners: list[Listener] = [*(listeners or []), *config.on_state_change]
        self._lock = threading.Lock()
        self._shadow = config.mode == "metrics_only"
        self._window: CountWindow | TimeWindow = (
            CountWindow(config.window_size)
            if config.window == "count"
            else TimeWindow(config.window_size)
        )
        self._slow_s = config.slow_call_s if config.slow_call_s is not None else float("inf")
        self._ignore = tuple(config.ignore_on)
        self._record_on = tuple(config.record_on)
        self._epoch = 1
        self._epoch_states: deque[tuple[int, str]] = deque(maxlen=16)
        self._notice: RawReason | None = None
        self._probe_gen = 0
        self._reset_state()
        self._store: RedisStore | None = None
        if config.store:
            from safeserve.store import open_store

            self._store = open_store(
                config.store, config.store_prefix, policy, self, config.store_sync_s
            )

    def _reset_state(self) -> None:
        # Hot-path hints, read without the lock by the guard:
        # `fast_permit` is the permit while closed (0 otherwise); a success faster than
        # `quiet_below` changes nothing (closed, window full of successes) and is not recorded.
        self.fast_permit = self._epoch if self._notice is None else 0
        self.quiet_below = -1.0
        self._state = CLOSED
        self._open_until = 0.0
        self._reopens = 0
        self._consecutive = 0
        self._probes_started = 0
        self._probe_ok = 0
        self._probe_starts: deque[float] = deque()
        self._window.clear()

    # -- the call path -----------------------------------------------------------------------
    @property
    def state(self) -> str:
        """closed | open | half_open | forced_open | disabled | metrics_only."""
        if self._shadow and self._state not in (FORCED_OPEN, DISABLED):
            return METRICS_ONLY
        if self._state is OPEN and self.clock() >= self._open_until:
            return HALF_OPEN
        return self._state

    def state_of(self, permit: int) -> str:
        """The state in which the call holding `permit` was admitted."""
        if self._shadow:
            return METRICS_ONLY
        if permit == self._epoch:
            return self._state
        if permit == UNCOUNTED:
            return DISABLED
        for epoch, state in reversed(self._epoch_states):
            if epoch == permit:
                return state
        return self.state

    def admit(self) -> int:
        """A permit for one call, or `REJECTED` (0)."""
        state = self._state
        if state is DISABLED:
            return UNCOUNTED
        if state is FORCED_OPEN:
            return REJECTED
        store = self._store
        if (
            store is not None
            and store.connected
            and (state is HALF_OPEN or (state is OPEN and self.clock() >= self._open_until))
        ):
            permit = self._admit_shared_probe(store)
            if permit is not None:
                return UNCOUNTED if permit == REJECTED and self._shadow else permit
        events: list[BreakerEvent] = []
        with self._lock:
            now = self.clock()
            if self._state is OPEN and now >= self._open_until:
                events.append(self._transition(HALF_OPEN, "open_s elapsed"))
            if self._state is HALF_OPEN:
                permit = self._admit_probe(now, events)
            elif self._state is CLOSED:
                permit = self._epoch
            else:
                permit = REJECTED
        self._fire(events)
        if permit == REJECTED and self._shadow:
            return UNCOUNTED
        return permit

    def _admit_probe(self, now: float, events: list[BreakerEvent]) -> int:
        limit = self.config.half_open_calls
        if self._probes_started >= limit:
            pt = self.config.probe_timeout_s
            if pt is not None and self._probe_starts and self._probe_starts[0] + pt <= now:
                # A probe hung past probe_timeout_s: it counts as a failure and frees its permit.
                events.append(self._open("probe timed out"))
            return REJECTED
        self._probes_started += 1
        self._probe_starts.append(now)
        return self._epoch

    def _admit_shared_probe(self, store: RedisStore) -> int | None:
        """Half-open admission across replicas (one Redis round trip, outside the lock)."""
        res = store.admit_probe(self.config.half_open_calls)
        if res is None:
            return None  # Redis unreachable: local probes
        admitted, state, gen, remaining = res
        self.adopt_shared(state, remaining, "probe admission")
        with self._lock:
            if not admitted or self._state is not HALF_OPEN:
                return REJECTED
            self._probe_gen = gen
            self._probes_started += 1
            self._probe_starts.append(self.clock())
            return self._epoch

    def on_success(self, permit: int, latency_s: float) -> None:
        """Record a successful call (slow if it took `slow_call_s` or longer)."""
        if permit != self._epoch:
            return
        if latency_s < self.quiet_below:
            return  # the window is full of successes already: nothing to change
        self._record(permit, SLOW if latency_s >= self._slow_s else 0)

    def on_failure(
        self, permit: int, latency_s: float, exc: BaseException | None = None, timeout: bool = False
    ) -> None:
        """Record a failed call; exceptions in `ignore_on` (or outside `record_on`) don't count."""
        if permit != self._epoch:
            return
        if exc is not None and not self.counts_as_failure(exc):
            self.release(permit)
            return
        outcome = FAILURE | (TIMEOUT if timeout else 0)
        if latency_s >= self._slow_s:
            outcome |= SLOW
        self._record(permit, outcome)

    def counts_as_failure(self, exc: BaseException) -> bool:
        """Whether an exception counts against the breaker (`ignore_on`, `record_on`)."""
        if self._ignore and isinstance(exc, self._ignore):
            return False
        return not (self._record_on and not isinstance(exc, self._record_on))

    def release(self, permit: int) -> None:
        """Give back a permit without an outcome (invalid input, ignored errors)."""
        if permit != self._epoch or self._state is not HALF_OPEN:
            return
        with self._lock:
            if permit == self._epoch and self._probes_started > 0:
                self._probes_started -= 1
                if self._probe_starts:
                    self._probe_starts.popleft()

    def _record(self, permit: int, outcome: int) -> None:
        store = self._store
        if store is not None and self._state is HALF_OPEN and store.connected:
            res = store.probe_result(self._probe_gen, not outcome & (FAILURE | SLOW))
            if res is not None:
                self.adopt_shared(res[0], res[2], "probe result")
                return
        events: list[BreakerEvent] = []
        with self._lock:
            if permit != self._epoch:
                return
            if self._state is CLOSED:
                self._record_closed(outcome, events)
            elif self._state is HALF_OPEN:
                if self._probe_starts:
                    self._probe_starts.popleft()
                if outcome & (FAILURE | SLOW):
                    events.append(self._open("probe failed"))
                else:
                    self._probe_ok += 1
                    if self._probe_ok >= self.config.probes_to_close:
                        events.append(self._transition(CLOSED, "probes succeeded"))
        self._fire(events)
        if store is not None and events and events[-1].to_state is OPEN:
            store.request(store.gen, OPEN, events[-1].reason)  # a local trip: share it

    def _record_closed(self, outcome: int, events: list[BreakerEvent]) -> None:
        cfg = self.config
        now = self.clock()
        w = self._window
        w.add(outcome, now)
        self.quiet_below = self._slow_s if w.all_good else -1.0
        if outcome & FAILURE:
            self._consecutive += 1
            if cfg.consecutive_failures and self._consecutive >= cfg.consecutive_failures:
                events.append(self._open(f"{self._consecutive} consecutive failures"))
                return
        else:
            self._consecutive = 0
        if w.calls < cfg.min_calls or not (w.failures or w.slow):
            return  # judged on every call from min_calls on, a success included
        snap = w.snapshot(now)
        if snap.failure_rate >= cfg.failure_rate_threshold:
            events.append(self._open("failure rate"))
        elif snap.slow_rate >= cfg.slow_call_rate_threshold:
            events.append(self._open("slow call rate"))

    # -- transitions (called with the lock held) ---------------------------------------------
    def _open(self, reason: str) -> BreakerEvent:
        cfg = self.config
        if self._state is HALF_OPEN:  # a re-open waits longer each time (open_backoff)
            self._reopens += 1
        duration = cfg.open_s * cfg.open_backoff**self._reopens
        if cfg.max_open_s is not None:
            duration = min(duration, cfg.max_open_s)
        self._open_until = self.clock() + duration
        return self._transition(OPEN, reason)

    def _transition(self, to: str, reason: str, manual: bool = False) -> BreakerEvent:
        frm = self._state
        if not manual and (frm, to) not in _LEGAL:
            raise AssertionError(f"illegal breaker transition {frm} -> {to}")
        figures = self._window.snapshot(self.clock()).as_dict()
        figures["consecutive_failures"] = self._consecutive
        self._epoch_states.append((self._epoch, frm))
        self._state = to
        self._epoch += 1
        self.fast_permit = self._epoch if to is CLOSED and self._notice is None else 0
        self.quiet_below = -1.0
        self._probes_started = self._probe_ok = 0
        self._probe_starts.clear()
        if to is CLOSED:
            self._window.clear()
            self._consecutive = 0
            if not manual:
                self._reopens = 0
        return BreakerEvent(self.policy, self.owner, frm, to, self._shadow, figures, reason)

    def _fire(self, events: list[BreakerEvent]) -> None:
        for event in events:
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:  # a listener's failure must never reach a call
                    _log.exception("safeserve: breaker listener failed for %s", self.policy)

    # -- manual control ----------------------------------------------------------------------
    def _manual(self, to: str, reason: str) -> None:
        if self._store is not None:
            self._store.transition_now(to, reason)  # every replica; local only if unreachable
        with self._lock:
            if to is OPEN:
                self._open_until = self.clock() + self.config.open_s
            event = self._transition(to, reason, manual=True)
        self._fire([event])

    def adopt_shared(self, state: str, remaining_s: float, why: str) -> None:
        """Follow the shared state another replica (or the store's rules) moved to."""
        to = _STATES.get(state)
        if to is None:
            return
        events: list[BreakerEvent] = []
        with self._lock:
            if to is not self._state:
                events.append(self._transition(to, f"shared: {why}", manual=True))
            if to is OPEN:
                self._open_until = self.clock() + remaining_s
        self._fire(events)

    def window_counts(self) -> tuple[int, int, int]:
        """The local window's calls, failures and slow calls (published to a shared store)."""
        with self._lock:
            snap = self._window.snapshot(self.clock())
        return snap.calls, snap.failures, snap.slow

    def post_notice(self, reason: RawReason) -> None:
        """Attach a reason to the next call's decision (e.g. the store became unreachable)."""
        with self._lock:
            self._notice = reason
            self.fast_permit = 0  # routes the next call through `admit()` and `take_notice()`

    def take_notice(self) -> RawReason | None:
        """The pending notice, once."""
        if self._notice is None:
            return None
        with self._lock:
            notice, self._notice = self._notice, None
            if self._state is CLOSED:
                self.fast_permit = self._epoch
        return notice

    @property
    def store_status(self) -> dict[str, Any] | None:
        """`{"connected", "outages"}` of the shared store, or None without one."""
        if self._store is None:
            return None
        return {"connected": self._store.connected, "outages": self._store.outages}

    def open(self) -> None:
        """Open now, for `open_s`; then half-open as usual."""
        self._manual(OPEN, "manual open")

    def force_open(self) -> None:
        """Open until `close()` or `reset()`."""
        self._manual(FORCED_OPEN, "manual force_open")

    def close(self) -> None:
        """Close and clear the window's counts."""
        self._manual(CLOSED, "manual close")

    def disable(self) -> None:
        """Never block again until `reset()`; outcomes are not recorded."""
        self._manual(DISABLED, "manual disable")

    def reset(self) -> None:
        """Back to closed with fresh metrics (and the configured mode)."""
        if self._store is not None:
            self._store.transition_now("reset", "manual reset")
        with self._lock:
            frm = self._state
            self._epoch += 1
            self._reset_state()
            figures = self._window.snapshot(self.clock()).as_dict()
        self._fire(
            [
                BreakerEvent(
                    self.policy, self.owner, frm, CLOSED, self._shadow, figures, "manual reset"
                )
            ]
        )

    # -- figures -----------------------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        """The window's counts and rates, the state, and the time left open."""
        with self._lock:
            out: dict[str, Any] = self._window.snapshot(self.clock()).as_dict()
            out["consecutive_failures"] = self._consecutive
        out["state"] = self.state
        out["open_remaining_s"] = self.retry_after_s()
        return out

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets probes through (0 when not open)."""
        if self._state is FORCED_OPEN:
            return self.config.open_s
        if self._state is not OPEN:
            return 0.0
        return max(0.0, self._open_until - self.clock())
