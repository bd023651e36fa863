"""Config files: `load_policies` reads a YAML or TOML file of policies, checks all of it at once,
and `watch_policies` reloads live guards when the file changes.

A bad file raises one `PolicyError` whose `problems` are `path: message` lines, with the line
number where the YAML parser gives one. Callables are import paths resolved with importlib
(optionally restricted to `allowed_modules` prefixes); nothing in a file is evaluated as code.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from safeserve.configfile import ROOT, SUFFIXES, Parsed, Path_, parse
from safeserve.configschema import FilePolicy, PolicyFile, resolve, to_policy
from safeserve.errors import PolicyError, friendly_message
from safeserve.policy import Policy, schema_field_names

logger = logging.getLogger("safeserve.config")


def load_policies(
    path: str | os.PathLike[str], *, allowed_modules: Sequence[str] | None = None
) -> dict[str, Policy]:
    """The policies a `.yaml`/`.yml`/`.toml` file declares, by name.

    Raises `PolicyError` listing every problem in the file, and `OSError` when it cannot be read.
    `allowed_modules` (e.g. `["myapp."]`) restricts the modules import paths may name.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PolicyError([f"{ROOT}: {path.name} is not a policy file (.yaml, .yml or .toml)"])
    return policies_from_bytes(path.read_bytes(), suffix, allowed_modules=allowed_modules)


def policies_from_bytes(
    content: bytes,
    suffix: str,
    *,
    allowed_modules: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Policy]:
    """`load_policies` on a file's content (`suffix` says its format)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{ROOT}: not UTF-8 text (byte {exc.start})"]) from None
    if isinstance(allowed_modules, str):  # one prefix, not a sequence of one-letter prefixes
        allowed_modules = [allowed_modules]
    parsed = parse(text, suffix, os.environ if env is None else env)
    problems = list(parsed.problems)
    policies: dict[str, Policy] = {}
    for name, body in _policy_bodies(parsed, problems):
        policy = _load_one(name, body, allowed_modules, problems)
        if policy is not None:
            policies[name] = policy
    if problems:
        # a value the parser or interpolation already faulted is not faulted twice
        faulted = {path for path, _ in parsed.problems}
        problems = problems[: len(parsed.problems)] + [
            p for p in problems[len(parsed.problems) :] if p[0] not in faulted
        ]
        # in file order where the parser gave lines (a stable sort keeps the rest as found)
        problems.sort(key=lambda p: parsed.line_of(p[0]) or 0)
        raise PolicyError([parsed.format(path, message) for path, message in problems])
    return policies


Problems = list[tuple[Path_, str]]


def _policy_bodies(parsed: Parsed, problems: Problems) -> list[tuple[str, Any]]:
    data = parsed.data
    if parsed.problems and data is None:
        return []  # the parser already said why
    if data is None:
        problems.append((("policies",), "is required (the file is empty)"))
        return []
    if not isinstance(data, dict):
        problems.append(((), "must be a mapping with a `policies` key"))
        return []
    for key in data:
        if key != "policies" and not str(key).startswith("x-"):  # x-*: YAML anchors to share
            problems.append(((str(key),), "is not a known field (policies, or x-* for anchors)"))
    policies = data.get("policies")
    if not isinstance(policies, dict) or not policies:
        why = "is required" if "policies" not in data else "must be a mapping of name to policy"
        problems.append((("policies",), why))
        return []
    return [(str(name), body) for name, body in policies.items()]


def _load_one(
    name: str, body: Any, allowed_modules: Sequence[str] | None, problems: Problems
) -> Policy | None:
    prefix: Path_ = ("policies", name)
    if isinstance(body, dict):
        if "name" in body and body["name"] != name:
            problems.append(((*prefix, "name"), f"must be {name!r} (the key) or left out"))
        body = {**body, "name": name}
    found = len(problems)
    problems.extend(((*prefix, *p), m) for p, m in _check_body(body, allowed_modules))
    try:
        file_policy = FilePolicy.model_validate(body, context={"allowed_modules": allowed_modules})
    except ValidationError as err:
        problems.extend(((*prefix, *p), m) for p, m in _problems(err, body))
        return None
    if len(problems) > found:
        return None
    try:
        return to_policy(file_policy)
    except PolicyError as err:  # a check only the real models make: name their section
        problems.extend((prefix, line) for line in err.problems)
        return None


# what served_by says of an answer that no fallback gave (records, headers, metrics)
_RESERVED = {"primary": "the guarded model", "none": "a call nothing answered"}


def _check_body(body: Any, allowed_modules: Sequence[str] | None) -> Problems:
    """Checks across fields: unique fallback names, rule features that the schema knows."""
    if not isinstance(body, dict) or not isinstance(body.get("fallbacks"), list):
        return []
    out: Problems = []
    features = _schema_fields(body.get("validation"), allowed_modules)
    first: dict[str, int] = {}
    for i, entry in enumerate(body["fallbacks"]):
        if not isinstance(entry, dict):
            continue
        fb_name = entry.get("name")
        if isinstance(fb_name, str):
            if fb_name in _RESERVED:
                why = f"{fb_name!r} names {_RESERVED[fb_name]}: pick another name"
                out.append((("fallbacks", i, "name"), why))
            elif fb_name in first:
                where = f"fallbacks[{first[fb_name]}]"
                out.append((("fallbacks", i, "name"), f"duplicate fallback name (also {where})"))
            first.setdefault(fb_name, i)
        rules = entry.get("rules")
        if features is None or not isinstance(rules, list):
            continue
        for j, rule in enumerate(rules):
            when = rule.get("when") if isinstance(rule, dict) else None
            for feature in when if isinstance(when, dict) else ():
                if feature not in features:
                    close = difflib.get_close_matches(str(feature), features, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    path: Path_ = ("fallbacks", i, "rules", j, "when", str(feature))
                    out.append((path, f"not a field of the input schema{hint}"))
    return out


def _schema_fields(validation: Any, allowed_modules: Sequence[str] | None) -> list[str] | None:
    """The input schema's field names (aliases too), or None when no schema resolves."""
    ref = validation.get("schema") if isinstance(validation, dict) else None
    if not isinstance(ref, str):
        return None
    try:
        schema = resolve(ref, allowed_modules)
    except ValueError:
        return None  # reported by validation
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return None
    return schema_field_names(schema)


