"""Fixtures for testing the harness: a fake catalogue and an importable fake target module."""

from __future__ import annotations

import sys

import pytest

from headguard.runner import using_catalogue

from . import _fakes

TARGET = "tinyheads"


@pytest.fixture
def fake_catalogue():
    """The fake checks instead of the real catalogue, for the duration of one test."""
    with using_catalogue(_fakes.CATALOGUE) as table:
        yield table


@pytest.fixture
def target_dir(tmp_path, monkeypatch):
    """A directory holding `tinyheads.py` (a working target module) and `brokenmod.py` (raises on import), made the
    current directory; sys.path and the imported modules are restored afterwards."""
    (tmp_path / f"{TARGET}.py").write_text(_fakes.TARGET_MODULE)
    (tmp_path / "brokenmod.py").write_text(_fakes.BROKEN_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in (TARGET, "brokenmod"):
        sys.modules.pop(name, None)
