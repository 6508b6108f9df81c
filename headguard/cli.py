"""`headguard check [TARGET ...]`: run the check catalogue on heads and report; `headguard fuzz TARGET ...
--minutes N`: run it round-robin with fresh seeds until the time is spent; `headguard list`.

Exit status: 0 when every check that ran passed (expected failures allowed); 1 when a check failed or errored; 2 for
usage and import errors (one line on stderr); 5 when nothing was checked (no selected check applies, everything was
deselected or skipped), as pytest's "no tests ran"; 130 when interrupted (Ctrl-C), after writing the reports of the
checks that finished."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from headguard import engine, plots, report
from headguard.database import DEFAULT_DIRECTORY, DatabaseError, open_database
from headguard.fuzz import Run, format_summary, fuzz
from headguard.profiles import CHOICES, TIME_LIMITS_S
from headguard.progress import Progress
from headguard.regressions import Found, write_regressions
from headguard.runner import (
    UnknownCheckError, known_checks, not_applicable, run_checks, select_checks, validate_names,
)
from headguard.targets import REFERENCE_TARGETS, TargetError, resolve_target

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING_CHECKED, EXIT_INTERRUPTED = 0, 1, 2, 5, 130


def add_run_options(addoption: Callable[..., Any], *, prefix: str = "", profile: str = "headguard-dev") -> None:
    """The options shared by `headguard check`/`fuzz` (prefix "") and `pytest` (prefix "headguard-"), declared
    once. `addoption` is `argparse.ArgumentParser.add_argument` or pytest's `OptionGroup.addoption`."""
    addoption(f"--{prefix}profile", choices=CHOICES, default=profile,
              help="Hypothesis profile for the checks: headguard-dev (quick), headguard-ci (derandomized), "
                   "headguard-fuzz (many examples); dev, ci and fuzz are short for them; default: %(default)s")
    addoption(f"--{prefix}seed", type=int, default=0, metavar="N",
              help="seed for building each head (its initial weights) and for the checks' generators, shown in every "
                   "reproduce command; default: %(default)s")
    addoption(f"--{prefix}timeout", type=_positive_seconds, default=None, metavar="SECONDS",
              help="time limit of each check; a check past it fails, naming where it was stuck; default: the "
                   "HeadSpec's timeout, else the profile's (" + ", ".join(
                       f"{name} {int(limit)} s" for name, limit in TIME_LIMITS_S.items()) + ")")
    addoption(f"--{prefix}database", default=None, metavar="DIR|URL|none",
              help="the example database, replayed first on the next run: a directory, a Redis URL "
                   "(redis://host:port/N, shared by CI workers) or none; default: "
                   f"{DEFAULT_DIRECTORY} for a randomised profile, none for headguard-ci")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


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
    _add_selection_options(check)
    check.add_argument("--json", metavar="PATH", help="write one JSON record per check to PATH")
    check.add_argument("--junit", metavar="PATH", help="write JUnit XML (a testsuite per target) to PATH")
    check.add_argument("--plots", metavar="DIR",
                       help="draw the curves checks record (the training canary's loss items, gradient norm and "
                            "BatchNorm range per step) as PNG files in DIR; the reports name them (needs matplotlib: "
                            f"{plots.INSTALL_HINT})")
    check.add_argument("-x", "--exitfirst", action="store_true", help="stop after the first failed check")
    _add_regressions_option(check)
    check.set_defaults(func=_cmd_check)

    fuzzing = sub.add_parser("fuzz", help="run the checks round-robin with fresh seeds until a time budget is spent",
                             description="Run the checks on each TARGET round-robin, each run with a fresh seed, "
                                         "under the fuzz profile and the example database, until the budget is "
                                         "spent; then print a summary.")
    fuzzing.add_argument("targets", nargs="+", metavar="TARGET", help="module:attr, imported from the current "
                                                                       "directory")
    budget = fuzzing.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=_positive_seconds, metavar="N", help="the time budget in minutes")
    budget.add_argument("--seconds", type=_positive_seconds, metavar="N", help="the time budget in seconds")
    add_run_options(fuzzing.add_argument, profile="headguard-fuzz")
    _add_selection_options(fuzzing)
    _add_regressions_option(fuzzing)
    fuzzing.set_defaults(func=_cmd_fuzz)

    listing = sub.add_parser("list", help="list the checks in the catalogue")
    listing.set_defaults(func=_cmd_list)
    return parser


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--select", action="extend", nargs="+", default=[], metavar="CHECK",
                        help="run only these checks (names or comma-separated lists; put TARGETs before this option)")
    parser.add_argument("--deselect", action="extend", nargs="+", default=[], metavar="CHECK",
                        help="skip these checks")


