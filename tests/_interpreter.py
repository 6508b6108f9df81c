"""Kernel checks under Triton's CPU interpreter, the way the kernels are checked without a GPU (CI): the code runs in
a subprocess with TRITON_INTERPRET=1 and prints, last, a JSON list of failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def interpreted_failures(code: str) -> list:
    """The failures `code` prints under Triton's interpreter (skipped without Triton, or where it cannot run)."""
    triton = pytest.importorskip("triton")
    numpy_version = tuple(int(part) for part in np.__version__.split(".")[:2])
    if triton.__version__.startswith("3.6.") and numpy_version >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter takes int() of 1-element arrays, which NumPy "
                    f"{np.__version__} refuses ('only 0-dimensional arrays can be converted to Python scalars'); "
                    "run the interpreter tests with NumPy < 2.4")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
