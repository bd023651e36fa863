"""Breaker state shared by many replicas through Redis (the `redis` extra, imported lazily).

Calls never wait on Redis. Each replica counts its window locally; a background thread
publishes it every `store_sync_s` and runs one Lua script that, with the server's clock,
sums the live replicas' windows, makes the shared transitions (closed → open, open →
half-open) and returns the shared state, which the replica adopts. So a trip anywhere reaches
every replica within about two sync intervals. Only half-open probes go to Redis in the call
path, because admitting exactly `half_open_calls` probes across replicas needs it; manual
control goes there too. Every transition is a compare-and-set on a generation number, so
replicas never extend or shorten each other's open period, and a lost key reads as closed.

If Redis is unreachable, slow or hung (50 ms socket timeouts, no client retries), the guard
keeps serving on its local breaker, reports `store_unavailable` once per outage, and the
thread reconnects with backoff.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from safeserve.decisions import RawReason, new_id
from safeserve.policy import masked_url

if TYPE_CHECKING:
    from safeserve.breaker import Breaker

_log = logging.getLogger("safeserve.store")
_SOCKET_TIMEOUT_S = 0.05
_MAX_BACKOFF_S = 2.0

# Shared hash fields: state, gen, open_until (server ms), reopens, probes, probe_ok.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'state', 'gen', 'open_until', 'reopens', 'probes',
                     'probe_ok')
local state, gen = s[1], tonumber(s[2])
local open_until, reopens = tonumber(s[3]) or 0, tonumber(s[4]) or 0
local probes, probe_ok = tonumber(s[5]) or 0, tonumber(s[6]) or 0
if not state then
  state, gen = 'closed', 1
  redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'open_until', 0, 'reopens', 0,
             'probes', 0, 'probe_ok', 0)
end
local function go(to, open_ms, why)
  gen = gen + 1
  state = to
  probes, probe_ok = 0, 0
  if to == 'open' then open_until = now + open_ms end
  if to == 'closed' then reopens = 0; redis.call('DEL', KEYS[2]) end
  redis.call('HSET', KEYS[1], 'state', to, 'gen', gen, 'open_until', open_until,
             'reopens', reopens, 'probes', 0, 'probe_ok', 0, 'why', why)
end
local function open_ms_for(base, backoff, max_ms)
  local ms = base * (backoff ^ reopens)
  if max_ms > 0 and ms > max_ms then ms = max_ms end
  return ms
end
local function lazy_half_open()
  if state == 'open' and now >= open_until then go('half_open', 0, 'open_s elapsed') end
end
local function result()
  return {state, gen, open_until - now}
end
"""

# ARGV: replica, known_gen, calls, failures, slow, min_calls, fail_thr, slow_thr, open_ms,
#       backoff, max_open_ms, ttl_ms
_SYNC = (
    _PRELUDE
    + """
local known = tonumber(ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], table.concat({ARGV[2], ARGV[3], ARGV[4], ARGV[5], now}, ','))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[12]) * 4)
if state == 'closed' then
  local calls, fails, slow = 0, 0, 0
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local g, c, f, sl, ts = string.match(all[i + 1], '([^,]+),([^,]+),([^,]+),([^,]+),([^,]+)')
    if tonumber(g) == gen and now - tonumber(ts) <= tonumber(ARGV[12]) then
      calls, fails, slow = calls + tonumber(c), fails + tonumber(f), slow + tonumber(sl)
    end
  end
  if calls >= tonumber(ARGV[6]) and calls > 0 then
    if fails / calls >= tonumber(ARGV[7]) or slow / calls >= tonumber(ARGV[8]) then
      go('open', open_ms_for(tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])),
         'shared failure rate')
    end
  end
else
  lazy_half_open()
end
return result()
"""
)

