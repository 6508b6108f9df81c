"""`headguard check [TARGET ...]`: run the check catalogue on heads and report. Exit 0 when every check passed
(expected failures allowed), 1 when a check failed or errored, 2 for usage and import errors (one line on stderr)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from headguard import report
from headguard.profiles import PROFILES
from headguard.progress import Progress
from headguard.runner import (
    UnknownCheckError, known_checks, not_applicable, run_checks, select_checks, validate_names,
)
from headguard.targets import REFERENCE_TARGETS, TargetError, resolve_target

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_run_options(addoption: Callable[..., Any], *, prefix: str = "") -> None:
    """The options shared by `headguard check` (prefix "") and `pytest` (prefix "headguard-"), declared once.
    `addoption` is `argparse.ArgumentParser.add_argument` or pytest's `OptionGroup.addoption`."""
    addoption(f"--{prefix}profile", choices=PROFILES, default="dev",
              help="Hypothesis profile for the checks: dev (quick), ci (derandomized), fuzz (many examples); "
                   "default: %(default)s")
    addoption(f"--{prefix}seed", type=int, default=0, metavar="N",
              help="seed for torch and the checks' generators, shown in every reproduce command; default: %(default)s")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, not argparse's usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="headguard", description="Property-based checks for object-detector heads.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser("check", help="run the check catalogue on heads",
                           description="Run the check catalogue on each TARGET (module:attr, a head class or a "
                                       "headguard.HeadSpec); without TARGET, on the reference heads "
                                       "heads:Detect and heads:Polygon.")
    check.add_argument("targets", nargs="*", metavar="TARGET", help="module:attr, imported from the current directory")
    add_run_options(check.add_argument)
    check.add_argument("--select", action="extend", nargs="+", default=[], metavar="CHECK",
                       help="run only these checks (names or comma-separated lists; put TARGETs before this option)")
    check.add_argument("--deselect", action="extend", nargs="+", default=[], metavar="CHECK",
                       help="skip these checks")
    check.add_argument("--json", metavar="PATH", help="write one JSON record per check to PATH")
    check.add_argument("--junit", metavar="PATH", help="write JUnit XML (a testsuite per target) to PATH")
    check.add_argument("-x", "--exitfirst", action="store_true", help="stop after the first failed check")
    check.set_defaults(func=_cmd_check)

    listing = sub.add_parser("list", help="list the checks in the catalogue")
    listing.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `headguard` console script; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except BrokenPipeError:  # `headguard list | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # keep the interpreter's final flush from raising again
        return 0


def _usage_error(message: str) -> int:
    print(f"headguard: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _names(values: Sequence[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _cmd_check(args: argparse.Namespace) -> int:
    select, deselect = _names(args.select), _names(args.deselect)
    targets = args.targets or list(REFERENCE_TARGETS)
    try:
        for name in select:
            if ":" in name:
                raise TargetError(f"{name!r} after --select looks like a TARGET; put TARGETs before --select")
        validate_names(select, where="--select")
        validate_names(deselect, where="--deselect")
        subjects = [resolve_target(t) for t in targets]
        for subject in subjects:
            validate_names(subject.expected_failures, where=f"the expected_failures of {subject.name}")
        for option, path in (("--json", args.json), ("--junit", args.junit)):
            if path:
                _check_writable(option, path)
    except (TargetError, UnknownCheckError, _UnwritableReport) as exc:
        return _usage_error(str(exc))

    plan = [(s, select_checks(s, select=select, deselect=deselect)) for s in subjects]
    progress = Progress(sum(len(checks) for _, checks in plan))
    results = []
    start = time.perf_counter()
    try:
        for subject, checks in plan:
            results += not_applicable(subject, select=select)
            results += run_checks(subject, checks, profile=args.profile, seed=args.seed, exitfirst=args.exitfirst,
                                  on_start=progress.on_start, on_finish=progress.on_finish)
            if args.exitfirst and any(r.status in ("failed", "error") for r in results):
                break
    finally:
        progress.close()
    elapsed = time.perf_counter() - start

    sys.stdout.write(report.format_report(results, profile=args.profile, seed=args.seed, elapsed_s=elapsed))
    if args.json:
        report.write_json(args.json, results, profile=args.profile, seed=args.seed)
    if args.junit:
        report.write_junit(args.junit, results, profile=args.profile, seed=args.seed)
    return EXIT_FAILED if any(r.status in ("failed", "error") for r in results) else EXIT_OK


class _UnwritableReport(Exception):
    pass


def _check_writable(option: str, path: str) -> None:
    """Refuse a report path before the run, not with a traceback after it (a fuzz run takes minutes)."""
    try:
        report.prepare_path(path)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise _UnwritableReport(f"cannot write {option} {path}: {exc.strerror or exc}") from None


def _cmd_list(args: argparse.Namespace) -> int:
    checks = list(known_checks().values())
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        needs = f" [needs {', '.join(sorted(c.requires))}]" if c.requires else ""
        print(f"{c.name:<{width}}  {c.area:<10} {c.doc}{needs}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
