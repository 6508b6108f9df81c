"""The README's "Writing a check of your own" example runs as printed: it registers, passes on the reference head
and fails, naming its variant, on a head whose decode overflows for large inputs."""

from __future__ import annotations

import pathlib
import re

import pytest

import mutants
from headguard import HeadSpec, build_subject
from headguard.registry import CATALOGUE
from headguard.runner import run_check

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
NAME = "check_eval_output_finite"


@pytest.fixture
def readme_check():
    text = README.read_text()
    section = text[text.index("### Writing a check of your own"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    try:
        yield CATALOGUE[NAME]
    finally:
        del CATALOGUE[NAME]


def test_the_readme_check_passes_on_the_reference(readme_check):
    assert "feats: feature maps" in readme_check.draws and "init: initialisations" in readme_check.draws
    result = run_check(build_subject(mutants.REFERENCE, name="heads:Polygon"), readme_check, profile="ci")
    assert result.status == "passed", result.message


def test_the_readme_check_fails_on_a_decode_that_overflows(readme_check):
    result = run_check(build_subject(HeadSpec(mutants.DetectNaiveSoftmax), name="mutants:naive"), readme_check,
                       profile="ci")
    assert result.status == "failed"
    assert "check_eval_output_finite(batchnorm=running): eval y holds" in result.message
