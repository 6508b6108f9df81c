"""Fixtures for testing the harness: a fake catalogue and an importable fake target module."""

from __future__ import annotations

import sys

import pytest
import torch

from headguard.runner import using_catalogue

from . import _fakes

TARGET = "tinyheads"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Our tensors are tiny: intra-op threads only add overhead (and, on a shared 2-core box, contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
