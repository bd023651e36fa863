"""The `safeserve` command line; each subcommand's work lives in its own module."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from safeserve.demo import run_demo

    try:
        return run_demo(args.out, args.seed, sys.stdout)
    except OSError as exc:
        print(f"safeserve demo: cannot write the demo's files: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    from safeserve.config import describe, load_policies
    from safeserve.configfile import SUFFIXES
    from safeserve.errors import PolicyError

    # like uvicorn, import paths are resolved from the working directory (the project's root)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    code = 0
    for file in args.files:
        if file.suffix.lower() not in SUFFIXES:
            print(f"safeserve check: {file}: not a .yaml, .yml or .toml file", file=sys.stderr)
            code = 2
            continue
        try:
            policies = load_policies(file, allowed_modules=args.allow_module)
        except OSError as exc:
            print(f"safeserve check: cannot read {file}: {exc.strerror or exc}", file=sys.stderr)
            code = 2
            continue
        except PolicyError as err:
            for problem in err.problems:
                print(f"{file}: {problem}", file=sys.stderr)
            code = max(code, 1)
            continue
        for policy in policies.values():
            print(f"{file}: {describe(policy)}")
    return code


def _schema(args: argparse.Namespace) -> int:
    from safeserve.config import file_json_schema

    print(json.dumps(file_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="safeserve",
        description="Keep an ML model's answers coming when it fails, and record why.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a fraud model through injected faults and write its decision log",
        description="Serve a small fraud model through a guard while faults are injected in "
        "phases (malformed inputs, slow calls, errors, an outage, recovery, a drill); "
        "print what served each phase and write the decision log.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory for decisions.jsonl (default: a new ./safeserve-demo-out)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=7,
        metavar="N",
        help="seed of the synthetic traffic and faults (default: 7)",
    )
    demo.set_defaults(handler=_demo)
    check = commands.add_parser(
        "check",
        help="check policy files (YAML/TOML); a CI step",
        description="Load each policy file as safeserve would: resolve every import path and "
        "check every value. Prints one summary line per policy on stdout and exits 0 when all "
        "files are clean; prints every problem as FILE: PATH: MESSAGE on stderr and exits 1 "
        "otherwise; exits 2 when a file cannot be read.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="policy files")
    check.add_argument(
        "--allow-module",
        action="append",
        default=None,
        metavar="PREFIX",
        help="only let import paths name modules starting with PREFIX (repeatable)",
    )
    check.set_defaults(handler=_check)
    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of policy files",
        description="Print the JSON Schema of the policy-file format (for editors and CI).",
    )
    schema.set_defaults(handler=_schema)
    from safeserve.baseline_cli import add_baseline_parser

    add_baseline_parser(commands)
    from safeserve.skew_cli import add_skew_parser

    add_skew_parser(commands)
    serve = commands.add_parser(
        "serve",
        help="serve every policy's model over HTTP (FastAPI + uvicorn)",
        description="POST /v1/models/{name}/predict per policy, plus /safeserve admin routes.",
    )
    serve.add_argument("policies", metavar="POLICIES", help="a .yaml/.yml/.toml policies file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument(
        "--admin-token",
        default=None,
        help="bearer token for the breaker routes (else $SAFESERVE_ADMIN_TOKEN; none: refused)",
    )
    serve.set_defaults(handler=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from safeserve.errors import PolicyError

    try:
        from safeserve.serve import serve
    except ImportError as exc:
        print(f"safeserve serve needs the fastapi extra: {exc}", file=sys.stderr)
        return 2
    sys.path.insert(0, os.getcwd())  # import paths in the file resolve from here, as in `check`
    token = args.admin_token or os.environ.get("SAFESERVE_ADMIN_TOKEN") or None
    try:
        return serve(args.policies, args.host, args.port, args.workers, token)
    except PolicyError as err:
        print(f"{args.policies}:\n{err}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"safeserve serve: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `safeserve` command with `argv` (default: the process's) and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) become return codes
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 2
    try:
        code: int = args.handler(args)
    except BrokenPipeError:  # `safeserve schema | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    raise SystemExit(main())
