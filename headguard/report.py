"""Reports of check results: a text table for people, JSON for scripts, JUnit XML for CI dashboards. Each shows
every distinct failure of a check (`CheckResult.failures`), with its own example."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence

from headguard import plots
from headguard.runner import STATUSES, CheckResult

JSON_SCHEMA_VERSION = 1
_LABELS = {"passed": "passed", "failed": "FAILED", "xfailed": "xfailed", "skipped": "skipped", "error": "ERROR"}


def by_target(results: Iterable[CheckResult]) -> dict[str, list[CheckResult]]:
    grouped: dict[str, list[CheckResult]] = {}
    for result in results:
        grouped.setdefault(result.target, []).append(result)
    return grouped


def counts(results: Iterable[CheckResult]) -> dict[str, int]:
    tally = dict.fromkeys(STATUSES, 0)
    for result in results:
        tally[result.status] += 1
    return tally


def summary_line(results: Sequence[CheckResult], *, elapsed_s: float | None = None) -> str:
    parts = [f"{n} {status}" for status, n in counts(results).items() if n]
    tail = f" in {elapsed_s:.2f}s" if elapsed_s is not None else ""  # as the table: one quick check is not "0.0s"
    return (", ".join(parts) or "no checks ran") + tail


def format_table(results: Sequence[CheckResult], subjects: Mapping[str, str] | None = None) -> str:
    """One block per target, headed by what it was checked with (`subjects`: target -> description, such as its
    layout and loss): status, check name and duration of each check."""
    lines = []
    for target, rows in by_target(results).items():
        width = max(len(r.name) for r in rows)
        described = f"; {subjects[target]}" if subjects and target in subjects else ""
        lines.append(f"{target}  ({len(rows)} check{'' if len(rows) == 1 else 's'}{described})")
        lines.extend(f"  {_LABELS[r.status]:<8} {r.name:<{width}}  {r.duration_s:7.2f}s" for r in rows)
        lines.append("")
    return "\n".join(lines)


def format_failure(result: CheckResult, *, title: bool = True) -> str:
    """What the head's author needs: the property, what broke, on which input, and how to run it again; every
    distinct failure with its own example. Without `title` (pytest prints its own), the message comes first, so
    pytest's one-line summary shows it."""
    several = result.failures if len(result.failures) > 1 else []
    if title:
        lines = [f"{_LABELS[result.status]} {result.target}::{result.name}"]
    else:
        lines = [f"{len(several)} distinct failures, the first: {several[0].message}" if several else result.message]
    if result.doc:
        lines.append(f"  property: {result.doc}")
    if title and not several:
        lines.append(_field("message", result.message))
    if result.where:
        lines.append(f"  where:    {result.where}")
    for i, failure in enumerate(several, 1):
        lines.append(_field(f"failure {i} of {len(several)}", failure.message))
        if failure.example:
            lines.append(textwrap.indent(_field("example", failure.example), "  "))
    if result.example and not several:
        lines.append(_field("example", result.example))
    if result.reproduce:
        lines.append(_field("reproduce", result.reproduce))
    for note in result.notes:
        lines.append(_field("note", note))
    for path in result.artifacts:
        lines.append(_field("plot", path))
    return "\n".join(lines)


def _field(label: str, text: str) -> str:
    body = text.strip().splitlines() or [""]
    if len(body) == 1:
        return f"  {label + ':':<9} {body[0]}"
    return f"  {label}:\n" + textwrap.indent("\n".join(body), "      ")


def format_report(
    results: Sequence[CheckResult],
    *,
    profile: str,
    seed: int,
    elapsed_s: float | None = None,
    setup_notes: Mapping[str, Sequence[str]] | None = None,
    subjects: Mapping[str, str] | None = None,
) -> str:
    """Table, then warnings (from setting the targets up, and checks that changed global state), every failure and
    error in full, then the summary line."""
    parts = [f"headguard: profile {profile}, seed {seed}", "", format_table(results, subjects)]
    warnings = [f"  {target}: {note}" for target, notes in (setup_notes or {}).items() for note in notes]
    warnings += [f"  {r.target}::{r.name}: {note}" for r in results if r.status not in ("failed", "error")
                 for note in r.notes]
    if warnings:
        parts += ["warnings:", *warnings, ""]
    bad = [r for r in results if r.status in ("failed", "error")]
    if bad:
        parts.append("=" * 30 + " failures " + "=" * 30)
        parts.extend(format_failure(r) + "\n" for r in bad)
    plotted = [f"  {r.target}::{r.name}: {path}" for r in results for path in r.artifacts]
    if plotted:
        parts += ["plots:", *plotted, ""]
    xfails = [r for r in results if r.status == "xfailed"]
    if xfails:
        parts.append("expected failures:")
        parts.extend(f"  {r.target}::{r.name}: {r.message.splitlines()[0]}" for r in xfails)
        parts.append("")
    parts.append(summary_line(results, elapsed_s=elapsed_s))
    return "\n".join(parts) + "\n"


