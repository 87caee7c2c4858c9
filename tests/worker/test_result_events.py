"""A successful task's events folded into its RESULT_SET (protocol.md §5.19): with a brokerd whose HELLO
reply lists ``result_events`` the worker sends its task-started and task-succeeded (and its task-received,
when it has not left yet) inside the result; with a brokerd that does not list it (an older one), in
EMIT_EVENTS as before.  Either way brokerd keeps the same events, in the same order.

Real brokerd, the in-process test worker (``client.worker.testing.start_worker``); the "older brokerd" is
the same brokerd with the feature hidden from the client (its HELLO reply read as an older one's).
"""

from __future__ import annotations

import os

import pytest

from client.blocking import Connection
from client.worker import events as ev_
from client.worker.testing import start_worker
from tests.support.waiting import wait_for
from tests.worker.test_worker import WAIT, fresh_queue, shared_broker  # noqa: F401 - fixtures
from tests.worker_apps import tasks


def history(task_id) -> list:
    return (tasks.app.client.task_info(task_id) or {}).get("events") or []


@pytest.mark.parametrize("brokerd", ["with the feature", "older"])
def test_the_events_brokerd_keeps_are_the_same_whether_folded_or_not(shared_broker, monkeypatch, brokerd):
    folds = []
    real_fold = ev_.EventBuffer.fold

    def fold(self, *a):
        spec = real_fold(self, *a)
        folds.append(spec)
        return spec

    monkeypatch.setattr(ev_.EventBuffer, "fold", fold)
    if brokerd == "older":
        monkeypatch.setattr(Connection, "server_features", property(lambda self: frozenset()))
    q = fresh_queue()
    with start_worker(tasks.app, queues=[q], concurrency=2) as w:
        quick = [tasks.add.apply_async((i, 1), queue=q) for i in range(5)]
        # runs past the events' 50 ms batching: its task-received and task-started leave before it ends
        slow = tasks.slow.apply_async((0.3,), queue=q)
        assert [r.get(timeout=WAIT) for r in quick] == [i + 1 for i in range(5)]
        slow.get(timeout=WAIT)
        for r in quick + [slow]:
            wait_for(lambda: [e["type"] for e in history(r.id)][-1:] == ["task-succeeded"], WAIT, "its events")
        hostname = w.hostname
    for r, value in [(r, repr(i + 1)) for i, r in enumerate(quick)] + [(slow, repr(slow.result))]:
        evs = history(r.id)
        assert [e["type"] for e in evs] == ["task-received", "task-started", "task-succeeded"], evs
        assert {e["hostname"] for e in evs} == {hostname}
        rec, started, done = evs
        assert rec["name"] == r.name and rec["queue"] == q and rec["retries"] == 0
        assert started["pid"] == os.getpid() and rec["ts"] <= started["ts"] <= done["ts"]
        assert done["result"] == value and done["runtime"] >= 0
        assert set(started) == {"type", "uuid", "ts", "pid", "hostname"}
        assert set(done) == {"type", "uuid", "ts", "runtime", "result", "hostname"}
    if brokerd == "older":
        assert folds == []  # nothing folded: an older brokerd would refuse the option
    else:
        assert len(folds) == 6 and {spec[0] for spec in folds} == {hostname}
        # the slow task's task-received and task-started had left already: only its task-succeeded rode along
        slow_spec = [spec for spec in folds if spec[6] == repr(slow.result)]
        assert len(slow_spec) == 1 and slow_spec[0][1] is None and slow_spec[0][2] is None, folds
