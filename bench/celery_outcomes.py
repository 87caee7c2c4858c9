"""A pytest plugin for bench/celery_integration.py: one JSON line per test outcome.

Loaded into the pytest run of Celery's own suite with ``-p celery_outcomes``
(bench/ on PYTHONPATH).  It writes each outcome as soon as it is known, to the
file named by ``CELERY_OUTCOMES``, so a run killed at its time budget still
leaves every outcome it reached.  It changes nothing about how tests run.

It also writes ``{"test", "outcome": "started", "timeout"}`` when a test starts
(``timeout``: the seconds pytest-timeout gives it, its own ``@pytest.mark.timeout``
or ``--timeout``), so the harness can tell a hung test from a slow one and stop
the run after that one test (a pytest-timeout failure raised inside a
``subtests.test()`` block is swallowed by it, and the test goes on waiting).

A subtest's report (pytest's ``SubtestReport``) is not the test's outcome: the
test counts as failed when any of its subtests failed, with the first such
subtest's error, as pytest itself reports it.
"""

from __future__ import annotations

import json
import os

_PATH = os.environ.get("CELERY_OUTCOMES")
_seen: set[str] = set()
_timeouts: dict[str, float | None] = {}  # nodeid -> seconds pytest-timeout allows it (None: no limit)
_tries: dict[str, int] = {}  # nodeid -> how many times it started (reruns)
_subtest_failures: dict[str, str] = {}  # nodeid -> first failed subtest's error line
# the first line of a failure, cut: enough to tell failures apart in a table
FIRST_LINE_MAX = 300  # characters


def _first_line(report) -> str:
    lr = report.longrepr
    if lr is None:
        return ""
    if isinstance(lr, tuple) and len(lr) == 3:  # a skip: (path, line, reason)
        text = str(lr[2])
    else:
        # pytest's "E   ..." lines say what went wrong (also for fixture errors, which have no reprcrash)
        text = "\n".join(l[1:].strip() for l in report.longreprtext.splitlines() if l.startswith("E "))
        crash = getattr(lr, "reprcrash", None)
        if not text:
            text = crash.message if crash is not None else str(lr)
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:FIRST_LINE_MAX]
    return ""


def _append(record: dict) -> None:
    with open(_PATH, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _write(nodeid: str, outcome: str, detail: str, duration: float) -> None:
    if not _PATH or nodeid in _seen:
        return
    _seen.add(nodeid)
    _append({"test": nodeid, "outcome": outcome, "detail": detail, "seconds": round(duration, 2)})


def _timeout_of(item) -> float | None:
    """The per-test limit pytest-timeout applies: the test's own marker, else ``--timeout``."""
    marker = item.get_closest_marker("timeout")
    value = None
    if marker is not None:
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    if value is None:
        try:
            value = item.config.getoption("timeout")
        except ValueError:  # pytest-timeout not loaded
            value = None
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        value = None
    return value if value and value > 0 else None


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        _timeouts[item.nodeid] = _timeout_of(item)


def pytest_runtest_logstart(nodeid, location):
    # also at each rerun (pytest-rerunfailures), so the harness's hang clock restarts with it
    if _PATH and nodeid not in _seen:
        _tries[nodeid] = _tries.get(nodeid, 0) + 1
        _append({"test": nodeid, "outcome": "started", "timeout": _timeouts.get(nodeid), "try": _tries[nodeid]})


def pytest_runtest_logreport(report):
    xfail = hasattr(report, "wasxfail")
    if type(report).__name__ == "SubtestReport":  # one subtest, not the test: remembered, not written
        if report.failed and report.nodeid not in _subtest_failures:
            _subtest_failures[report.nodeid] = "subtest: " + _first_line(report)
        return
    if report.when == "call":
        if report.nodeid in _subtest_failures and not report.skipped:
            # failed by its subtests (pytest may already have turned the report into "contains 1
            # failed subtest", or not): the first failed subtest's error says what went wrong
            _write(report.nodeid, "failed", _subtest_failures[report.nodeid], report.duration)
        elif report.passed:
            _write(report.nodeid, "xpassed" if xfail else "passed", "", report.duration)
        elif report.skipped:
            _write(report.nodeid, "xfailed" if xfail else "skipped",
                   report.wasxfail if xfail else _first_line(report), report.duration)
        else:
            _write(report.nodeid, "failed", _first_line(report), report.duration)
    elif report.when == "setup":
        if report.skipped:
            _write(report.nodeid, "xfailed" if xfail else "skipped",
                   report.wasxfail if xfail else _first_line(report), report.duration)
        elif report.failed:
            _write(report.nodeid, "error", "setup: " + _first_line(report), report.duration)
    elif report.when == "teardown" and report.failed:
        # a test that passed its call but broke teardown: keep the call's outcome, note it
        _write(report.nodeid + "::teardown", "error", "teardown: " + _first_line(report), report.duration)