def _add_regressions_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save-regressions", metavar="DIR",
                        help="write each failure as a pytest file in DIR that replays its input: it fails while the "
                             "bug is there and passes once it is fixed")


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


_USAGE_ERRORS = (TargetError, UnknownCheckError, DatabaseError, plots.PlotsUnavailableError)


def _prepare(args: argparse.Namespace, targets: Sequence[str]) -> tuple[list, Any]:
    """Validate the options and load the targets: (subjects, example database). Raises one of `_USAGE_ERRORS` or
    `_UnwritableReport`, whose text is the one line the CLI prints."""
    for name in _names(args.select):
        if ":" in name:
            raise TargetError(f"{name!r} after --select looks like a TARGET; put TARGETs before --select")
    validate_names(_names(args.select), where="--select")
    validate_names(_names(args.deselect), where="--deselect")
    for option, path in (("--json", getattr(args, "json", None)), ("--junit", getattr(args, "junit", None))):
        if path:
            _check_writable(option, path)
    if getattr(args, "plots", None):
        _check_plots_dir(args.plots)
    if args.save_regressions:
        _check_directory("--save-regressions", args.save_regressions)
    database = open_database(args.database, profile=args.profile)
    subjects = [resolve_target(t, seed=args.seed, timeout=args.timeout) for t in targets]
    for subject in subjects:
        validate_names(subject.expected_failures, where=f"the expected_failures of {subject.name}")
    return subjects, database


def _cmd_check(args: argparse.Namespace) -> int:
    select, deselect = _names(args.select), _names(args.deselect)
    try:
        subjects, database = _prepare(args, args.targets or list(REFERENCE_TARGETS))
    except (*_USAGE_ERRORS, _UnwritableReport) as exc:
        return _usage_error(str(exc))
    except KeyboardInterrupt:
        print("headguard: interrupted while loading the targets; nothing was checked", file=sys.stderr)
        return EXIT_INTERRUPTED

    plan = [(s, select_checks(s, select=select, deselect=deselect)) for s in subjects]
    progress = Progress(sum(len(checks) for _, checks in plan))
    results: list = []

    def finished(result) -> None:
        results.append(result)
        progress.on_finish(result)

    start = time.perf_counter()
    interrupted = False
    try:
        for subject, checks in plan:
            progress.on_target(subject, len(checks))
            for result in not_applicable(subject, select=select):
                finished(result)
            with engine.options(database=database):
                run_checks(subject, checks, profile=args.profile, seed=args.seed, timeout=args.timeout,
                           exitfirst=args.exitfirst, on_start=progress.on_start, on_finish=finished)
            if args.exitfirst and any(r.status in ("failed", "error") for r in results):
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
    elapsed = time.perf_counter() - start

    if args.plots:
        report.write_plots(args.plots, results)
    notes = {s.name: s.setup_notes for s in subjects if s.setup_notes}
    run = dict(profile=args.profile, seed=args.seed, subjects={s.name: s.description for s in subjects})
    sys.stdout.write(report.format_report(results, elapsed_s=elapsed, setup_notes=notes, **run))
    if args.json:
        report.write_json(args.json, results, interrupted=interrupted, setup_notes=notes, **run)
    if args.junit:
        report.write_junit(args.junit, results, **run)
    if args.save_regressions:
        _save_regressions(args, [Found(r, args.seed, args.seed, args.profile) for r in results])
    return _exit_status(results, interrupted=interrupted)


def _save_regressions(args: argparse.Namespace, found: Sequence[Found]) -> None:
    for path in write_regressions(args.save_regressions, found):
        print(f"headguard: wrote regression test {path}", file=sys.stderr)


