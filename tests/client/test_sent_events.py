"""Celery's ``task_send_sent_event`` on our SDK: a ``task-sent`` event for every task published,
against a real brokerd (no worker: the task stays PENDING, and the event is all brokerd knows).

Before, the setting was accepted and nothing was sent (a silent no-op, issue 14's "no silent losses").
"""

from __future__ import annotations

import logging
import time

from client import Client
from client.app import App
from client.userfile import hash_token, user_entry

WAIT = 15.0


def events_of(broker, task_id):
    with Client(broker.address) as c:
        info = c.task_info(task_id) or {}
    return info, [e for e in info.get("events", ()) if e.get("uuid") == task_id]


def wait_events(broker, task_id):
    deadline = time.monotonic() + WAIT
    while True:
        info, evs = events_of(broker, task_id)
        if evs or time.monotonic() > deadline:
            return info, evs
        time.sleep(0.05)


def test_a_published_task_sends_task_sent_with_what_celery_puts_in_it(broker):
    app = App("proj", broker=broker.address, task_send_sent_event=True)
    try:
        @app.task(queue="mail")
        def send(user, subject="hi"):
            return user

        r = send.apply_async(("ann",), {"subject": "yo"}, countdown=60)
        secret = send.apply_async(("bob", "pw-123"), argsrepr="('bob', '***')")
        info, evs = wait_events(broker, r.id)
        assert [e["type"] for e in evs] == ["task-sent"], evs
        ev = evs[0]
        assert ev["name"] == send.name and ev["queue"] == "mail" and ev["routing_key"] == "mail"
        assert ev["args"] == "('ann',)" and ev["kwargs"] == "{'subject': 'yo'}" and ev["retries"] == 0
        assert ev["eta"] and ev["hostname"].startswith("gen")  # a producer's name, as Celery's
        assert info["state"] == "PENDING" and info["name"] == send.name
        _, evs = wait_events(broker, secret.id)
        assert evs[0]["args"] == "('bob', '***')" and "pw-123" not in repr(evs), evs  # argsrepr, not the secret
    finally:
        app.close()


def test_without_the_setting_no_task_sent_event_goes_out(broker):
    app = App("proj", broker=broker.address)
    try:
        @app.task(queue="mail")
        def send(user):
            return user

        r = send.delay("ann")
        app.send_task("proj.other", queue="mail")  # the same path: nothing either
        time.sleep(0.3)
        info, evs = events_of(broker, r.id)
        assert evs == [], evs
    finally:
        app.close()


def test_a_producer_without_the_consume_grant_is_told_once_and_publishes_on(broker_factory, tmp_path, caplog):
    users = tmp_path / "users.toml"
    users.write_text(user_entry("web", hash_token("tok-web-1"), {"publish": ["mail"], "results-read": ["*"]}) + "\n"
                     + user_entry("admin", hash_token("tok-admin-1"), {"admin": ["*"], "results-read": ["*"]}))
    b = broker_factory("--users-file", str(users))
    app = App("proj", broker=f"brokerd://web:tok-web-1@{b.address}", task_send_sent_event=True)
    try:
        @app.task(queue="mail")
        def send(user):
            return user

        with caplog.at_level(logging.WARNING, logger="brokerd.app"):
            ids = [send.delay(n).id for n in ("a", "b", "c")]
        said = [r for r in caplog.records if "task_send_sent_event" in r.getMessage()]
        assert len(said) == 1 and "'consume' grant" in said[0].getMessage(), [r.getMessage() for r in said]
        with Client(f"brokerd://admin:tok-admin-1@{b.address}") as c:
            assert c.stats("mail")["ready"] == 3  # every publish went through
            assert all(not (c.task_info(i) or {}).get("events") for i in ids)
    finally:
        app.close()


def test_a_task_sent_event_arriving_after_the_workers_never_takes_back_its_state():
    """The producer's task-sent can reach brokerd after the worker's task-received (two
    connections): the task's summary keeps the worker's state and name, and takes from task-sent
    only what nothing else said."""
    from broker.state.events import summarize

    evs = [
        {"type": "task-received", "uuid": "t1", "hostname": "w1@host", "ts": 2.0, "name": "proj.send", "args": "(1,)"},
        {"type": "task-sent", "uuid": "t1", "hostname": "gen7@host", "ts": 1.0, "name": "proj.send", "args": "(1,)",
         "queue": "mail", "root_id": "t1"},
    ]
    d = summarize("t1", evs)
    assert (d["state"], d["worker"], d["received"]) == ("RECEIVED", "w1@host", 2.0)
    assert d["queue"] == "mail" and d["root_id"] == "t1"  # filled in from task-sent
    assert summarize("t1", evs[1:])["state"] == "PENDING"