# ARGV: expected_gen (-1: manual, unconditional), to_state, open_ms, backoff, max_open_ms, why
_TRANSITION = (
    _PRELUDE
    + """
local expected = tonumber(ARGV[1])
-- manual (-1): always; a local trip: only onto a closed breaker it has seen (0: not synced yet)
if expected == -1 or (state == 'closed' and (expected == 0 or expected == gen)) then
  if ARGV[2] == 'reset' then
    go('closed', 0, ARGV[6])
  elseif expected == -1 then
    go(ARGV[2], tonumber(ARGV[3]), ARGV[6])
  else
    go(ARGV[2], open_ms_for(tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])), ARGV[6])
  end
end
return result()
"""
)

# ARGV: limit -> {admitted 0/1, state, gen, remaining_ms}
_PROBE = (
    _PRELUDE
    + """
lazy_half_open()
local admitted = 0
if state == 'half_open' and probes < tonumber(ARGV[1]) then
  probes = redis.call('HINCRBY', KEYS[1], 'probes', 1)
  admitted = 1
end
return {admitted, state, gen, open_until - now}
"""
)

# ARGV: gen, ok (1/0), success_threshold, open_ms, backoff, max_open_ms
_PROBE_RESULT = (
    _PRELUDE
    + """
if state == 'half_open' and tonumber(ARGV[1]) == gen then
  if ARGV[2] == '1' then
    probe_ok = redis.call('HINCRBY', KEYS[1], 'probe_ok', 1)
    if probe_ok >= tonumber(ARGV[3]) then go('closed', 0, 'probes succeeded') end
  else
    reopens = reopens + 1
    go('open', open_ms_for(tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])),
       'probe failed')
  end
end
return result()
"""
)


