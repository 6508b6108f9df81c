"""Seconds from a mutant head's checks starting to its first failed verdict, per real bug.

    python benchmarks/time_to_verdict.py [--profile ci] [--seed 0]

For each mutant spec `R0_SPEC`, `R1_SPEC`, ... in tests/mutants.py (bugs R0, R1, R2, R4, R5, R7, R8, R9, R10 of
/work/shared/bugs/README.md) the catalogue runs in its usual order, exactly as `headguard check` would, and stops at
the first failed check. The time counts from the start of the first check to the end of the first failed one (the
one-off subject build is shown separately). Target: at most 10 s each on a 2-core CPU. Exit status 0 when every
mutant met it.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUGS = ("R0", "R1", "R2", "R4", "R5", "R7", "R8", "R9", "R10")
TARGET_S = 10.0


def load_mutants():
    """tests/mutants.py as the module `mutants` (its spec names read `mutants:R0_SPEC`), or None with the reason."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    path = ROOT / "tests" / "mutants.py"
    if not path.exists():
        return None, f"{path} does not exist"
    spec = importlib.util.spec_from_file_location("mutants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001  (report why, rather than crash the benchmark)
        return None, f"importing {path} raised {type(exc).__name__}: {exc}"
    return module, ""


def time_one(spec, name: str, *, profile: str, seed: int) -> tuple[str, float | None, float, str]:
    """(first failed check or a note, seconds to it or None, build seconds, statuses before it)."""
    from headguard.runner import run_checks, select_checks
    from headguard.targets import subject_from

    start = time.perf_counter()
    subject = subject_from(spec, name=name)
    built = time.perf_counter() - start
    results = run_checks(subject, select_checks(subject.capabilities), profile=profile, seed=seed, exitfirst=True)
    failed = [r for r in results if r.status in ("failed", "error")]
    if not failed:
        return "no check failed", None, built, f"{len(results)} checks ran"
    first = failed[0]
    return (f"{first.name} ({first.status})", first.finished_at - results[0].started_at, built,
            f"{len(results) - 1} checks before it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci", choices=("dev", "ci", "fuzz"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mutants, why = load_mutants()
    if mutants is None:
        print(f"cannot time anything: {why}")
        return 1
    print(f"profile {args.profile}, seed {args.seed}; target <= {TARGET_S:.0f} s to the first failed verdict")
    print(f"{'bug':<4} {'seconds':>8} {'build s':>8}  first failed check")
    all_met = True
    for bug in BUGS:
        spec = getattr(mutants, f"{bug}_SPEC", None)
        if spec is None:
            print(f"{bug:<4} {'-':>8} {'-':>8}  (tests/mutants.py has no {bug}_SPEC)")
            all_met = False
            continue
        verdict, seconds, built, context = time_one(spec, f"mutants:{bug}_SPEC", profile=args.profile, seed=args.seed)
        met = seconds is not None and seconds <= TARGET_S
        all_met &= met
        shown = f"{seconds:8.2f}" if seconds is not None else f"{'never':>8}"
        print(f"{bug:<4} {shown} {built:8.2f}  {verdict}; {context}{'' if met else '  <- MISSED'}")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