def _problems(err: ValidationError, body: Any) -> Problems:
    """One problem per located pydantic error, paths as they are in the file."""
    out: Problems = []
    seen: set[Path_] = set()
    for e in err.errors(include_url=False, include_input=False):
        loc = _file_loc(e["loc"], body, e["type"])
        if loc in seen:  # several branches of one union failing: the first says enough
            continue
        seen.add(loc)
        out.append((loc, _message(e, loc)))
    return out


def _file_loc(loc: tuple[Any, ...], body: Any, kind: str) -> Path_:
    """The part of a pydantic `loc` that exists in the file (drops union-branch labels)."""
    out: list[str | int] = []
    node = body
    for i, part in enumerate(loc):
        present = part in node if isinstance(node, dict) else _has_index(node, part)
        if present:
            node = node[part]
        elif not (i == len(loc) - 1 and kind == "missing"):
            break
        out.append(part)
    return tuple(out)


def _has_index(node: Any, part: Any) -> bool:
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _message(e: Any, loc: Path_) -> str:
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc[:-1]), n=1)
        return "is not a known field" + (f"; did you mean {close[0]!r}?" if close else "")
    return friendly_message(e)


def _known_fields(loc: Path_) -> list[str]:
    """Field names (by alias) of the file model at `loc` inside a policy."""
    model: Any = FilePolicy
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation) if get_origin(annotation) is not None else ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def file_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policies file, generated from the file-format models."""
    schema = PolicyFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def describe(policy: Policy) -> str:
    """One line: the policy's model, fallback chain, breaker figures and timeout."""
    model = policy.model
    name = "(set in code)"
    if model is not None:
        qualname = getattr(model, "__qualname__", type(model).__qualname__)
        name = f"{getattr(model, '__module__', '?')}:{qualname}"
    chain = " -> ".join(f"{f.name} ({f.kind})" for f in policy.fallbacks) or "none"
    b = policy.breaker
    slow = (
        f" or {b.slow_call_rate_threshold:.0%} slower than {b.slow_call_s:g}s"
        if b.slow_call_s is not None
        else ""
    )
    breaker = (
        f"{b.window} window {b.window_size}{' calls' if b.window == 'count' else ' s'},"
        f" min {b.min_calls} calls, "
        f"trips at {b.failure_rate_threshold:.0%} failures{slow}, open {b.open_s:g}s"
        + (" (metrics only)" if b.mode == "metrics_only" else "")
    )
    timeout = f"{policy.timeout_s:g}s" if policy.timeout_s is not None else "none"
    return f"{policy.name}: model {name}; fallbacks {chain}; breaker {breaker}; timeout {timeout}"


