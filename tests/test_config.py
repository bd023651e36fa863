"""Config files: loading YAML/TOML policies, every problem with its path, safety, CLI, reload."""

from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import safeserve as ss
from safeserve import pipeline
from safeserve.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def _importable_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example files name `examples.fraud_models:...`, importable from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))
    for var in ("FRAUD_OWNER", "FRAUD_HASH_SALT"):
        monkeypatch.delenv(var, raising=False)


def write(tmp_path: Path, text: str, name: str = "policies.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(ss.PolicyError) as info:
        ss.load_policies(path, **kwargs)
    return info.value.problems


MINIMAL = """\
policies:
  fraud:
    model: examples.fraud_models:predict_v3
    {extra}
"""


class TestLoading:
    def test_yaml_and_toml_examples_load_equal(self) -> None:
        """The YAML and TOML forms of the same policies give equal `Policy` objects."""
        from_yaml = ss.load_policies(EXAMPLES / "policies.yaml")
        from_toml = ss.load_policies(EXAMPLES / "policies.toml")
        assert list(from_yaml) == list(from_toml) == ["fraud", "chargeback"]
        for name in from_yaml:
            assert from_yaml[name].model_dump() == from_toml[name].model_dump()
            assert from_yaml[name] == from_toml[name]

    def test_file_policy_equals_the_policy_built_in_python(self) -> None:
        """Every field of the example maps onto the Python API; callables resolve to the objects."""
        from examples import fraud_models as fm

        expected = ss.Policy(
            name="fraud",
            owner="risk-ml-oncall",
            model_version="v3",
            model=fm.predict_v3,
            validation=ss.ValidationConfig(
                schema=fm.Txn, output_schema=fm.Verdict, on_invalid="fallback"
            ),
            timeout_s=0.2,
            retry=ss.RetryConfig(
                attempts=3,
                backoff_s=0.01,
                max_backoff_s=0.1,
                retry_on=[ConnectionError, fm.ModelUnavailable],
            ),
            breaker=ss.BreakerConfig(
                window="count",
                window_size=20,
                min_calls=10,
                failure_rate_threshold=0.5,
                slow_call_s=0.5,
                open_s=30,
                half_open_calls=3,
                ignore_on=[ValueError],
                on_state_change=[fm.page_oncall],
            ),
            confidence=ss.ConfidenceConfig(threshold=0.7, extract="score"),
            fallbacks=[
                ss.Fallback.model("v2", fm.predict_v2, timeout_s=0.1, threshold=0.6),
                ss.Fallback.cache("recent", ttl_s=300, max_items=10000),
                ss.Fallback.rules(
                    "rules",
                    [
                        {
                            "when": {
                                "amount": {"gt": 1000},
                                "country": {"not_in": ["DE", "FR", "NL"]},
                            },
                            "then": {"label": "review", "score": 1.0},
                        },
                        {
                            "when": {"amount": {"le": 50}},
                            "then": {"label": "approve", "score": 1.0},
                        },
                    ],
                ),
                ss.Fallback.static("default", {"label": "review", "score": 0.0}),
            ],
            log=ss.DecisionLogConfig(
                sample_rate=0.01,
                redact=["card_number"],
                hash=["customer_id"],
                hash_salt="dev-only-salt",
            ),
        )
        loaded = ss.load_policies(EXAMPLES / "policies.yaml")["fraud"]
        assert loaded.model_dump() == expected.model_dump()
        assert loaded == expected

    def test_examples_use_every_fallback_kind(self) -> None:
        """The documented example files exercise model, rules, cache and static fallbacks."""
        for file in ("policies.yaml", "policies.toml"):
            policies = ss.load_policies(EXAMPLES / file)
            kinds = {f.kind for p in policies.values() for f in p.fallbacks}
            assert kinds == {"model", "rules", "cache", "static"}
            rules = [f for p in policies.values() for f in p.fallbacks if f.kind == "rules"]
            assert any(f.default is not None for f in rules)

    def test_guard_serves_the_model_named_in_the_file(self) -> None:
        """`ss.guard(policies[name])` returns the guarded model from the file, no decorator."""
        from examples import fraud_models as fm

        predict = ss.guard(ss.load_policies(EXAMPLES / "policies.yaml")["fraud"])
        txn = {"amount": 120.0, "country": "DE"}
        assert predict(txn) == fm.predict_v3(txn)
        outcome = predict.call({"amount": "not a number", "country": "DE"})
        assert outcome.decision.served_by == "default"  # invalid input walks the chain

    def test_unset_fields_take_the_policy_defaults(self, tmp_path: Path) -> None:
        """A policy with only a model equals `Policy(name=..., model=...)`; its name is its key."""
        from examples import fraud_models as fm

        policies = ss.load_policies(write(tmp_path, MINIMAL.format(extra="")))
        assert policies["fraud"] == ss.Policy(name="fraud", model=fm.predict_v3)

    def test_every_callable_field_takes_an_import_path(self, tmp_path: Path) -> None:
        """Exception types, schemas, sinks, extractors and hooks all load from import paths."""
        from examples import fraud_models as fm

        path = write(
            tmp_path,
            """\
            policies:
              fraud:
                model: examples.fraud_models:predict_v3
                validation:
                  schema: examples.fraud_models:Txn
                  output_schema: examples.fraud_models:Verdict
                retry: {retry_on: [TimeoutError, "examples.fraud_models:ModelUnavailable"]}
                breaker:
                  record_on: [ConnectionError]
                  ignore_on: ["builtins:KeyError"]
                  on_state_change: ["examples.fraud_models:page_oncall"]
                  clock: "time:perf_counter"
                confidence: {threshold: 0.5, extract: "examples.fraud_models:predict_v2"}
                log: {sink: "examples.fraud_models:page_oncall"}
            """,
        )
        policy = ss.load_policies(path)["fraud"]
        assert policy.validation is not None
        assert policy.validation.schema is fm.Txn
        assert policy.validation.output_schema is fm.Verdict
        assert policy.retry is not None
        assert policy.retry.retry_on == [
            TimeoutError,
            fm.ModelUnavailable,
        ]
        assert policy.breaker.record_on == [ConnectionError]
        assert policy.breaker.ignore_on == [KeyError]
        assert policy.breaker.on_state_change == [fm.page_oncall]
        assert policy.breaker.clock is time.perf_counter
        assert policy.confidence is not None
        assert policy.confidence.extract is fm.predict_v2
        assert policy.log is not None
        assert policy.log.sink is fm.page_oncall

    def test_plain_strings_stay_strings_where_a_string_is_allowed(self, tmp_path: Path) -> None:
        """`extract: score` is a key and `sink: decisions.jsonl` a path, not import paths."""
        extra = (
            "confidence: {threshold: 0.5, extract: score}\n    log: {sink: logs/decisions.jsonl}"
        )
        policy = ss.load_policies(write(tmp_path, MINIMAL.format(extra=extra)))["fraud"]
        assert policy.confidence is not None
        assert policy.confidence.extract == "score"
        assert policy.log is not None
        assert policy.log.sink == "logs/decisions.jsonl"

    def test_yaml_anchors_share_settings_between_policies(self, tmp_path: Path) -> None:
        """Top-level `x-*` keys are free, so anchors and merge keys can share settings."""
        path = write(
            tmp_path,
            """\
            x-common: &common
              model: examples.fraud_models:predict_v3
              breaker: {open_s: 5}
            policies:
              a: {<<: *common, timeout_s: 1}
              b: *common
            """,
        )
        policies = ss.load_policies(path)
        assert policies["a"].breaker.open_s == policies["b"].breaker.open_s == 5
        assert policies["a"].timeout_s == 1

    def test_unreadable_file_raises_oserror(self, tmp_path: Path) -> None:
        """A missing file is an OSError, not a problem in a file."""
        with pytest.raises(FileNotFoundError):
            ss.load_policies(tmp_path / "absent.yaml")


# One case per class of problem: (file content, suffix, the exact problem line expected).
PROBLEMS = {
    "bound": (
        MINIMAL.format(extra="breaker: {open_s: 0}"),
        "policies.fraud.breaker.open_s: must be > 0 (line 4)",
    ),
    "bound_toml": (
        '[policies.fraud]\nmodel = "examples.fraud_models:predict_v3"\nbreaker = { open_s = -1 }\n',
        "policies.fraud.breaker.open_s: must be > 0",
    ),
    "unknown_key": (
        MINIMAL.format(extra="timout_s: 0.2"),
        "policies.fraud.timout_s: is not a known field; did you mean 'timeout_s'? (line 4)",
    ),
    "unknown_nested_key": (
        MINIMAL.format(extra="breaker:\n      open_secs: 3"),
        "policies.fraud.breaker.open_secs: is not a known field; did you mean 'open_s'? (line 5)",
    ),
    "literal": (
        MINIMAL.format(extra="breaker: {window: counts}"),
        "policies.fraud.breaker.window: must be 'count' or 'time' (line 4)",
    ),
    "wrong_type": (
        MINIMAL.format(extra="timeout_s: soon"),
        "policies.fraud.timeout_s: "
        "must be a valid number, unable to parse string as a number (line 4)",
    ),
    "missing": (
        MINIMAL.format(extra="confidence: {action: flag}"),
        "policies.fraud.confidence.threshold: is required (line 4)",
    ),
    "cross_field": (
        MINIMAL.format(extra="breaker: {half_open_calls: 2, success_threshold: 5}"),
        "policies.fraud.breaker: success_threshold cannot exceed half_open_calls (line 4)",
    ),
    "cannot_import": (
        MINIMAL.format(
            extra="fallbacks:\n      - {name: v2, static: 1}\n"
            "      - {name: v1, model: 'pkg.mod:nope'}"
        ),
        "policies.fraud.fallbacks[1].model: cannot import 'pkg.mod:nope': "
        "no module named 'pkg' (line 6)",
    ),
    "no_attribute": (
        MINIMAL.format(extra="validation: {schema: 'examples.fraud_models:Nope'}"),
        "policies.fraud.validation.schema: cannot import 'examples.fraud_models:Nope': "
        "no attribute 'Nope' (line 4)",
    ),
    "not_an_import_path": (
        "policies:\n  fraud:\n    model: \"__import__('os').system('true')\"\n",
        "policies.fraud.model: expected an import path 'pkg.module:attr', "
        "got \"__import__('os').system('true')\" (line 3)",
    ),
    "not_callable": (
        "policies:\n  fraud:\n    model: examples.fraud_models:HIGH_RISK\n",
        "policies.fraud.model: 'examples.fraud_models:HIGH_RISK' is not callable (line 3)",
    ),
    "not_a_model_class": (
        MINIMAL.format(extra="validation: {schema: 'examples.fraud_models:predict_v2'}"),
        "policies.fraud.validation.schema: "
        "'examples.fraud_models:predict_v2' is not a pydantic model class (line 4)",
    ),
    "unknown_exception": (
        MINIMAL.format(extra="retry: {retry_on: [ConnectionErr]}"),
        "policies.fraud.retry.retry_on[0]: unknown exception 'ConnectionErr': "
        "a builtin name or 'pkg.module:Class' (line 4)",
    ),
    "not_an_exception": (
        MINIMAL.format(extra="breaker: {ignore_on: ['examples.fraud_models:Txn']}"),
        "policies.fraud.breaker.ignore_on[0]: "
        "'examples.fraud_models:Txn' is not an exception class (line 4)",
    ),
    "duplicate_fallback": (
        MINIMAL.format(
            extra="fallbacks:\n      - {name: a, static: 1}\n      - {name: a, static: 2}"
        ),
        "policies.fraud.fallbacks[1].name: duplicate fallback name (also fallbacks[0]) (line 6)",
    ),
    "reserved_fallback_name": (
        MINIMAL.format(extra="fallbacks: [{name: primary, static: 1}]"),
        "policies.fraud.fallbacks[0].name: "
        "'primary' names the guarded model: pick another name (line 4)",
    ),
    "fallback_named_none": (  # else its answers and the unanswered calls share a metric series
        MINIMAL.format(extra="fallbacks: [{name: none, static: 1}]"),
        "policies.fraud.fallbacks[0].name: "
        "'none' names a call nothing answered: pick another name (line 4)",
    ),
    "two_kinds": (
        MINIMAL.format(extra="fallbacks:\n      - {name: a, static: 1, cache: {}}"),
        "policies.fraud.fallbacks[0]: give exactly one of model, rules, cache, static "
        "(found cache, static) (line 5)",
    ),
    "no_kind": (
        MINIMAL.format(extra="fallbacks:\n      - {name: a, timeout_s: 1}"),
        "policies.fraud.fallbacks[0]: give exactly one of model, rules, cache, static (line 5)",
    ),
    "default_outside_rules": (
        MINIMAL.format(extra="fallbacks:\n      - {name: a, static: 1, default: 2}"),
        "policies.fraud.fallbacks[0]: `default` belongs to a rules fallback (line 5)",
    ),
    "unknown_rule_op": (
        MINIMAL.format(
            extra="fallbacks:\n      - name: r\n"
            "        rules: [{when: {amount: {gte: 1}}, then: x}]"
        ),
        "policies.fraud.fallbacks[0].rules[0].when: amount: unknown op 'gte' "
        "(one of eq, ne, lt, le, gt, ge, in, not_in, is_null) (line 6)",
    ),
    "rule_feature_not_in_schema": (
        MINIMAL.format(
            extra="validation: {schema: 'examples.fraud_models:Txn'}\n"
            "    fallbacks:\n      - name: r\n        rules: [{when: {amout: {gt: 1}}, then: x}]"
        ),
        "policies.fraud.fallbacks[0].rules[0].when.amout: "
        "not a field of the input schema; did you mean 'amount'? (line 7)",
    ),
    "fallback_threshold_range": (
        MINIMAL.format(extra="fallbacks:\n      - {name: a, static: 1, threshold: 1.5}"),
        "policies.fraud.fallbacks[0].threshold: must be <= 1 (line 5)",
    ),
    "confidence_threshold_range": (
        MINIMAL.format(extra="confidence: {threshold: -0.1}"),
        "policies.fraud.confidence.threshold: must be >= 0 (line 4)",
    ),
    "name_mismatch": (
        MINIMAL.format(extra="name: other"),
        "policies.fraud.name: must be 'fraud' (the key) or left out (line 4)",
    ),
    "policy_not_a_mapping": (
        "policies:\n  fraud: 3\n",
        "policies.fraud: must be a mapping (line 2)",
    ),
    "unknown_top_level_key": (
        MINIMAL.format(extra="") + "defaults: {}\n",
        "defaults: is not a known field (policies, or x-* for anchors) (line 5)",
    ),
    "no_policies_key": ("{}\n", "policies: is required"),
    "empty_file": ("", "policies: is required (the file is empty)"),
    "root_not_a_mapping": ("- a\n- b\n", "<root>: must be a mapping with a `policies` key"),
    "duplicate_yaml_key": (
        MINIMAL.format(extra="timeout_s: 1\n    timeout_s: 2"),
        "policies.fraud.timeout_s: duplicate key (again at line 5) (line 4)",
    ),
    "yaml_syntax": (
        "policies:\n  fraud: [\n",
        "<root>: invalid YAML: expected the node content, but found '<stream end>' (line 3)",
    ),
    "toml_syntax": (
        "[policies.fraud\n",
        "<root>: invalid TOML: Expected ']' at the end of a table declaration "
        "(at line 1, column 16)",
    ),
}


class TestProblems:
    @pytest.mark.parametrize(("text", "expected"), PROBLEMS.values(), ids=PROBLEMS.keys())
    def test_each_problem_is_reported_with_its_path(
        self, tmp_path: Path, text: str, expected: str
    ) -> None:
        """Each class of mistake gives exactly one problem line naming its path (and line)."""
        name = "p.toml" if text.startswith("[") else "p.yaml"
        assert problems_of(write(tmp_path, text, name)) == [expected]

    def test_every_problem_at_once_in_file_order(self, tmp_path: Path) -> None:
        """Schema, import and cross-field problems of several policies come in one error."""
        path = write(
            tmp_path,
            """\
            policies:
              fraud:
                model: examples.fraud_models:nope
                breaker: {open_s: 0}
                fallbacks:
                  - {name: a, static: 1}
                  - {name: a, model: "pkg.mod:nope"}
              other:
                timeout_s: -1
            """,
        )
        with pytest.raises(ss.PolicyError) as info:
            ss.load_policies(path)
        err = info.value
        assert [p.split(":")[0] for p in err.problems] == [
            "policies.fraud.model",
            "policies.fraud.breaker.open_s",
            "policies.fraud.fallbacks[1].name",
            "policies.fraud.fallbacks[1].model",
            "policies.other.timeout_s",
        ]
        assert str(err) == "\n".join(err.problems)
        for text in ("Input should", "pydantic", "Traceback", "validation error"):
            assert text not in str(err)

    def test_a_faulted_value_is_reported_once(self, tmp_path: Path) -> None:
        """An unset variable in a number field is one problem, not also a type error."""
        path = write(tmp_path, MINIMAL.format(extra="timeout_s: ${SS_TEST_UNSET_VAR}"))
        assert problems_of(path) == [
            "policies.fraud.timeout_s: environment variable SS_TEST_UNSET_VAR is not set "
            "(no default) (line 4)"
        ]


class TestSafety:
    @pytest.mark.parametrize(
        "tag",
        [
            "!!python/object/apply:os.system [touch {marker}]",
            "!!python/object/new:os.system [touch {marker}]",
            "!!python/name:os.system",
            "!!python/object:examples.fraud_models.Txn {{amount: 1}}",
            "!custom {marker}",
        ],
    )
    def test_python_tags_are_refused_and_nothing_runs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str
    ) -> None:
        """A `!!python/...` tag is a problem with its path; no object is built, no command run."""
        calls: list[Any] = []
        monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
        marker = tmp_path / "pwned"
        text = "policies:\n  fraud:\n    model: examples.fraud_models:predict_v3\n"
        text += f"    fallbacks:\n      - name: s\n        static: {tag.format(marker=marker)}\n"
        problems = problems_of(write(tmp_path, text))
        assert len(problems) == 1
        assert problems[0].startswith("policies.fraud.fallbacks[0].static: tag '!")
        assert problems[0].endswith("is not allowed: files are data, not code (line 6)")
        assert calls == []
        assert not marker.exists()

    def test_allowed_modules_refuses_os_system(self, tmp_path: Path) -> None:
        """An allow-list of module prefixes refuses `os:system` at load."""
        path = write(tmp_path, "policies:\n  fraud:\n    model: os:system\n")
        assert problems_of(path, allowed_modules=["examples."]) == [
            "policies.fraud.model: 'os:system' is not allowed: "
            "module 'os' is outside 'examples.' (line 3)"
        ]

    def test_allowed_modules_admit_their_prefix_and_builtin_names(self) -> None:
        """The example loads under `examples.`; builtin exception names need no import."""
        policies = ss.load_policies(EXAMPLES / "policies.toml", allowed_modules=["examples."])
        assert set(policies) == {"fraud", "chargeback"}

    def test_refused_module_is_never_imported(self, tmp_path: Path) -> None:
        """The allow-list is checked before importing: a refused module's code never runs."""
        marker = tmp_path / "imported"
        (tmp_path / "ss_side_effect_mod.py").write_text(
            f"open({str(marker)!r}, 'w').close()\ndef fn(x): return x\n"
        )
        sys.path.insert(0, str(tmp_path))
        try:
            path = write(tmp_path, "policies:\n  fraud:\n    model: ss_side_effect_mod:fn\n")
            problems = problems_of(path, allowed_modules=["examples."])
        finally:
            sys.path.remove(str(tmp_path))
        assert "is not allowed" in problems[0]
        assert not marker.exists()
        assert "ss_side_effect_mod" not in sys.modules


