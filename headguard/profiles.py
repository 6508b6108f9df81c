"""Hypothesis profiles shared by the CLI, the pytest plugin and our own test suite."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

PROFILES = ("dev", "ci", "fuzz")
_SLOW_INPUTS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors]

settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=_SLOW_INPUTS)
settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=_SLOW_INPUTS,
)
settings.register_profile("fuzz", max_examples=1000, deadline=None, suppress_health_check=_SLOW_INPUTS)


# Seconds one check may run before it is reported as hung (`--timeout` and HeadSpec(timeout=...) override). A
# reference check takes under 7 s in `dev`/`ci` on a 2-core CPU; `fuzz` draws 50-100 times as many examples.
TIME_LIMITS_S = {"dev": 120.0, "ci": 120.0, "fuzz": 1800.0}


def load(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"Expected a Hypothesis profile in {PROFILES}, got profile={profile!r}")
    settings.load_profile(profile)
