"""Wall-clock seconds of the main job, `headguard check --profile ci` on the reference heads, end to end.

    python benchmarks/check_wallclock.py [-n 3] [--profile ci] [-- extra headguard check arguments]

Each run is a fresh process (imports included), as CI runs it. Prints one line per run and the median; the target is
at most 60 s on a 2-core CPU. Exit status 0 when the median meets the target and every run exited 0 or 1 (a check
failing is the checks' business, not a timing problem), else 1.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

from headguard import profiles

TARGET_S = 60.0


def command(profile: str, extra: list[str]) -> list[str]:
    script = shutil.which("headguard")
    base = [script] if script else [sys.executable, "-m", "headguard.cli"]
    return [*base, "check", "--profile", profile, *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=3)
    parser.add_argument("--profile", default="headguard-ci", choices=profiles.CHOICES)
    parser.add_argument("extra", nargs="*", help="passed to headguard check (after --)")
    args = parser.parse_args(argv)

    cmd = command(args.profile, args.extra)
    print("command:", " ".join(cmd))
    seconds, codes = [], []
    for i in range(1, args.runs + 1):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        codes.append(proc.returncode)
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"run {i}: {seconds[-1]:6.1f} s  exit {proc.returncode}  {summary}")
        if proc.returncode == 2:
            print(proc.stderr.strip(), file=sys.stderr)
    median = statistics.median(seconds)
    ok = median <= TARGET_S and all(code in (0, 1) for code in codes)
    print(f"median {median:.1f} s over {args.runs} runs (min {min(seconds):.1f}, max {max(seconds):.1f}); "
          f"target <= {TARGET_S:.0f} s: {'met' if median <= TARGET_S else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
