"""headguard's Hypothesis profiles do not depend on the machine: Hypothesis makes its own derandomized `ci` profile
current wherever a CI variable is set, and our randomised profiles must not inherit it (CI once failed on this)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT_PROFILES = """
from hypothesis import settings
from headguard import profiles
from headguard.database import open_database
for name in profiles.PROFILES:
    s = settings.get_profile(name)
    print(name, s.derandomize, s.max_examples, open_database(None, profile=name) is not None)
"""


@pytest.mark.parametrize("ci", [None, "true"])
def test_profiles_are_the_same_with_and_without_a_ci_variable(ci):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD")}
    if ci is not None:
        env["CI"] = ci
    out = subprocess.run([sys.executable, "-c", PRINT_PROFILES], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == [
        "headguard-dev False 20 True",
        "headguard-ci True 10 False",
        "headguard-fuzz False 1000 True",
    ]


def test_a_costly_propertys_count_scales_with_the_profile():
    from headguard.properties import scaled_count

    assert [scaled_count(3, n) for n in (10, 20, 1000)] == [3, 6, 300]  # ci, dev, fuzz
    assert scaled_count(1, 1) == 1 and scaled_count(30, 10) == 10  # at least 1, never above the profile's own
