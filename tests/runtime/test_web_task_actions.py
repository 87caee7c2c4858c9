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
from tests.runtime.test_web import needs_chromium
from tests.runtime.test_web_login import JSON_ACCEPT, TOKENS, DevTools, bearer, browser_login, request, web  # noqa: F401
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


# -- the worker page ---------------------------------------------------------------------------
def until(fn, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_page_shows_the_worker_and_its_controls_relay_to_it(broker_factory, tmp_path):
    from tests.client.test_canvas import Workers
    from tests.runtime.test_http import http_port_of

    b = broker_factory()
    p = http_port_of(b)
    workers = Workers(b, tmp_path)
    try:
        workers.start("-P", "threads", "-c", "2", "-n", "pagew@test")

        def online():
            _, _, body = request(p, "GET", "/api/overview")
            return [w for w in json.loads(body)["workers"] or [] if w["hostname"] == "pagew@test" and w["state"] == "online"]
        until(online, "the worker to come online")
        status, _, page = request(p, "GET", "/worker/pagew@test")
        assert status == 200, page
        text = page.decode()
        assert "threads × 2" in text and "s ago" in text and "online" in text
        for a in ("pool-grow", "pool-shrink", "shutdown"):
            assert f'data-action="/api/workers/pagew%40test/{a}"' in text, a
        assert 'href="/worker/pagew%40test"' in request(p, "GET", "/")[2].decode()  # linked from the overview
        # shrink, then grow: the worker's own replies come back
        status, _, body = request(p, "POST", "/api/workers/pagew@test/pool-shrink", JSON_ACCEPT)
        d = json.loads(body)
        assert status == 200 and d["reply"]["size"] == 1 and "pool shrunk to 1" in d["message"], body
        status, _, body = request(p, "POST", "/api/workers/pagew@test/pool-grow", JSON_ACCEPT)
        d = json.loads(body)
        assert status == 200 and d["reply"]["size"] == 2 and "pool grown to 2" in d["message"], body
        assert d["next"] == "/worker/pagew%40test"
        # shutdown (warm): the worker says so and leaves
        status, _, body = request(p, "POST", "/api/workers/pagew@test/shutdown", JSON_ACCEPT)
        assert status == 200 and "shutting down" in json.loads(body)["message"], body
        until(lambda: workers.procs[0].poll() is not None, "the worker to exit", 30)
        # an unknown worker: 404 naming it
        status, _, body = request(p, "POST", "/api/workers/none@x/pool-grow", JSON_ACCEPT)
        assert status == 404 and "none@x" in json.loads(body)["message"]
    finally:
        workers.stop()


def test_worker_controls_need_control_and_csrf_and_send_nothing_without(web):
    p = web.http_port
    fake = raw_as(web, "worker")  # a worker's connection: it would receive the CONTROL frame
    try:
        fake.ok(wire.OP_EMIT_EVENTS, "fakew@test", [{"type": "worker-online", "timestamp": time.time(), "freq": 60}])
        for who in ("ops", "web"):
            status, _, body = request(p, "POST", "/api/workers/fakew@test/shutdown", {**bearer(who), **JSON_ACCEPT})
            d = json.loads(body)
            assert status == 403 and d["error"] == "ACCESS_REFUSED" and "'control'" in d["message"], body
            assert request(p, "GET", "/worker/fakew@test", bearer(who))[0] == 403
        session, csrf, _, _ = browser_login(p, "control")
        status, _, body = request(p, "POST", "/api/workers/fakew@test/shutdown", {"Cookie": session, **JSON_ACCEPT})
        assert status == 403 and json.loads(body)["error"] == "CSRF_FAILED"
        # nothing reached the worker: a ping's reply is the next frame it gets
        assert fake.call(wire.OP_PING)[0] == wire.OP_OK
        assert not [f for f in fake.pending if f[0] == wire.OP_CONTROL]
        status, _, page = request(p, "GET", "/worker/fakew@test", {"Cookie": session})
        assert status == 200 and b'data-action="/api/workers/fakew%40test/shutdown"' in page
    finally:
        fake.close()


# -- in a real browser -------------------------------------------------------------------------
@needs_chromium
def test_chromium_clicks_revoke_and_retry_and_sees_the_states_change(web, tmp_path):
    """Log in through the form, open a waiting task's page, click revoke (a real mouse click at the
    button): it turns REVOKED; open a failed task, click retry: the browser goes to the new task's
    page, which shows the new task's state as its worker reports it.  Then the task list, one task a
    page: click "older →" (the second page), and a column head (sorted by it, back on page one)."""
    waiting = waiting_task(web)
    failed = failed_task(web)
    drain(web)  # the fixture's message; the retry's is then the only one
    dt = DevTools(str(tmp_path / "profile"))
    base = f"http://127.0.0.1:{web.http_port}"
    try:
        target = dt.call("Target.createTarget", {"url": base + "/login"})["targetId"]
        sid = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def js(expr: str):
            return dt.evaluate(expr, sid)

        def until_js(expr: str, what: str, timeout: float = 20.0):
            return until(lambda: js(expr), f"{what} (page: {js('document.body && document.body.innerText')!r:.300})", timeout)

        def click(selector: str) -> None:
            """A real mouse click at the button's centre.  Under load the live page can swap the section
            between reading the button's box and the press, so the click lands beside it; a capture-phase
            listener tells whether the button got it, and only then are we done (never two clicks on it:
            a retry clicked twice would publish twice)."""
            sel = json.dumps(selector)
            js(f"window.__hits = 0; window.__sel = {sel}; if (!window.__hitsOn) {{ window.__hitsOn = true; "
               "document.addEventListener('click', function (e) { if (e.target.closest && e.target.closest(window.__sel)) "
               "window.__hits++; }, true); } true")
            for _ in range(5):
                box = until_js(f"(function () {{ var b = document.querySelector({sel}); if (!b) return null;"
                               " var r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()",
                               f"the button {selector}")
                for kind in ("mousePressed", "mouseReleased"):
                    dt.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                         "clickCount": 1}, sid)
                try:
                    until(lambda: js("window.__hits !== 0"), f"the click on {selector}", timeout=3)
                    return
                except AssertionError:
                    continue  # the press hit something else (or the page moved under it): press again
            raise AssertionError(f"five mouse clicks never reached {selector}")

        until_js("!!document.getElementById('login-form')", "the login form")
        js("var f = document.getElementById('login-form'); f.elements.user.value = 'root';"
           f"f.elements.token.value = {json.dumps(TOKENS['root'])}; f.submit(); true")
        until_js("document.body.getAttribute('data-live') === 'ok'", "the live page after logging in")

        dt.call("Page.navigate", {"url": f"{base}/task/{waiting}"}, sid)
        until_js("document.body.getAttribute('data-page') === 'task' && "
                 "document.querySelector('[data-section=task] .badge').textContent === 'RECEIVED'", "the waiting task")
        click(f'button[data-action="/api/task/{waiting}/revoke"]')
        until_js("document.querySelector('[data-section=task] .badge').textContent === 'REVOKED'", "REVOKED after the click")
        assert task_state(web, waiting) == "REVOKED"

        dt.call("Page.navigate", {"url": f"{base}/task/{failed}"}, sid)
        until_js("document.querySelector('[data-section=task] .badge') && "
                 "document.querySelector('[data-section=task] .badge').textContent === 'FAILURE'", "the failed task")
        click(f'button[data-action="/api/task/{failed}/retry"]')
        new_path = until_js(f"location.pathname !== '/task/{failed}' && location.pathname.startsWith('/task/') "
                            "&& location.pathname", "the new task's page after retry")
        new_id = new_path.split("/")[-1]
        got = drain(web)  # what a worker would get: the failed task again, under the new id
        assert [f[4] for f in got] == [new_id]
        assert cbor2.loads(got[0][5])["args"] == [1, "two"]
        emit(web, {"type": "task-received", "uuid": new_id, "timestamp": time.time(), "name": "proj.send",
                   "args": "(1, 'two')", "kwargs": "{}", "queue": "emails"},
             {"type": "task-succeeded", "uuid": new_id, "timestamp": time.time(), "result": "3", "runtime": 0.01})
        until_js("document.querySelector('[data-section=task] .badge') && "
                 "document.querySelector('[data-section=task] .badge').textContent === 'SUCCESS'",
                 "the retried task's SUCCESS on its page")

        # the task list, one task a page: click "older →", then a column head to sort by it
        dt.call("Page.navigate", {"url": f"{base}/?tlimit=1"}, sid)
        pager = "document.getElementById('task-pager') && document.getElementById('task-pager').textContent"
        until_js(f"({pager} || '').indexOf('tasks 1–1 of ') === 0", "the first page of one task")
        first = js("document.querySelector('[data-section=tasks] tr[data-task]').getAttribute('data-task')")
        js("document.getElementById('tasks').scrollIntoView(); true")  # the list is below the fold
        click("a[data-task-offset='1']")
        until_js(f"({pager} || '').indexOf('tasks 2–2 of ') === 0", "the second page after clicking older")
        assert js("document.querySelector('[data-section=tasks] tr[data-task]').getAttribute('data-task')") != first
        js("document.getElementById('tasks').scrollIntoView(); true")
        click("a[data-sort='name']")
        until_js(f"({pager} || '').indexOf('tasks 1–1 of ') === 0 && ({pager}).indexOf('by name ↓') > 0",
                 "the list sorted by name, back on its first page")
    finally:
        dt.close()
