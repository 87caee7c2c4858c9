"""A pytest plugin for bench/celery_integration.py: one JSON line per test outcome.

Loaded into the pytest run of Celery's own suite with ``-p celery_outcomes``
(bench/ on PYTHONPATH).  It writes each outcome as soon as it is known, to the
file named by ``CELERY_OUTCOMES``, so a run killed at its time budget still
leaves every outcome it reached.  It changes nothing about how tests run.
"""

from __future__ import annotations

import json
import os

_PATH = os.environ.get("CELERY_OUTCOMES")
_seen: set[str] = set()
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


def _write(nodeid: str, outcome: str, detail: str, duration: float) -> None:
    if not _PATH or nodeid in _seen:
        return
    _seen.add(nodeid)
    with open(_PATH, "a") as fh:
        fh.write(json.dumps({"test": nodeid, "outcome": outcome, "detail": detail,
                             "seconds": round(duration, 2)}) + "\n")


def pytest_runtest_logreport(report):
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
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