class TestInterpolation:
    FILE = """\
    policies:
      fraud:
        owner: ${SS_TEST_OWNER}
        model: examples.fraud_models:predict_v3
        timeout_s: ${SS_TEST_TIMEOUT:-0.25}
        breaker: {store_prefix: "pre-${SS_TEST_PREFIX:-x}-$${LITERAL}"}
    """

    def test_variables_are_read_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`${VAR}` takes the value; numbers in strings are coerced by the field's type."""
        monkeypatch.setenv("SS_TEST_OWNER", "risk-oncall")
        monkeypatch.setenv("SS_TEST_TIMEOUT", "0.5")
        monkeypatch.setenv("SS_TEST_PREFIX", "prod")
        policy = ss.load_policies(write(tmp_path, self.FILE))["fraud"]
        assert policy.owner == "risk-oncall"
        assert policy.timeout_s == 0.5
        assert policy.breaker.store_prefix == "pre-prod-${LITERAL}"

    def test_defaults_apply_when_unset_or_empty(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`${VAR:-default}` falls back to the default; `$${` is a literal `${`."""
        monkeypatch.setenv("SS_TEST_OWNER", "o")
        monkeypatch.delenv("SS_TEST_TIMEOUT", raising=False)
        monkeypatch.setenv("SS_TEST_PREFIX", "")
        policy = ss.load_policies(write(tmp_path, self.FILE))["fraud"]
        assert policy.timeout_s == 0.25
        assert policy.breaker.store_prefix == "pre-x-${LITERAL}"

    def test_unset_variable_without_default_is_a_problem(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A missing variable with no default names the path that needs it."""
        monkeypatch.delenv("SS_TEST_OWNER", raising=False)
        assert problems_of(write(tmp_path, self.FILE)) == [
            "policies.fraud.owner: environment variable SS_TEST_OWNER is not set "
            "(no default) (line 3)"
        ]

    def test_toml_interpolates_too(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """TOML strings get the same interpolation (problems without line numbers)."""
        monkeypatch.setenv("FRAUD_HASH_SALT", "s3cret")
        policy = ss.load_policies(EXAMPLES / "policies.toml")["fraud"]
        assert policy.log is not None
        assert policy.log.hash_salt == "s3cret"
        text = '[policies.fraud]\nmodel = "examples.fraud_models:predict_v3"\nowner = "${1BAD}"\n'
        assert problems_of(write(tmp_path, text, "p.toml")) == [
            "policies.fraud.owner: bad reference '${1BAD}': use ${VAR} or ${VAR:-default}"
        ]


class TestCli:
    def test_check_clean_files_exits_0_with_a_line_per_policy(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Summaries on stdout: model, fallback chain, breaker figures, timeout."""
        files = [str(EXAMPLES / "policies.yaml"), str(EXAMPLES / "policies.toml")]
        assert main(["check", *files]) == 0
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert len(lines) == 4
        assert err == ""
        fraud = lines[0]
        assert fraud.startswith(f"{files[0]}: fraud: model examples.fraud_models:predict_v3; ")
        assert (
            "fallbacks v2 (model) -> recent (cache) -> rules (rules) -> default (static)" in fraud
        )
        assert "count window 20 calls, min 10 calls" in fraud
        assert "open 30s" in fraud
        assert fraud.endswith("timeout 0.2s")

    def test_check_bad_file_exits_1_with_problems_on_stderr(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One `FILE: path: message` line per problem on stderr, nothing on stdout."""
        path = write(tmp_path, MINIMAL.format(extra="breaker: {open_s: 0, window: x}"))
        assert main(["check", str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.splitlines() == [
            f"{path}: policies.fraud.breaker.window: must be 'count' or 'time' (line 4)",
            f"{path}: policies.fraud.breaker.open_s: must be > 0 (line 4)",
        ]

    def test_check_finds_what_only_making_the_guard_would_refuse(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A baseline file that is not there, tracing without OpenTelemetry: problems of the
        file for `check` (as `serve` finds them), one line each, with the policy's path."""
        text = (
            "policies:\n"
            "  fraud:\n    model: examples.fraud_models:predict_v3\n"
            "    validation: {baseline: missing.json}\n"
            "  churn:\n    model: examples.fraud_models:predict_v3\n"
            "    validation: {baseline: gone.json}\n    log: {trace: true}\n"
        )
        path = write(tmp_path, text)
        real = pipeline.find_spec
        monkeypatch.setattr(
            pipeline,
            "find_spec",
            lambda name: None if name.startswith("opentelemetry") else real(name),
        )
        monkeypatch.chdir(tmp_path)
        assert main(["check", str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.splitlines()
        assert [line.split(": cannot load")[0] for line in lines[:2]] == [
            f"{path}: policies.fraud.validation.baseline",
            f"{path}: policies.churn.validation.baseline",
        ]
        assert lines[2:] == [
            f"{path}: policies.churn.log.trace: needs opentelemetry-api, which is not installed "
            "(pip install safeserve[otel])"
        ]
        assert main(["serve", str(path), "--port", "0"]) == 1  # the same, from the same file
        assert capsys.readouterr().err.splitlines() == lines

    def test_check_warns_of_a_served_name_unfit_for_a_url(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`safeserve serve` makes a policy with a model a route named after it, and refuses a
        name that cannot be part of its URL: `check` warns of it (a file CI passed would fail
        at deploy), without failing it (a guard made from it in code may be named so); a
        policy without a model is not warned of."""
        model = "examples.fraud_models:predict_v3"
        path = write(
            tmp_path,
            f"policies:\n  a/b:\n    model: {model}\n  'lib/only':\n    timeout_s: 1\n"
            f"  ok.v-2_~:\n    model: {model}\n",
        )
        why = (
            "policies.a/b: a served policy's name is part of its URL: use letters, digits and "
            ". _ ~ - only (not . or .. alone)"
        )
        assert main(["check", str(path)]) == 0
        out, err = capsys.readouterr()
        assert err.splitlines() == [f"{path}: warning: {why} (safeserve serve refuses it)"]
        assert len(out.splitlines()) == 3
        assert main(["serve", str(path), "--port", "0"]) == 1
        assert capsys.readouterr().err.splitlines() == [f"{path}: {why}"]

    def test_check_allow_module_option(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`--allow-module` restricts import paths as `allowed_modules` does."""
        path = write(tmp_path, "policies:\n  fraud:\n    model: os:system\n")
        assert main(["check", "--allow-module", "examples.", str(path)]) == 1
        assert "'os:system' is not allowed" in capsys.readouterr().err

    @pytest.mark.parametrize(
        "argv", [["check"], ["check", "{tmp}/absent.yaml"], ["check", "{tmp}/p.json"]]
    )
    def test_check_usage_or_unreadable_exits_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        """No file, a missing file or an unknown format is a usage error, not a problem."""
        (tmp_path / "p.json").write_text("{}")
        assert main([a.format(tmp=tmp_path) for a in argv]) == 2
        assert capsys.readouterr().err

    def test_schema_prints_the_file_format_as_json_schema(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Valid JSON, generated from the models: policies, every Policy field, fallback shapes."""
        assert main(["schema"]) == 0
        schema = json.loads(capsys.readouterr().out)
        assert "policies" in schema["properties"]
        assert schema["required"] == ["policies"]
        policy = schema["$defs"]["FilePolicy"]["properties"]
        assert set(ss.Policy.model_fields) <= set(policy)
        assert "name" not in schema["$defs"]["FilePolicy"].get("required", [])
        fallback = schema["$defs"]["FallbackEntry"]
        assert {"model", "rules", "cache", "static", "timeout_s", "threshold"} <= set(
            fallback["properties"]
        )
        assert len(fallback["oneOf"]) == 4
        assert schema["$defs"]["FileBreaker"]["properties"]["open_s"]["exclusiveMinimum"] == 0


FRAUD_FILE = """\
policies:
  fraud:
    model: examples.fraud_models:predict_v3
    timeout_s: {timeout}
    breaker: {{window_size: 20, min_calls: 10, open_s: {open_s}}}
    fallbacks:
      - {{name: {fallback}, static: {{label: review, score: 0.0}}}}
"""


def rewrite(path: Path, text: str) -> None:
    """Replace the file in one step, as editors and deploy tools do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class TestWatch:
    def test_change_reloads_the_guard(self, tmp_path: Path) -> None:
        """A changed file swaps the live guard's policy."""
        path = write(tmp_path, FRAUD_FILE.format(timeout=0.5, open_s=30, fallback="a"))
        predict = ss.guard(ss.load_policies(path)["fraud"])
        with ss.watch_policies(path, {"fraud": predict}, interval_s=0.01) as watcher:
            rewrite(path, FRAUD_FILE.format(timeout=0.25, open_s=30, fallback="b"))
            wait_for(lambda: watcher.reloads == 1)
        assert predict.policy.timeout_s == 0.25
        assert [f.name for f in predict.policy.fallbacks] == ["b"]

    def test_bad_file_keeps_the_old_policy_and_logs(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A bad new version is logged with its problems; the guard keeps serving the old one."""
        path = write(tmp_path, FRAUD_FILE.format(timeout=0.5, open_s=30, fallback="a"))
        predict = ss.guard(ss.load_policies(path)["fraud"])
        old = predict.policy
        with (
            caplog.at_level(logging.ERROR, logger="safeserve.config"),
            ss.watch_policies(path, {"fraud": predict}, interval_s=3600) as watcher,
        ):
            write(tmp_path, FRAUD_FILE.format(timeout=0.5, open_s=0, fallback="a"))
            assert watcher.poll() is False
        assert predict.policy is old
        assert watcher.problems == ["policies.fraud.breaker.open_s: must be > 0 (line 5)"]
        assert "policies.fraud.breaker.open_s: must be > 0" in caplog.text

    def test_breaker_state_survives_unless_its_settings_change(self, tmp_path: Path) -> None:
        """An open breaker stays open across a reload that leaves the breaker settings alone."""
        path = write(tmp_path, FRAUD_FILE.format(timeout=0.5, open_s=30, fallback="a"))
        predict = ss.guard(ss.load_policies(path)["fraud"])
        predict.open()
        with ss.watch_policies(path, {"fraud": predict}, interval_s=3600) as watcher:
            write(tmp_path, FRAUD_FILE.format(timeout=0.25, open_s=30, fallback="a"))
            assert watcher.poll() is True
            assert predict.breaker.state == "open"
            write(tmp_path, FRAUD_FILE.format(timeout=0.25, open_s=10, fallback="a"))
            assert watcher.poll() is True
            assert predict.breaker.state == "closed"

    def test_reload_under_concurrent_calls_fails_no_call(self, tmp_path: Path) -> None:
        """Threads keep calling while the file is rewritten and reloaded: every call answers."""
        path = write(tmp_path, FRAUD_FILE.format(timeout=0.5, open_s=30, fallback="f0"))
        predict = ss.guard(ss.load_policies(path)["fraud"])
        stop = threading.Event()
        errors: list[BaseException] = []
        answers = [0]

        def caller() -> None:
            txn = {"amount": 10.0, "country": "DE"}
            while not stop.is_set():
                try:
                    assert predict(txn)["label"] in ("approve", "review")
                    answers[0] += 1
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            with ss.watch_policies(path, {"fraud": predict}, interval_s=0.002) as watcher:
                for i in range(1, 21):
                    timeout = 0.5 if i % 2 else 0.25
                    text = FRAUD_FILE.format(timeout=timeout, open_s=30 + i % 3, fallback=f"f{i}")
                    rewrite(path, text)
                    wait_for(lambda i=i: predict.policy.fallbacks[0].name == f"f{i}")
                assert watcher.reloads == 20
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []
        assert answers[0] > 0
        assert [f.name for f in predict.policy.fallbacks] == ["f20"]