def _cmd_fuzz(args: argparse.Namespace) -> int:
    budget_s = args.seconds if args.seconds is not None else args.minutes * 60.0
    if args.database is None:  # the fuzz run's memory is the point: on even under a derandomized profile
        args.database = DEFAULT_DIRECTORY
    try:
        subjects, database = _prepare(args, args.targets)
    except (*_USAGE_ERRORS, _UnwritableReport) as exc:
        return _usage_error(str(exc))
    except KeyboardInterrupt:
        print("headguard: interrupted while loading the targets; nothing was fuzzed", file=sys.stderr)
        return EXIT_INTERRUPTED
    plan = [(s, select_checks(s, select=_names(args.select), deselect=_names(args.deselect))) for s in subjects]
    print(f"headguard fuzz: {sum(len(c) for _, c in plan)} checks for {budget_s:g}s, profile {args.profile}, seeds "
          f"from {args.seed}, database {database!r}", file=sys.stderr)
    summary = fuzz(plan, budget_s=budget_s, profile=args.profile, seed=args.seed, timeout=args.timeout,
                   database=database, on_finish=_fuzz_progress(time.monotonic()))
    failed = [run.result for run in summary.failed]
    if failed:
        sys.stdout.write("=" * 30 + " failures " + "=" * 30 + "\n")
        sys.stdout.write("".join(report.format_failure(r) + "\n\n" for r in failed))
    sys.stdout.write(format_summary(summary))
    if args.save_regressions:
        _save_regressions(args, [Found(run.result, run.seed, args.seed, args.profile) for run in summary.failed])
    if summary.interrupted:
        print("headguard: fuzzing interrupted: summarised the runs that finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_OK


def _fuzz_progress(start: float) -> Callable[[Run], None]:
    def show(run: Run) -> None:
        r = run.result
        print(f"[{time.monotonic() - start:7.1f}s] round {run.round} seed {run.seed} {r.target}::{r.name}: "
              f"{r.status}, {run.examples} examples, {r.duration_s:.1f}s", file=sys.stderr, flush=True)

    return show


def _exit_status(results: Sequence, *, interrupted: bool) -> int:
    if interrupted:
        print(f"headguard: interrupted: reported the {len(results)} checks that finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    if any(r.status in ("failed", "error") for r in results):
        return EXIT_FAILED
    if not any(r.status in ("passed", "xfailed") for r in results):
        print("headguard: nothing was checked: no selected check applies to the targets, or every one was skipped "
              f"(exit {EXIT_NOTHING_CHECKED}, as pytest's 'no tests ran')", file=sys.stderr)
        return EXIT_NOTHING_CHECKED
    return EXIT_OK


class _UnwritableReport(Exception):
    pass


def _check_plots_dir(directory: str) -> None:
    """--plots needs matplotlib and a directory it can write: refuse before the run, not after it."""
    plots.require_matplotlib()
    _check_directory("--plots", directory)


def _check_directory(option: str, directory: str) -> None:
    target = pathlib.Path(directory)
    if target.exists() and not target.is_dir():
        raise _UnwritableReport(f"cannot write {option} {directory}: not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _UnwritableReport(f"cannot write {option} {directory}: {exc.strerror or exc}") from None
    if not os.access(target, os.W_OK):
        raise _UnwritableReport(f"cannot write {option} {directory}: Permission denied")


def _check_writable(option: str, path: str) -> None:
    """Refuse a report path before the run, not with a traceback after it (a fuzz run takes minutes). Nothing is
    created here: an empty report file left by a run that never wrote it would read as a report."""
    target = pathlib.Path(path)
    try:
        report.prepare_path(path)
    except OSError as exc:
        raise _UnwritableReport(f"cannot write {option} {path}: {exc.strerror or exc}") from None
    if target.is_dir():
        raise _UnwritableReport(f"cannot write {option} {path}: Is a directory")
    writable = os.access(target, os.W_OK) if target.exists() else os.access(target.parent, os.W_OK)
    if not writable:
        raise _UnwritableReport(f"cannot write {option} {path}: Permission denied")


def _cmd_list(args: argparse.Namespace) -> int:
    checks = list(known_checks().values())
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        needs = f" [needs {', '.join(sorted(c.requires))}]" if c.requires else ""
        print(f"{c.name:<{width}}  {c.area:<10} {c.doc}{needs}")
        print(f"{'':<{width}}  draws: {c.draws}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
