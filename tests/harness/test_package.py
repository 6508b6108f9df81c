"""The package surface: `import headguard` stays light, and its lazily resolved names work."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import headguard
heavy = [m for m in ("hypothesis", "pytest", "headguard.checks", "headguard.runner", "heads", "losses")
         if m in sys.modules]
print(heavy)
print("check_loss_pure" in headguard.CATALOGUE, "check_loss_pure" in headguard.registry.CATALOGUE)
"""


def test_import_is_light_and_catalogue_is_filled_on_first_use():
    """One fresh interpreter (the test's own has imported everything already): nothing heavy on import, and
    `headguard.CATALOGUE` is the full registry, not the empty dict it is before the checks are imported."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True True"]


def test_the_declared_python_floor_is_the_one_ci_tests():
    """pyproject's requires-python is what the code needs (BaseExceptionGroup, add_note: 3.11) and what .ci/run
    builds its venv with, so the floor is the version under test, not a promise nobody checks."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    floor = tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == ">=3.11"
    assert "python3.11 -m venv .venv" in (root / ".ci" / "run").read_text()
    assert sys.version_info >= (3, 11)
