"""bench/celery_integration.py's watch on a pytest run: one hung test costs that test, not its file.

Celery's own suite is run by the harness one file per pytest process.  These tests run the harness's
``run_file`` on a tiny stand-in suite (no broker needed): a test that hangs where pytest-timeout cannot
end it (its failure swallowed by a ``subtests`` block, as Celery's
``test_revoked_by_headers_complex_canvas`` did) must be reported failed as hung, and the tests after it
must still run.  Also: a failed subtest fails its test in the outcome file (bench/celery_outcomes.py).
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pytest_timeout", reason="pytest-timeout is not installed (pip install -e '.[test]')")
pytest.importorskip("celery", reason="celery is not installed (pip install 'brokerd[celery]')")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("celery_integration_bench", ROOT / "bench" / "celery_integration.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


SUITE = '''
import time

def test_first():
    pass

def test_hangs_past_its_timeout(subtests):
    with subtests.test(msg="pytest-timeout fails inside; the subtest swallows it"):
        time.sleep(30)
    time.sleep(600)  # and nothing ends this wait but the harness

def test_a_failed_subtest_fails_its_test(subtests):
    with subtests.test(msg="bad"):
        assert 1 == 2, "the subtest's own error"

def test_after_the_hang():
    pass
'''


def test_a_hung_test_fails_alone_and_the_file_resumes_after_it(harness, tmp_path, monkeypatch):
    source = tmp_path / "celery-src"
    (source / "t" / "integration").mkdir(parents=True)
    (source / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    (source / "t" / "integration" / "test_fake.py").write_text(textwrap.dedent(SUITE))
    out = tmp_path / "out"
    out.mkdir()
    # the grace after a test's own timeout, shortened so the test is quick (the harness gives 30 s)
    monkeypatch.setattr(harness, "HANG_GRACE", 2.0)
    run = harness.run_file(source, "test_fake.py", "fake", {}, out, test_timeout=1, budget=120, keyword=None,
                           pythonpath=[], reruns=False, plugins=[])
    res = {nodeid.split("::")[-1]: rec for nodeid, rec in run["results"].items()}
    assert not run["killed"], open(run["log"]).read()
    assert res["test_first"]["outcome"] == "passed"
    assert res["test_hangs_past_its_timeout"]["outcome"] == "failed"
    assert res["test_hangs_past_its_timeout"]["detail"].startswith("hung:")
    assert [n.split("::")[-1] for n in run["hung"]] == ["test_hangs_past_its_timeout"]
    # the file went on after the hang, in a new pytest process
    assert res["test_after_the_hang"]["outcome"] == "passed"
    assert res["test_a_failed_subtest_fails_its_test"]["outcome"] == "failed"
    assert "the subtest's own error" in res["test_a_failed_subtest_fails_its_test"]["detail"]


def test_the_report_names_the_reason_of_a_known_brokerd_only_failure_and_not_of_a_new_one(harness, capsys):
    """Every test that passes on Redis and fails on brokerd is listed; those checked to be no gap in
    brokerd (the Redis backend's own keys, a race in the test) carry their reason, so a new one stands out."""
    known_id = "t/integration/test_canvas.py::test_chord::test_chord_on_error"
    new_id = "t/integration/test_canvas.py::test_chord::test_something_new"

    def run(outcome):
        return {"results": {n: {"outcome": outcome, "detail": "boom"} for n in (known_id, new_id)},
                "killed": False, "exit": 1, "seconds": 1.0, "log": "x"}

    harness.report({("redis", "test_canvas.py"): run("passed"), ("brokerd", "test_canvas.py"): run("failed")},
                   ["test_canvas.py"], ["redis", "brokerd"], {})
    lines = capsys.readouterr().out.splitlines()
    assert "passes on redis, fails on brokerd: 2" in lines
    (known_line,) = [x for x in lines if "test_chord_on_error" in x]
    (new_line,) = [x for x in lines if "test_something_new" in x]
    assert "[known: not applicable: reads the Redis backend's own keys" in known_line
    assert "[known:" not in new_line
