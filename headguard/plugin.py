"""The pytest plugin (entry point `pytest11`): markers, Hypothesis profiles, `--headguard TARGET`."""

from __future__ import annotations

import pytest

import headguard.profiles  # noqa: F401  (registers dev, ci and fuzz before Hypothesis reads --hypothesis-profile)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped (not passed) without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (marked cuda); none is available here")
