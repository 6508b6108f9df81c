"""Ours vs Ultralytics: median time and peak memory ratios, from benchmark records or a pytest-benchmark JSON file.

Each side-by-side benchmark stores `extra_info["pair"]` (the workload, e.g. "loss-a") and `extra_info["impl"]`
("ultralytics" for the baseline, anything else for ours). Usage:

    python benchmarks/ratio_table.py benchmarks/results/nvidia-h200.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass

BASELINE = "ultralytics"
MIB = 2**20


@dataclass(frozen=True)
class Record:
    """One benchmark's result: its name, workload pair, implementation, median seconds and peak extra bytes."""

    name: str
    pair: str
    impl: str
    median_s: float
    peak_bytes: int | None


@dataclass(frozen=True)
class Row:
    ours: Record
    baseline: Record

    @property
    def time_ratio(self) -> float:
        """Ours / Ultralytics' median: below 1 is faster; the issue's target is <= 0.25."""
        return self.ours.median_s / self.baseline.median_s

    @property
    def memory_ratio(self) -> float | None:
        if self.ours.peak_bytes is None or not self.baseline.peak_bytes:
            return None
        return self.ours.peak_bytes / self.baseline.peak_bytes


def records_from_json(data: dict) -> list[Record]:
    """Records of the side-by-side benchmarks in a pytest-benchmark JSON document."""
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "pair" in info and "impl" in info:
            peak = info.get("peak_mem_over_inputs_bytes")
            out.append(Record(bench["fullname"], info["pair"], info["impl"], bench["stats"]["median"], peak))
    return out


def pair_rows(records: Iterable[Record]) -> list[Row]:
    """One row per (ours, baseline) of the same pair, in the order ours were recorded."""
    records = list(records)
    baselines = {r.pair: r for r in records if r.impl == BASELINE}
    return [Row(r, baselines[r.pair]) for r in records if r.impl != BASELINE and r.pair in baselines]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def format_rows(rows: list[Row], markdown: bool = False) -> str:
    """The ratio table as aligned text, or as a Markdown table."""
    head = ["workload", "ours", "ours ms", "Ultralytics ms", "ours/Ultralytics", "speed-up",
            "ours peak MiB", "Ultralytics peak MiB", "memory ratio"]
    body = []
    for row in rows:
        mem = row.memory_ratio
        body.append([
            row.ours.pair, row.ours.impl, f"{row.ours.median_s * 1e3:.2f}", f"{row.baseline.median_s * 1e3:.2f}",
            f"{row.time_ratio:.3f}", f"{1 / row.time_ratio:.1f}x", _mib(row.ours.peak_bytes),
            _mib(row.baseline.peak_bytes), "-" if mem is None else f"{mem:.2f}",
        ])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in [head, *body])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="a file written by pytest --benchmark-json")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    cuda = data.get("machine_info", {}).get("cuda", {})
    round_trip = cuda.get("autograd_round_trip_us")
    host = f"; host: autograd round trip {round_trip} us" if round_trip is not None else ""
    print(f"card: {cuda.get('gpu') or 'no GPU recorded'}{host}")
    print(format_rows(pair_rows(records_from_json(data)), markdown=args.markdown))


if __name__ == "__main__":
    main()
