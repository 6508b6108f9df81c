"""Seconds from a mutant head's checks starting to the verdict that catches its bug, per real bug.

    python benchmarks/time_to_verdict.py [--profile ci] [--seed 0]

For each mutant spec `R0_SPEC`, `R1_SPEC`, ... in tests/mutants.py (bugs R0, R1, R2, R4, R5, R7, R8, R9, R10 of
/work/shared/bugs/README.md) the catalogue runs in its usual order, exactly as `headguard check` would, until the
first check that fails on the mutant but not on the reference Polygon head (checks that fail or xfail on the reference
as well, such as R11's coverage check, say nothing about the mutant's bug; the first failure of any kind is shown too).
The time counts from the start of the first check to the end of that check (the one-off subject build is shown
separately). Target: at most 10 s each on a 2-core CPU. Exit status 0 when every mutant met it.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

from headguard import profiles

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


def reference_failures(*, profile: str, seed: int) -> set[str]:
    """Checks that fail, error or xfail on the reference Polygon head: they cannot tell a mutant's bug apart."""
    from headguard.runner import run_checks, select_checks
    from headguard.targets import resolve_target

    subject = resolve_target("heads:Polygon")
    results = run_checks(subject, select_checks(subject), profile=profile, seed=seed)
    return {r.name for r in results if r.status in ("failed", "error", "xfailed")}


def time_one(spec, name: str, *, baseline: set[str], profile: str, seed: int) -> dict:
    """The mutant's verdict: the first check failing on it and not on the reference, and its timing."""
    from headguard.runner import run_checks, select_checks
    from headguard.targets import subject_from

    start = time.perf_counter()
    subject = subject_from(spec, name=name)
    built = time.perf_counter() - start

    def caught(result) -> bool:
        return result.status in ("failed", "error") and result.name not in baseline

    results = run_checks(subject, select_checks(subject), profile=profile, seed=seed, stop_when=caught)
    first_any = next((r for r in results if r.status in ("failed", "error")), None)
    verdict = results[-1] if results and caught(results[-1]) else None
    return {
        "built": built,
        "seconds": verdict.finished_at - results[0].started_at if verdict else None,
        "check": f"{verdict.name} ({verdict.status})" if verdict else "no check caught it",
        "checks_before": len(results) - 1 if verdict else len(results),
        "first_any": (f"{first_any.name} after {first_any.finished_at - results[0].started_at:.2f} s"
                      if first_any else "-"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="headguard-ci", choices=profiles.CHOICES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mutants, why = load_mutants()
    if mutants is None:
        print(f"cannot time anything: {why}")
        return 1
    print(f"profile {args.profile}, seed {args.seed}; target <= {TARGET_S:.0f} s to the verdict")
    baseline = reference_failures(profile=args.profile, seed=args.seed)
    print(f"failing or xfailed on the reference heads:Polygon (not counted): {', '.join(sorted(baseline)) or '-'}")
    print(f"{'bug':<4} {'seconds':>8} {'build s':>8}  {'verdict (checks run before it)':<58} first failure of any kind")
    all_met = True
    for bug in BUGS:
        spec = getattr(mutants, f"{bug}_SPEC", None)
        if spec is None:
            print(f"{bug:<4} {'-':>8} {'-':>8}  (tests/mutants.py has no {bug}_SPEC)")
            all_met = False
            continue
        row = time_one(spec, f"mutants:{bug}_SPEC", baseline=baseline, profile=args.profile, seed=args.seed)
        met = row["seconds"] is not None and row["seconds"] <= TARGET_S
        all_met &= met
        shown = f"{row['seconds']:8.2f}" if row["seconds"] is not None else f"{'never':>8}"
        verdict = f"{row['check']} ({row['checks_before']})"
        print(f"{bug:<4} {shown} {row['built']:8.2f}  {verdict:<58} {row['first_any']}{'' if met else '  <- MISSED'}")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