class PolicyWatcher:
    """Polls a policies file and reloads live guards when its content changes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        guards: Mapping[str, Any],
        interval_s: float = 1.0,
        *,
        allowed_modules: Sequence[str] | None = None,
        on_reload: Callable[[dict[str, Policy]], Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.guards = dict(guards)
        self.interval_s = interval_s
        self.allowed_modules = allowed_modules
        self.on_reload = on_reload
        self.reloads = 0
        self.problems: list[str] = []  # of the last bad version, cleared by a good one
        self._digest = self._read()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="safeserve-config-watch", daemon=True
        )
        self._thread.start()

    def _read(self) -> tuple[bytes | None, str | None]:
        try:
            content = self.path.read_bytes()
        except OSError:
            return None, None
        return content, hashlib.sha256(content).hexdigest()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise; say what happened
                logger.exception("safeserve: reloading %s failed", self.path)

    def poll(self) -> bool:
        """Check the file now; True when the guards were reloaded."""
        with self._lock:
            content, digest = self._read()
            if content is None or digest == self._digest:
                return False
            self._digest = digest
            try:
                policies = policies_from_bytes(
                    content, self.path.suffix.lower(), allowed_modules=self.allowed_modules
                )
            except PolicyError as err:
                self.problems = err.problems
                logger.error(
                    "safeserve: %s has problems; the guards keep their policies:\n%s",
                    self.path,
                    "\n".join(err.problems),
                )
                return False
            self.problems = []
            for name, guarded in self.guards.items():
                policy = policies.get(name)
                if policy is None:
                    logger.error("safeserve: %s no longer declares %r; kept as is", self.path, name)
                    continue
                try:
                    guarded.guard.reload(policy)
                except PolicyError as err:
                    logger.error("safeserve: cannot reload %r: %s", name, "; ".join(err.problems))
            self.reloads += 1
            logger.info("safeserve: reloaded policies from %s", self.path)
        if self.on_reload is not None:
            self.on_reload(policies)
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching (the guards keep their current policies)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> PolicyWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def watch_policies(
    path: str | os.PathLike[str],
    guards: Mapping[str, Any],
    interval_s: float = 1.0,
    *,
    allowed_modules: Sequence[str] | None = None,
    on_reload: Callable[[dict[str, Policy]], Any] | None = None,
) -> PolicyWatcher:
    """Reload `guards` (policy name -> guarded function) whenever the file at `path` changes.

    A bad new version keeps the old policies and logs its problems on `safeserve.config`.
    Breaker state survives a reload unless the breaker settings changed. `.stop()` ends it.
    """
    return PolicyWatcher(
        path, guards, interval_s, allowed_modules=allowed_modules, on_reload=on_reload
    )


__all__ = ["PolicyWatcher", "describe", "file_json_schema", "load_policies", "watch_policies"]
