"""Reading policy files: YAML (safely, keeping line numbers) and TOML, then `${VAR}` interpolation.

Everything here returns plain data plus problems as `(path, message)` pairs; nothing in a file is
ever constructed as a Python object beyond str/int/float/bool/None, lists, dicts and dates.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Path_ = tuple[str | int, ...]
"""A location in the file: mapping keys and list indexes from the root."""

SUFFIXES = (".yaml", ".yml", ".toml")
ROOT = "<root>"

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_VAR_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)
# tags YAML uses for merge keys (`<<: *base`); they are resolved by the loader, not constructed
_KEY_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")


@dataclass
class Parsed:
    """A parsed file: its data, the line of each path (YAML only) and the problems found."""

    data: Any = None
    lines: dict[Path_, int] = field(default_factory=dict)
    problems: list[tuple[Path_, str]] = field(default_factory=list)

    def line_of(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest enclosing path the parser placed."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def format(self, path: Path_, message: str) -> str:
        """One `path: message (line N)` problem line."""
        line = self.line_of(path)
        where = f" (line {line})" if line is not None else ""
        return f"{format_path(path)}: {message}{where}"


def format_path(path: Path_) -> str:
    """`("policies", "fraud", "fallbacks", 1, "model")` -> `policies.fraud.fallbacks[1].model`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or ROOT


def parse(text: str, suffix: str, env: Mapping[str, str]) -> Parsed:
    """Parse `text` as YAML or TOML (by `suffix`) and interpolate `${VAR}` from `env`."""
    parsed = _parse_toml(text) if suffix == ".toml" else _parse_yaml(text)
    parsed.data = _interpolate(parsed.data, (), env, parsed.problems, {})
    return parsed


def _parse_toml(text: str) -> Parsed:
    try:
        return Parsed(data=tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line N, column M)"
        return Parsed(problems=[((), f"invalid TOML: {exc}")])


def _parse_yaml(text: str) -> Parsed:
    try:
        import yaml  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return Parsed(problems=[((), "reading YAML needs PyYAML: pip install 'safeserve[yaml]'")])
    parsed = Parsed()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            safe_tags = {t for t in loader.yaml_constructors if t is not None}
            node = _walk(node, (), parsed, safe_tags, set())
            parsed.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" (line {mark.line + 1})" if mark is not None else ""
        what = exc.problem or exc.context or "cannot parse"
        parsed.problems.append(((), f"invalid YAML: {what}{line}"))
        parsed.data = None
    except yaml.YAMLError as exc:
        parsed.problems.append(((), f"invalid YAML: {exc}"))
        parsed.data = None
    finally:
        loader.dispose()
    return parsed


def _walk(node: Any, path: Path_, parsed: Parsed, safe_tags: set[str], seen: set[int]) -> Any:
    """Record the line of every path and replace nodes with unsafe tags by nulls (a problem)."""
    import yaml  # type: ignore[import-untyped, unused-ignore]

    if node.tag not in safe_tags:
        tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
        parsed.problems.append((path, f"tag {tag!r} is not allowed: files are data, not code"))
        return yaml.ScalarNode("tag:yaml.org,2002:null", "null", node.start_mark, node.end_mark)
    if id(node) in seen:  # an alias: already walked where its anchor is
        return node
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: dict[str, int] = {}
        for i, (key, value) in enumerate(node.value):
            line = key.start_mark.line + 1
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else f"<key {i}>"
            sub = (*path, name)
            if key.tag in _KEY_TAGS:
                node.value[i] = (key, _walk(value, sub, parsed, safe_tags, seen))
                continue
            if name in keys:
                parsed.problems.append((sub, f"duplicate key (again at line {line})"))
            keys.setdefault(name, line)
            parsed.lines.setdefault(sub, line)
            node.value[i] = (
                _walk(key, sub, parsed, safe_tags, seen),
                _walk(value, sub, parsed, safe_tags, seen),
            )
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            parsed.lines.setdefault((*path, i), item.start_mark.line + 1)
            node.value[i] = _walk(item, (*path, i), parsed, safe_tags, seen)
    return node


def _interpolate(
    data: Any,
    path: Path_,
    env: Mapping[str, str],
    problems: list[tuple[Path_, str]],
    memo: dict[int, Any],
) -> Any:
    """`${VAR}` and `${VAR:-default}` in string values; `$${` is a literal `${`."""
    if isinstance(data, str):
        return _substitute(data, path, env, problems) if "${" in data else data
    if not isinstance(data, dict | list):
        return data
    if id(data) in memo:  # YAML aliases share objects: substitute each once (no alias bombs)
        return memo[id(data)]
    if isinstance(data, dict):
        out: Any = {}
        memo[id(data)] = out
        for key, value in data.items():
            out[key] = _interpolate(value, (*path, str(key)), env, problems, memo)
        return out
    items: list[Any] = []
    memo[id(data)] = items
    items.extend(_interpolate(v, (*path, i), env, problems, memo) for i, v in enumerate(data))
    return items


def _substitute(
    text: str, path: Path_, env: Mapping[str, str], problems: list[tuple[Path_, str]]
) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = _VAR_BODY.fullmatch(match.group(1))
        if body is None:
            usage = "use ${VAR} or ${VAR:-default}"
            problems.append((path, f"bad reference {match.group(0)!r}: {usage}"))
            return ""
        value = env.get(body["name"])
        if value:
            return value
        if body["default"] is not None:
            return str(body["default"])
        if value is None:
            problems.append((path, f"environment variable {body['name']} is not set (no default)"))
        return ""

    return _VAR.sub(one, text)