def write_json(
    path: str | os.PathLike,
    results: Sequence[CheckResult],
    *,
    profile: str,
    seed: int,
    interrupted: bool = False,
    setup_notes: Mapping[str, Sequence[str]] | None = None,
    subjects: Mapping[str, str] | None = None,
) -> None:
    """`{"version", "profile", "seed", "interrupted", "summary", "subjects", "setup_notes", "results": [...]}`, one
    record per finished check (`CheckResult.to_record`: its `failures` list each distinct failure as `{"message",
    "example", "replay"}`); `interrupted` says the run was stopped before every check ran."""
    doc = {
        "version": JSON_SCHEMA_VERSION,
        "profile": profile,
        "seed": seed,
        "interrupted": interrupted,
        "summary": counts(results),
        "subjects": dict(subjects or {}),
        "setup_notes": {target: list(notes) for target, notes in (setup_notes or {}).items()},
        "results": [r.to_record() for r in results],
    }
    prepare_path(path)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")


def junit_tree(
    results: Sequence[CheckResult], *, profile: str, seed: int, subjects: Mapping[str, str] | None = None
) -> ET.ElementTree:
    """JUnit XML: a testsuite per target, a testcase per check; xfailed and skipped become <skipped>."""
    root = ET.Element("testsuites", name="headguard")
    for target, rows in by_target(results).items():
        tally = counts(rows)
        suite = ET.SubElement(root, "testsuite", {
            "name": target,
            "tests": str(len(rows)),
            "failures": str(tally["failed"]),
            "errors": str(tally["error"]),
            "skipped": str(tally["skipped"] + tally["xfailed"]),
            "time": f"{sum(r.duration_s for r in rows):.3f}",
        })
        props = ET.SubElement(suite, "properties")
        for key, value in (("profile", profile), ("seed", str(seed)), ("subject", (subjects or {}).get(target))):
            if value is not None:
                ET.SubElement(props, "property", name=key, value=value)
        for r in rows:
            case = ET.SubElement(suite, "testcase", classname=target, name=r.name, time=f"{r.duration_s:.3f}")
            if r.artifacts:
                case_props = ET.SubElement(case, "properties")
                for path in r.artifacts:
                    ET.SubElement(case_props, "property", name="plot", value=path)
            if r.status == "failed":
                ET.SubElement(case, "failure", message=r.message, type="CheckFailure").text = format_failure(r)
            elif r.status == "error":
                ET.SubElement(case, "error", message=r.message, type="error").text = format_failure(r)
            elif r.status == "skipped":
                ET.SubElement(case, "skipped", message=r.message, type="skipped")
            elif r.status == "xfailed":
                ET.SubElement(case, "skipped", message=r.message, type="xfailed")
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(
    path: str | os.PathLike, results: Sequence[CheckResult], *, profile: str, seed: int,
    subjects: Mapping[str, str] | None = None,
) -> None:
    prepare_path(path)
    tree = junit_tree(results, profile=profile, seed=seed, subjects=subjects)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def write_plots(directory: str | os.PathLike, results: Sequence[CheckResult]) -> list[str]:
    """Draw every series the checks recorded as a PNG in `directory` (one file per target, check and series) and
    add each path to its result's `artifacts`, so the text, JSON and JUnit reports name it. Returns the paths."""
    written = []
    for r in results:
        for name, curves in r.series.items():
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{r.target}-{r.name}-{name}")
            path = plots.write_curves(pathlib.Path(directory) / f"{stem}.png", curves, title=f"{r.target}: {name}",
                                      log_scale=[k for k, v in curves.items() if _positive(v)])
            r.artifacts.append(str(path))
            written.append(str(path))
    return written


def _positive(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and all(v > 0 for v in finite) and max(finite) > 10 * min(finite)


def prepare_path(path: str | os.PathLike) -> None:
    """CI writes reports into fresh directories (reports/junit.xml): create them rather than fail after the run."""
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
