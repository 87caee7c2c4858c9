"""The task page's buttons: revoke, terminate, retry a failed task (broker/web/actions.py).

A real brokerd with users (tests/runtime/test_web_login.py's), real HTTP on 127.0.0.1.  Tasks
get their history from EMIT_EVENTS, as a worker sends them.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import cbor2

from client import wire
from client.envelope import decode_envelope
from tests.runtime.test_web_login import JSON_ACCEPT, TOKENS, bearer, browser_login, request, web  # noqa: F401
from tests.e2e.test_users import depth
from tests.support.wireclient import Raw


def raw_as(b, who="root") -> Raw:
    r = Raw(b.port, name=who, extra={"user": who, "token": TOKENS[who]})
    assert r.hello[0] == wire.OP_OK, r.hello
    return r


def emit(b, *events) -> None:
    r = raw_as(b, "worker")  # EMIT_EVENTS needs consume (a worker's grant)
    try:
        r.ok(wire.OP_EMIT_EVENTS, "w1@test", list(events))
    finally:
        r.close()


def failed_task(b, tid="t-failed", queue="emails") -> str:
    now = time.time()
    emit(b, {"type": "task-received", "uuid": tid, "timestamp": now, "name": "proj.send",
             # as a worker sends them: their repr (client.worker.events)
             "args": repr((1, "two")), "kwargs": repr({"to": "x@example.com"}), "queue": queue, "root_id": tid},
         {"type": "task-failed", "uuid": tid, "timestamp": now, "exception": "ValueError('boom')"})
    return tid


def waiting_task(b, tid="t-wait") -> str:
    emit(b, {"type": "task-received", "uuid": tid, "timestamp": time.time(), "name": "proj.send", "args": "()",
             "kwargs": "{}", "queue": "emails"})
    return tid


def drain(b, queue="emails") -> list:
    """Every ready message of ``queue`` (as root), ids and decoded bodies."""
    n = depth(b, queue)
    if not n:
        return []
    r = raw_as(b, "worker")  # consume on emails
    try:
        r.ok(wire.OP_CONSUME, [queue], n)
        got = r.deliveries(n)
        r.ok(wire.OP_ACK, [f[2] for f in got])  # gone for good, not redelivered
        return got
    finally:
        r.close()


def task_state(b, tid, who="admin"):
    status, _, body = request(b.http_port, "GET", f"/api/task/{tid}", bearer(who))
    assert status == 200, body
    return json.loads(body)["task"]["state"]


def test_revoke_and_terminate_need_control_and_a_session_needs_csrf(web):
    p = web.http_port
    tid = waiting_task(web)
    # no control grant (ops: manage only; web: publish + results-read): refused, nothing revoked
    for who in ("ops", "web"):
        status, _, body = request(p, "POST", f"/api/task/{tid}/revoke", {**bearer(who), **JSON_ACCEPT})
        d = json.loads(body)
        assert status == 403 and d["error"] == "ACCESS_REFUSED" and "'control'" in d["message"], body
    assert task_state(web, tid) == "RECEIVED"
    # a session without the CSRF token: refused, nothing revoked
    session, csrf, _, _ = browser_login(p, "admin")
    status, _, body = request(p, "POST", f"/api/task/{tid}/revoke", {"Cookie": session, **JSON_ACCEPT})
    assert status == 403 and json.loads(body)["error"] == "CSRF_FAILED"
    assert task_state(web, tid) == "RECEIVED"
    # GET is not an action
    status, h, _ = request(p, "GET", f"/api/task/{tid}/revoke", {"Cookie": session})
    assert status == 405
    # the task page of a control user shows the buttons, with the session's token
    status, _, page = request(p, "GET", f"/task/{tid}", {"Cookie": session})
    assert status == 200 and f'data-action="/api/task/{tid}/revoke"'.encode() in page
    assert f'value="{csrf}"'.encode() in page
    # with the token: revoked, and the answer says where to look
    status, _, body = request(p, "POST", f"/api/task/{tid}/revoke", {"Cookie": session, "X-CSRF-Token": csrf, **JSON_ACCEPT})
    d = json.loads(body)
    assert status == 200 and d["ok"] and d["next"] == f"/task/{tid}" and "revoked" in d["message"], body
    assert task_state(web, tid) == "REVOKED"
    # terminate, as a plain form POST (no JavaScript): 303 to the task's page
    t2 = waiting_task(web, "t-run")
    status, h, body = request(p, "POST", f"/api/task/{t2}/terminate", {"Cookie": session, "Accept": "text/html"},
                              urlencode({"csrf": csrf}))
    assert status == 303 and dict((k.lower(), v) for k, v in h)["location"] == f"/task/{t2}", body
    assert b"terminate" in body
    assert task_state(web, t2) == "REVOKED"


def test_retry_publishes_the_failed_task_again_with_a_new_id(web):
    p = web.http_port
    drain(web)  # the fixture's message
    tid = failed_task(web)
    # no publish grant on its queue (ops, control): refused, nothing published
    for who in ("ops", "control"):
        status, _, body = request(p, "POST", f"/api/task/{tid}/retry", {**bearer(who), **JSON_ACCEPT})
        d = json.loads(body)
        assert status == 403 and "'publish'" in d["message"] and "'emails'" in d["message"], body
    assert drain(web) == []
    # a session without CSRF: refused, nothing published
    session, csrf, _, _ = browser_login(p, "root")
    status, _, body = request(p, "POST", f"/api/task/{tid}/retry", {"Cookie": session, **JSON_ACCEPT})
    assert status == 403 and json.loads(body)["error"] == "CSRF_FAILED"
    assert drain(web) == []
    # the page shows retry for the FAILURE
    status, _, page = request(p, "GET", f"/task/{tid}", {"Cookie": session})
    assert f'data-action="/api/task/{tid}/retry"'.encode() in page
    # web: publish on emails (and results-read)
    status, _, body = request(p, "POST", f"/api/task/{tid}/retry", {**bearer("web"), **JSON_ACCEPT})
    d = json.loads(body)
    assert status == 200 and d["ok"] and d["queue"] == "emails" and d["new_task"] != tid, body
    assert d["next"] == f"/task/{d['new_task']}"
    got = drain(web)
    assert len(got) == 1
    env = cbor2.loads(got[0][5])  # [DELIVER, consumer, tag, queue, msg_id, body, ...]
    assert got[0][4] == d["new_task"]
    assert env["id"] == d["new_task"] and env["task"] == "proj.send"
    assert env["args"] == [1, "two"] and env["kwargs"] == {"to": "x@example.com"}
    assert env["headers"]["retry_of"] == tid and env["retries"] == 0
    assert decode_envelope(got[0][5])["id"] == d["new_task"]  # what a worker reads


def test_retry_refuses_what_is_not_a_failure_or_unknown_or_not_rebuildable(web):
    p = web.http_port
    emit(web, {"type": "task-received", "uuid": "t-obj", "timestamp": time.time(), "name": "proj.send",
               "args": "(<object object at 0x7f>,)", "kwargs": "{}", "queue": "emails"},
         {"type": "task-failed", "uuid": "t-obj", "timestamp": time.time(), "exception": "E()"})
    status, _, body = request(p, "POST", "/api/task/t-obj/retry", {**bearer("admin"), **JSON_ACCEPT})
    assert status == 400 and "cannot be rebuilt" in json.loads(body)["message"], body
    tid = waiting_task(web)
    status, _, body = request(p, "POST", f"/api/task/{tid}/retry", {**bearer("admin"), **JSON_ACCEPT})
    d = json.loads(body)
    assert status == 400 and "not FAILURE" in d["message"], body
    status, _, body = request(p, "POST", "/api/task/none-such/retry", {**bearer("admin"), **JSON_ACCEPT})
    assert status == 404 and json.loads(body)["error"] == "NOT_FOUND"
