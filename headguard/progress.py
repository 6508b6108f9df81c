"""Progress while checks run: a live line on terminals (plain ANSI, no dependency); when output is piped or under
CI, plain lines on stderr, one as each target starts and one for each failure, so a slow run is never silent."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from headguard.registry import Check
from headguard.runner import CheckResult
from headguard.subject import Subject

_COLOURS = {"passed": "32", "xfailed": "33", "skipped": "33", "failed": "31", "error": "31"}
_MARKS = {"passed": ".", "xfailed": "x", "skipped": "s", "failed": "F", "error": "E"}


def wants_live(stream: TextIO) -> bool:
    """Live only on an interactive terminal outside CI (CI logs keep every carriage return as a new line)."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


class Progress:
    """`on_start`/`on_finish` callbacks for the runner: live, a transient "running ..." line, and a permanent line
    for each failure or error as soon as it is known; otherwise plain lines on `plain_stream` (stderr)."""

    def __init__(self, total: int, *, stream: TextIO | None = None, live: bool | None = None,
                 plain_stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.live = wants_live(self.stream) if live is None else live
        self.plain_stream = plain_stream
        self.total = total
        self.done = 0

    def on_target(self, subject: Subject, count: int) -> None:
        if not self.live:
            self._plain(f"headguard: checking {subject.name} ({count} check{'' if count == 1 else 's'})")

    def _plain(self, line: str) -> None:
        stream = self.plain_stream if self.plain_stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def on_start(self, subject: Subject, check: Check) -> None:
        if self.live:
            self._write(f"\r\x1b[K[{self.done + 1}/{self.total}] {subject.name} {check.name} ...")

    def on_finish(self, result: CheckResult) -> None:
        self.done += 1
        if not self.live:
            if result.status in ("failed", "error"):
                summary = result.message.splitlines()[0] if result.message else ""
                self._plain(f"headguard: {result.status.upper()} {result.target}::{result.name}: {summary}")
            return
        mark = f"\x1b[{_COLOURS[result.status]}m{_MARKS[result.status]}\x1b[0m"
        self._write(f"\r\x1b[K[{self.done}/{self.total}] {mark} {result.target} {result.name} "
                    f"({result.duration_s:.2f}s)")
        if result.status in ("failed", "error"):
            self._write(f"  {result.status.upper()}: {result.message.splitlines()[0] if result.message else ''}\n")

    def close(self) -> None:
        if self.live:
            self._write("\r\x1b[K")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
