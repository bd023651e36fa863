"""The `safeserve` command line; each subcommand's work lives in its own module."""

from __future__ import annotations

import argparse
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
    from safeserve.baseline_cli import add_baseline_parser

    add_baseline_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `safeserve` command with `argv` (default: the process's) and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) become return codes
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 2
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
