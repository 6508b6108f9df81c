"""A live progress line for terminals (plain ANSI, no dependency); silent when output is piped or under CI."""

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
    """`on_start`/`on_finish` callbacks for the runner: a transient "running ..." line, and a permanent line for each
    failure or error as soon as it is known. Does nothing when `live` is false."""

    def __init__(self, total: int, *, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.live = wants_live(self.stream) if live is None else live
        self.total = total
        self.done = 0

    def on_start(self, subject: Subject, check: Check) -> None:
        if self.live:
            self._write(f"\r\x1b[K[{self.done + 1}/{self.total}] {subject.name} {check.name} ...")

    def on_finish(self, result: CheckResult) -> None:
        self.done += 1
        if not self.live:
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
