"""Reports: the text table, JSON records and JUnit XML carry every result, and parse back."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from headguard import report
from headguard.runner import STATUSES, CheckResult

RECORD_KEYS = {"target", "name", "status", "duration_s", "message", "example", "reproduce", "doc", "where",
               "notes", "series", "artifacts", "failures", "started_at", "finished_at"}

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40)
results_strategy = st.lists(
    st.builds(
        CheckResult,
        target=st.sampled_from(["heads:Detect", "heads:Polygon", "my_heads:SPEC"]),
        name=st.from_regex(r"check_[a-z]{1,12}", fullmatch=True),
        status=st.sampled_from(STATUSES),
        duration_s=st.floats(0, 100),
        message=texts,
        example=st.none() | texts,
        reproduce=st.none() | texts,
        doc=texts,
    ),
    max_size=12,
)


@given(results_strategy)
def test_json_has_one_record_per_check(tmp_path_factory, results):
    path = tmp_path_factory.mktemp("json") / "out.json"
    report.write_json(path, results, profile="ci", seed=5)
    doc = json.loads(path.read_text())
    assert (doc["version"], doc["profile"], doc["seed"]) == (1, "ci", 5)
    assert doc["summary"] == {s: sum(r.status == s for r in results) for s in STATUSES}
    assert len(doc["results"]) == len(results)
    for record, result in zip(doc["results"], results):
        assert set(record) == RECORD_KEYS
        assert record["status"] in STATUSES
        assert isinstance(record["duration_s"], float)
        assert (record["name"], record["message"], record["example"], record["reproduce"]) == (
            result.name, result.message, result.example, result.reproduce)


@given(results_strategy)
def test_junit_has_a_suite_per_target_and_the_right_counts(tmp_path_factory, results):
    path = tmp_path_factory.mktemp("junit") / "out.xml"
    report.write_junit(path, results, profile="dev", seed=0)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == list(dict.fromkeys(r.target for r in results))
    for target, suite in suites.items():
        mine = [r for r in results if r.target == target]
        cases = suite.findall("testcase")
        assert [c.get("name") for c in cases] == [r.name for r in mine]
        assert int(suite.get("tests")) == len(cases) == len(mine)
        assert int(suite.get("failures")) == sum(r.status == "failed" for r in mine) == len(suite.findall("*/failure"))
        assert int(suite.get("errors")) == sum(r.status == "error" for r in mine) == len(suite.findall("*/error"))
        assert int(suite.get("skipped")) == sum(r.status in ("skipped", "xfailed") for r in mine) \
            == len(suite.findall("*/skipped"))
        for case, result in zip(cases, mine):
            failure = case.find("failure")
            if failure is not None:
                assert failure.get("message") == result.message
                if result.reproduce:
                    assert result.reproduce in failure.text


def test_failure_text_has_property_message_example_and_reproduce():
    result = CheckResult("heads:Polygon", "check_class_prior", "failed", 0.25,
                         message="sigmoid(cv3.1.bias) is 0.5, expected 0.0012 (the configured prior)",
                         example="Falsifying example: inner(\n    nc=3,\n)",
                         reproduce="headguard check heads:Polygon --select check_class_prior --seed 0 --profile dev",
                         doc="sigmoid of the cv3 final bias matches the configured prior per level")
    text = report.format_failure(result)
    assert text.splitlines() == [
        "FAILED heads:Polygon::check_class_prior",
        "  property: sigmoid of the cv3 final bias matches the configured prior per level",
        "  message:  sigmoid(cv3.1.bias) is 0.5, expected 0.0012 (the configured prior)",
        "  example:",
        "      Falsifying example: inner(",
        "          nc=3,",
        "      )",
        "  reproduce: headguard check heads:Polygon --select check_class_prior --seed 0 --profile dev",
    ]


def test_report_lists_every_check_and_summarises():
    results = [CheckResult("a:B", "check_one", "passed", 0.5),
               CheckResult("a:B", "check_two", "xfailed", 0.1, message="expected failure: bug 3"),
               CheckResult("a:B", "check_three", "error", 0.2, message="KeyError: 'x'", where="f.py:3 in g")]
    text = report.format_report(results, profile="ci", seed=1, elapsed_s=0.8)
    assert "  passed   check_one       0.50s" in text
    assert "  ERROR    check_three     0.20s" in text
    assert "ERROR a:B::check_three" in text and "where:    f.py:3 in g" in text
    assert "a:B::check_two: expected failure: bug 3" in text
    assert "a:B  (3 checks)" in text
    assert text.rstrip().endswith("1 passed, 1 xfailed, 1 error in 0.80s")


def test_report_of_one_quick_check_reads_naturally():
    text = report.format_report([CheckResult("a:B", "check_one", "passed", 0.04)], profile="dev", seed=0,
                                elapsed_s=0.04)
    assert "a:B  (1 check)\n" in text
    assert text.rstrip().endswith("1 passed in 0.04s")