class RedisStore:
    """One policy's shared breaker state; owned by a `Breaker`."""

    def __init__(self, url: str, prefix: str, policy: str, breaker: Breaker, sync_s: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.shown = masked_url(url)  # for the log: no password
        self.sync_s = sync_s
        self.replica = new_id()
        self.keys = [f"{prefix}:{policy}:state", f"{prefix}:{policy}:replicas"]
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._scripts = {
            name: self.client.register_script(src)
            for name, src in (
                ("sync", _SYNC),
                ("transition", _TRANSITION),
                ("probe", _PROBE),
                ("probe_result", _PROBE_RESULT),
            )
        }
        self.connected = True
        self.outages = 0
        self.gen = 0
        self._retry_s = sync_s
        self._pending: list[tuple[int, str, str]] = []  # (expected_gen, to_state, why)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._breaker_ref = weakref.ref(breaker)
        self._thread = threading.Thread(
            target=self._run, name=f"safeserve-store-{policy}", daemon=True
        )
        self._thread.start()

    # -- called by the breaker ---------------------------------------------------------------
    def request(self, expected_gen: int, to_state: str, why: str) -> None:
        """Ask for a shared transition (a local trip); done by the sync thread, not the call."""
        with self._lock:
            self._pending.append((expected_gen, to_state, why))
        self._wake.set()  # share a trip now, not at the next sync: others learn within one sync

    def transition_now(self, to_state: str, why: str) -> tuple[str, int, float] | None:
        """A manual transition on every replica: synchronous; None when Redis is unreachable."""
        cfg = self._config()
        if cfg is None:
            return None
        open_ms = cfg.open_s * 1000.0
        return self._call(
            "transition",
            [-1, to_state, open_ms, cfg.open_backoff, (cfg.max_open_s or 0) * 1000.0, why],
        )

    def admit_probe(self, limit: int) -> tuple[bool, str, int, float] | None:
        """Whether this replica may send a half-open probe; None when Redis is unreachable."""
        if not self.connected:
            return None
        try:
            admitted, state, gen, remaining = self._scripts["probe"](keys=self.keys, args=[limit])
        except self._errors as exc:
            self._down(exc)
            return None
        return bool(admitted), _text(state), int(gen), max(0.0, int(remaining) / 1000.0)

    def probe_result(self, gen: int, ok: bool) -> tuple[str, int, float] | None:
        """Report a probe's outcome; returns the shared state after it."""
        cfg = self._config()
        if cfg is None or not self.connected:
            return None
        return self._call(
            "probe_result",
            [
                gen,
                1 if ok else 0,
                cfg.probes_to_close,
                cfg.open_s * 1000.0,
                cfg.open_backoff,
                (cfg.max_open_s or 0) * 1000.0,
            ],
        )

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- the sync thread ---------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0  # the first sync runs at once: a new replica learns the shared state
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stop.is_set():
                return
            backoff = self.sync_s
            breaker = self._breaker_ref()
            if breaker is None:
                return
            try:
                self._sync_once(breaker)
            except self._errors as exc:
                self._down(exc)
                self._retry_s = min(_MAX_BACKOFF_S, max(self.sync_s, self._retry_s * 2))
                backoff = self._retry_s
                continue
            except Exception:  # never let the thread die; log and keep syncing
                _log.exception("safeserve: breaker store sync failed")
                continue
            if not self.connected:
                self.connected = True
                _log.warning("safeserve: breaker store %s reachable again", self.shown)
            self._retry_s = self.sync_s
            del breaker

    def _sync_once(self, breaker: Breaker) -> None:
        cfg = breaker.config
        with self._lock:
            pending, self._pending = self._pending, []
        for expected, to_state, why in pending:
            res = self._scripts["transition"](
                keys=self.keys,
                args=[
                    expected,
                    to_state,
                    cfg.open_s * 1000.0,
                    cfg.open_backoff,
                    (cfg.max_open_s or 0) * 1000.0,
                    why,
                ],
            )
            self._adopt(breaker, res, why)
        calls, failures, slow = breaker.window_counts()
        res = self._scripts["sync"](
            keys=self.keys,
            args=[
                self.replica,
                self.gen,
                calls,
                failures,
                slow,
                cfg.min_calls,
                cfg.failure_rate_threshold,
                cfg.slow_call_rate_threshold,
                cfg.open_s * 1000.0,
                cfg.open_backoff,
                (cfg.max_open_s or 0) * 1000.0,
                max(1000.0, self.sync_s * 1000.0 * 10),
            ],
        )
        self._adopt(breaker, res, "shared")

    def _adopt(self, breaker: Breaker, res: Any, why: str) -> None:
        state, gen, remaining_ms = _text(res[0]), int(res[1]), int(res[2])
        if gen != self.gen:
            self.gen = gen
            breaker.adopt_shared(state, max(0.0, remaining_ms / 1000.0), why)

    def _call(self, name: str, args: list[Any]) -> tuple[str, int, float] | None:
        try:
            res = self._scripts[name](keys=self.keys, args=args)
        except self._errors as exc:
            self._down(exc)
            return None
        state, gen, remaining = _text(res[0]), int(res[1]), int(res[2])
        self.gen = gen
        return state, gen, max(0.0, remaining / 1000.0)

    def _down(self, exc: BaseException) -> None:
        if not self.connected:
            return
        self.connected = False
        self.outages += 1
        _log.warning(
            "safeserve: breaker store %s unreachable (%s); using local state",
            self.shown,
            type(exc).__name__,
        )
        breaker = self._breaker_ref()
        if breaker is not None:
            breaker.post_notice(
                RawReason(
                    "store_unavailable",
                    "store",
                    f"{type(exc).__name__} talking to the breaker store",
                )
            )

    def _config(self) -> Any:
        breaker = self._breaker_ref()
        return None if breaker is None else breaker.config


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_store(url: str, prefix: str, policy: str, breaker: Breaker, sync_s: float) -> RedisStore:
    """The store a `BreakerConfig.store` URL names (only redis:// and rediss:// for now)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"unsupported breaker store {masked_url(url)!r}: use redis://host:port/db")
    return RedisStore(url, prefix, policy, breaker, sync_s)
