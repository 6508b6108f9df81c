"""Root conftest: our own suite uses headguard's Hypothesis profiles (choose one with --hypothesis-profile; without
one, `headguard-dev`, not Hypothesis' `default` with its 200 ms deadline, which the checks' runs would exceed)."""

import headguard.profiles


def pytest_configure(config):
    if config.getoption("hypothesis_profile", None) is None:
        headguard.profiles.load("headguard-dev")
