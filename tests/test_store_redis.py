"""Breaker state shared through Redis (SPEC 6, issue 3), against a real `redis-server`.

Every test gets its own server (`redis_server` fixture from `tests/redis_server.py`), and
unique policy names. Nothing is faked: the server is killed, restarted, hung with SIGSTOP and
flushed for real, and the two-replica test runs a second Python process.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis_server import RedisServer, free_port, redis_server_fixture  # noqa: F401 (fixture)

import safeserve as ss

SYNC_S = 0.02  # store_sync_s in these tests: replicas learn a change within 2 x SYNC_S
PROPAGATION_S = 3.0  # how long a test waits for another replica to see a change (generous:
# the documented staleness is 2 x SYNC_S, but CI machines are shared and loaded)
INPUT = {"amount": 12.0}
ANSWER = {"label": "approve"}
STATIC = {"label": "review"}
TRIP = {"window_size": 10, "min_calls": 5, "failure_rate_threshold": 0.5, "open_s": 60.0}


class Primary:
    """A controllable model: counts calls (thread-safe), fails while `failing` is set."""

    def __init__(self, failing: bool = False, hold: threading.Event | None = None) -> None:
        self.calls = 0
        self.failing = failing
        self.hold = hold
        self._lock = threading.Lock()

    def function(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def predict(x: dict[str, Any]) -> dict[str, Any]:
            with self._lock:
                self.calls += 1
            if self.hold is not None:
                self.hold.wait(10.0)
            if self.failing:
                raise ConnectionError("model down")
            return dict(ANSWER)

        return predict


def unique(stem: str = "fraud") -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def shared_guard(
    url: str, name: str, primary: Primary, prefix: str | None = None, **breaker: Any
) -> Any:
    """A guard whose breaker lives in the store at `url`, with a static fallback."""
    fields: dict[str, Any] = {**TRIP, **breaker}
    if prefix is not None:
        fields["store_prefix"] = prefix
    config = ss.BreakerConfig(store=url, store_sync_s=SYNC_S, **fields)
    return ss.guard(
        name=name, breaker=config, fallbacks=[ss.Fallback.static("static", dict(STATIC))]
    )(primary.function())


def eventually(predicate: Callable[[], bool], timeout_s: float = PROPAGATION_S) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def codes(decision: Any) -> list[str]:
    return [r.code for r in decision.reasons]


def trip_by_failures(guard: Any, primary: Primary, timeout_s: float = 2.0) -> None:
    """Fail calls through `guard` until its breaker reports open."""
    primary.failing = True
    deadline = time.monotonic() + timeout_s
    while guard.breaker.state != "open":
        assert time.monotonic() < deadline, f"breaker never opened: {guard.breaker.figures()}"
        assert guard(INPUT) == STATIC
        time.sleep(0.002)


def wait_connected(*guards: Any, timeout_s: float = 10.0) -> None:
    for guard in guards:
        assert eventually(lambda g=guard: g.stats()["store"]["connected"] is True, timeout_s), (
            f"never (re)connected to the store: {guard.stats().get('store')}"
        )


def serve_for(guard: Any, seconds: float, min_calls: int = 50) -> tuple[int, float]:
    """Call `guard` for `seconds` (and at least `min_calls` times); return (calls, slowest)."""
    slowest, n = 0.0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or n < min_calls:
        t0 = time.perf_counter()
        value = guard(INPUT)
        slowest = max(slowest, time.perf_counter() - t0)
        assert value == ANSWER, f"call {n} served {value!r}"
        n += 1
        time.sleep(0.002)
    return n, slowest


class TestFixture:
    """The redis-server helper itself."""

    def test_server_answers_and_survives_kill_restart_and_pause(
        self, redis_server: RedisServer
    ) -> None:
        """PING works; after kill it is gone; restart reuses the port; SIGSTOP hangs it."""
        client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5)
        assert client.ping()
        client.set("k", "v")
        port = redis_server.port
        redis_server.kill()
        assert not redis_server.ping()
        redis_server.start()
        assert redis_server.port == port
        assert redis_server.ping()
        assert client.get("k") is None  # persistence is off: a restart starts empty
        redis_server.pause()
        assert not redis_server.ping(timeout_s=0.2)
        redis_server.resume()
        assert redis_server.ping()
        client.close()


class TestSharing:
    """Replicas with the same policy name and store see one breaker."""

    def test_two_guards_in_one_process_share_an_open_breaker(
        self, redis_server: RedisServer
    ) -> None:
        """Failures through one guard open the other; the other stops calling its primary."""
        name = unique()
        failing, healthy = Primary(), Primary()
        a = shared_guard(redis_server.url, name, failing)
        b = shared_guard(redis_server.url, name, healthy)
        assert b(INPUT) == ANSWER
        trip_by_failures(a, failing)
        assert eventually(lambda: b.breaker.state == "open"), b.breaker.figures()
        before = healthy.calls
        for _ in range(20):
            assert b(INPUT) == STATIC
        assert healthy.calls == before

    def test_failures_in_another_process_stop_this_one(self, redis_server: RedisServer) -> None:
        """Two real processes: A's failures open the breaker, B stops calling its primary."""
        name = unique()
        healthy = Primary()
        b = shared_guard(redis_server.url, name, healthy)
        assert b(INPUT) == ANSWER
        child = subprocess.run(
            [sys.executable, "-c", TRIPPER, redis_server.url, name, str(SYNC_S)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 0, child.stderr[-2000:]
        assert child.stdout.split()[-1] == "open", child.stdout + child.stderr[-2000:]
        assert eventually(lambda: b.breaker.state == "open"), b.breaker.figures()
        before = healthy.calls
        for _ in range(20):
            assert b(INPUT) == STATIC
        assert healthy.calls == before

    def test_a_new_guard_never_resets_shared_state(self, redis_server: RedisServer) -> None:
        """A replica started while the breaker is open joins it open, and reopens nothing."""
        name = unique()
        first = shared_guard(redis_server.url, name, Primary())
        first.open()
        primary = Primary()
        late = shared_guard(redis_server.url, name, primary)
        assert eventually(lambda: late.breaker.state == "open"), late.breaker.figures()
        time.sleep(10 * SYNC_S)
        assert first.breaker.state == "open"
        assert late(INPUT) == STATIC
        assert primary.calls == 0
        again = shared_guard(redis_server.url, name, Primary())
        assert eventually(lambda: again.breaker.state == "open")
        time.sleep(10 * SYNC_S)
        assert first.breaker.state == "open"
        assert late.breaker.state == "open"

    def test_windows_of_replicas_add_up_and_survive_a_new_guard(
        self, redis_server: RedisServer
    ) -> None:
        """3 failures in A, a new replica joins, 2 in B: min_calls=5 is reached across them."""
        name = unique()
        fail_a, fail_b = Primary(failing=True), Primary(failing=True)
        a = shared_guard(redis_server.url, name, fail_a)
        b = shared_guard(redis_server.url, name, fail_b)
        wait_connected(a, b)
        for _ in range(3):
            assert a(INPUT) == STATIC
        time.sleep(5 * SYNC_S)
        late = shared_guard(redis_server.url, name, Primary())
        wait_connected(late)
        time.sleep(5 * SYNC_S)
        assert late.breaker.state == "closed"  # 3 calls: below min_calls everywhere
        for _ in range(2):
            assert b(INPUT) == STATIC
        assert eventually(lambda: late.breaker.state == "open"), late.breaker.figures()
        assert eventually(lambda: a.breaker.state == "open"), a.breaker.figures()

    def test_different_policy_names_never_collide(self, redis_server: RedisServer) -> None:
        """Opening one policy's breaker leaves another policy on the same store closed."""
        fraud, churn = unique("fraud"), unique("churn")
        a = shared_guard(redis_server.url, fraud, Primary())
        primary = Primary()
        b = shared_guard(redis_server.url, churn, primary)
        a.open()
        assert eventually(lambda: a.breaker.state == "open")
        time.sleep(10 * SYNC_S)
        assert b.breaker.state == "closed"
        assert b(INPUT) == ANSWER
        assert primary.calls == 1

    def test_different_store_prefixes_never_collide(self, redis_server: RedisServer) -> None:
        """Same policy name, another `store_prefix`: separate breakers, separate keys."""
        name = unique()
        a = shared_guard(redis_server.url, name, Primary(), prefix="team-a")
        primary = Primary()
        b = shared_guard(redis_server.url, name, primary, prefix="team-b")
        a.open()
        assert eventually(lambda: a.breaker.state == "open")
        time.sleep(10 * SYNC_S)
        assert b.breaker.state == "closed"
        assert b(INPUT) == ANSWER
        assert primary.calls == 1
        client = redis.Redis.from_url(redis_server.url, socket_timeout=1.0)
        try:
            assert client.exists(f"team-a:{name}:state") == 1
            assert not client.keys(f"safeserve:{name}:*")
        finally:
            client.close()

    def test_manual_control_acts_on_every_replica(self, redis_server: RedisServer) -> None:
        """open(), close() and reset() on one guard reach the other through the store."""
        name = unique()
        primary = Primary()
        a = shared_guard(redis_server.url, name, Primary())
        b = shared_guard(redis_server.url, name, primary)

        a.open()
        assert eventually(lambda: b.breaker.state == "open"), b.breaker.figures()
        assert b(INPUT) == STATIC
        assert primary.calls == 0

        a.close()
        assert eventually(lambda: b.breaker.state == "closed"), b.breaker.figures()
        assert b(INPUT) == ANSWER

        b.open()
        assert eventually(lambda: a.breaker.state == "open"), a.breaker.figures()

        a.reset()
        assert eventually(lambda: b.breaker.state == "closed"), b.breaker.figures()
        assert b(INPUT) == ANSWER
        assert primary.calls == 2

    def test_a_lost_key_means_closed_and_is_recreated(self, redis_server: RedisServer) -> None:
        """FLUSHALL while open: every replica closes and the state key comes back."""
        name = unique()
        primary = Primary()
        a = shared_guard(redis_server.url, name, Primary())
        b = shared_guard(redis_server.url, name, primary)
        a.open()
        assert eventually(lambda: b.breaker.state == "open")
        redis_server.command("FLUSHALL")
        assert eventually(lambda: a.breaker.state == "closed" and b.breaker.state == "closed"), (
            a.breaker.figures(),
            b.breaker.figures(),
        )
        assert b(INPUT) == ANSWER
        assert primary.calls == 1
        client = redis.Redis.from_url(redis_server.url, socket_timeout=1.0)
        try:
            assert eventually(lambda: client.exists(f"safeserve:{name}:state") == 1, 1.0)
        finally:
            client.close()
        # and sharing works on the recreated key
        b.open()
        assert eventually(lambda: a.breaker.state == "open")

    def test_exactly_half_open_calls_probes_across_replicas(
        self, redis_server: RedisServer
    ) -> None:
        """20 concurrent callers on two replicas after open_s: exactly half_open_calls probes."""
        name = unique()
        release = threading.Event()
        primary = Primary(hold=release)
        settings = {"open_s": 0.3, "half_open_calls": 2}
        a = shared_guard(redis_server.url, name, primary, **settings)
        b = shared_guard(redis_server.url, name, primary, **settings)
        a.open()
        assert eventually(lambda: b.breaker.state == "open")
        time.sleep(0.3 + 0.15)

        callers = 20
        barrier = threading.Barrier(callers)
        served: list[str | None] = []
        lock = threading.Lock()

        def call(guard: Any) -> None:
            barrier.wait()
            decision = guard.call(INPUT).decision
            with lock:
                served.append(decision.served_by)

        threads = [
            threading.Thread(target=call, args=(a if i % 2 else b,), daemon=True)
            for i in range(callers)
        ]
        try:
            for thread in threads:
                thread.start()
            assert eventually(lambda: len(served) >= callers - 2, 5.0), served
            time.sleep(0.1)  # a late extra probe would show up now
            assert primary.calls == 2, f"{primary.calls} calls reached the half-open primary"
        finally:
            release.set()
            for thread in threads:
                thread.join(10.0)
        assert served.count("primary") == 2
        assert served.count("static") == callers - 2
        assert eventually(lambda: a.breaker.state == b.breaker.state == "closed", 1.0), (
            a.breaker.figures(),
            b.breaker.figures(),
        )


class TestOutage:
    """Redis down, hung or missing: serve on local state, record the outage once."""

    def test_redis_killed_mid_run_keeps_serving_then_reconnects(
        self, redis_server: RedisServer
    ) -> None:
        """Calls never fail or stall; store_unavailable once per outage; sharing resumes."""
        name = unique()
        primary = Primary()
        a = shared_guard(redis_server.url, name, primary)
        b = shared_guard(redis_server.url, name, Primary())
        serve_for(a, 0.1, min_calls=10)
        wait_connected(a, b)

        redis_server.kill()
        calls, slowest = serve_for(a, 1.0, min_calls=200)
        assert slowest < 1.0, f"a call took {slowest:.3f} s while Redis was down"
        stats = a.stats()
        assert stats["store"]["connected"] is False
        assert stats["store"]["outages"] == 1
        assert stats["reasons"].get("store_unavailable") == 1, stats["reasons"]
        marked = [d for d in a.decisions() if "store_unavailable" in codes(d)]
        assert len(marked) == 1
        assert marked[0].served_by == "primary"
        assert marked[0].flagged is True  # otherwise healthy: flagged, not degraded
        assert [r.stage for r in marked[0].reasons if r.code == "store_unavailable"] == ["store"]
        assert primary.calls >= calls

        redis_server.start()
        wait_connected(a, b)
        b.open()
        assert eventually(lambda: a.breaker.state == "open"), a.breaker.figures()
        assert a(INPUT) == STATIC
        b.close()
        assert eventually(lambda: a.breaker.state == "closed"), a.breaker.figures()
        assert a.stats()["reasons"].get("store_unavailable") == 1

        redis_server.kill()  # a second outage is recorded once more
        serve_for(a, 0.5, min_calls=100)
        stats = a.stats()
        assert stats["reasons"].get("store_unavailable") == 2, stats["reasons"]
        assert stats["store"]["outages"] == 2

    def test_local_breaker_still_trips_while_redis_is_down(self, redis_server: RedisServer) -> None:
        """Failures during an outage open the local breaker (pybreaker's storage never trips)."""
        primary = Primary()
        guard = shared_guard(redis_server.url, unique(), primary)
        wait_connected(guard)
        redis_server.kill()
        assert eventually(lambda: (guard(INPUT), guard.stats()["store"]["connected"])[1] is False)
        trip_by_failures(guard, primary)
        before = primary.calls
        for _ in range(20):
            assert guard(INPUT) == STATIC
        assert primary.calls == before

    def test_hung_redis_never_blocks_calls(self, redis_server: RedisServer) -> None:
        """SIGSTOPped server: calls stay fast, a new guard starts, the outage is recorded."""
        name = unique()
        guard = shared_guard(redis_server.url, name, Primary())
        serve_for(guard, 0.1, min_calls=10)
        wait_connected(guard)
        redis_server.pause()
        try:
            _, slowest = serve_for(guard, 1.5, min_calls=200)
            assert slowest < 0.5, f"a call took {slowest:.3f} s while Redis hung"
            stats = guard.stats()
            assert stats["store"] == {"connected": False, "outages": 1}
            assert stats["reasons"].get("store_unavailable") == 1

            t0 = time.perf_counter()
            late = shared_guard(redis_server.url, name, Primary())
            assert late(INPUT) == ANSWER
            assert time.perf_counter() - t0 < 1.0, "creating a guard waited on a hung Redis"
            _, slowest = serve_for(late, 0.5, min_calls=50)
            assert slowest < 0.5
        finally:
            redis_server.resume()
        wait_connected(guard, late)
        assert guard.stats()["reasons"].get("store_unavailable") == 1

    def test_guard_created_with_redis_unreachable_serves_locally(self) -> None:
        """Nothing listens on the store's port: the guard serves and records one outage."""
        url = f"redis://127.0.0.1:{free_port()}/0"
        guard = shared_guard(url, unique(), Primary())
        _, slowest = serve_for(guard, 0.5, min_calls=100)
        assert slowest < 1.0
        stats = guard.stats()
        assert stats["store"]["connected"] is False
        assert stats["reasons"].get("store_unavailable") == 1

    def test_the_store_password_never_reaches_the_log_or_a_repr(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A store URL with a password (from `${REDIS_PASSWORD}` in a policies file, say): the
        outage warning and the policy's repr show `***` in its place."""
        port = free_port()
        url = f"redis://app:hunter2@pass@127.0.0.1:{port}/0?password=hunter2pass"  # an @ in it
        with caplog.at_level(logging.WARNING, logger="safeserve.store"):
            guard = shared_guard(url, unique(), Primary())
            assert guard(INPUT) == ANSWER
            assert eventually(lambda: "unreachable" in caplog.text)
        shown = f"redis://app:***@127.0.0.1:{port}/0?password=***"
        assert shown in caplog.text
        assert shown in repr(guard.policy)
        for text in (caplog.text, repr(guard.policy), str(guard.policy)):
            assert "hunter2" not in text
        salted = ss.DecisionLogConfig(hash_salt="pepper-hunter2pass")
        assert "hunter2pass" not in repr(ss.Policy(name="salted", log=salted))


def test_redis_server_is_installed() -> None:
    """The store tests need the real server: its absence fails the suite instead of skipping."""
    try:
        RedisServer().close()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


# The replica "A" of the two-process test: trips the shared breaker by failures, prints its
# state, and stays alive a little so its last window flush reaches Redis.
TRIPPER = textwrap.dedent(
    """
    import sys, time
    import safeserve as ss

    url, name, sync_s = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def predict(x):
        raise ConnectionError("model down")

    guard = ss.guard(
        name=name,
        breaker=ss.BreakerConfig(
            store=url, store_sync_s=sync_s, window_size=10, min_calls=5,
            failure_rate_threshold=0.5, open_s=60.0,
        ),
        fallbacks=[ss.Fallback.static("static", {"label": "review"})],
    )(predict)
    deadline = time.monotonic() + 10
    while guard.breaker.state != "open" and time.monotonic() < deadline:
        guard({"amount": 12.0})
        time.sleep(0.002)
    print(guard.breaker.state, flush=True)
    time.sleep(0.5)
    """
)
