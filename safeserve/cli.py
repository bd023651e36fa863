"""The `safeserve` command line; each subcommand's work lives in its own module."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


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
    from safeserve.pipeline import build_problems, unservable_names

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
        unbuildable = build_problems(policies)
        if unbuildable:
            print("\n".join(f"{file}: {problem}" for problem in unbuildable), file=sys.stderr)
            code = max(code, 1)
            continue
        for problem in unservable_names(policies):
            print(f"{file}: warning: {problem} (safeserve serve refuses it)", file=sys.stderr)
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
        description="POST /v1/models/{name}/predict per policy with a model (a policy without "
        "one is named in a warning), plus the /safeserve admin routes; the policy's "
        "on_invalid decides what a body that fails its schema gets (reject: 422, fallback: the "
        "fallbacks, flag: the model). Exits 1 when the file has problems (printed as "
        "FILE: PATH: MESSAGE, as check does), 2 when it cannot be read, names no model, or the "
        "address cannot be used.",
    )
    serve.add_argument("policies", metavar="POLICIES", help="a .yaml/.yml/.toml policies file")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="port to listen on, 0-65535 (default: %(default)s)"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (default: %(default)s)"
    )
    serve.add_argument(
        "--admin-token",
        default=None,
        help="bearer token for the breaker routes (else $SAFESERVE_ADMIN_TOKEN; none: refused)",
    )
    serve.add_argument(
        "--allow-module",
        action="append",
        default=None,
        metavar="PREFIX",
        help="only let import paths name modules starting with PREFIX (repeatable)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        metavar="N",
        help="refuse predict bodies over N bytes with 413 (default: 1048576)",
    )
    serve.set_defaults(handler=_serve)
    serve.error = _one_line_error  # type: ignore[method-assign]  # "serve: ..." as for the rest
    for command in commands.choices.values():  # each reports unknown options in its own words
        command.set_defaults(parser=command)
    return parser


def _one_line_error(message: str) -> NoReturn:
    """`safeserve serve`'s bad options, one line as its other refusals (argparse prints usage)."""
    print(f"safeserve serve: {message} (see safeserve serve --help)", file=sys.stderr)
    sys.exit(2)


def _serve(args: argparse.Namespace) -> int:
    try:
        from safeserve.serve import MAX_BODY_BYTES, serve
    except ImportError as exc:
        print(f"safeserve serve needs the fastapi extra: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"safeserve serve: --port must be 0-65535, not {args.port}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"safeserve serve: --workers must be 1 or more, not {args.workers}", file=sys.stderr)
        return 2
    max_body = MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes
    if max_body < 1:
        print(
            f"safeserve serve: --max-body-bytes must be 1 or more, not {max_body}", file=sys.stderr
        )
        return 2
    if os.getcwd() not in sys.path:  # import paths in the file resolve from here, as in `check`
        sys.path.insert(0, os.getcwd())
    token = args.admin_token or os.environ.get("SAFESERVE_ADMIN_TOKEN") or None
    return serve(
        args.policies,
        args.host,
        args.port,
        args.workers,
        token,
        allowed_modules=args.allow_module,
        max_body_bytes=max_body,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `safeserve` command with `argv` (default: the process's) and return its exit code."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the parser whose part of the line they are on, in its words
            given = list(sys.argv[1:] if argv is None else argv)
            before = given[: given.index(args.command)] if args.command in given else given
            early = [u for u in unknown if u in before]
            if early:
                parser.error(f"unrecognized arguments: {' '.join(early)}")
            getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
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
