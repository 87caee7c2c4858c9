"""The web page and HTTP API of a brokerd with users: login, bearer tokens, CSRF, grants.

A real brokerd with a users file (tests/e2e/test_users.py's users), real HTTP on 127.0.0.1.
Without users nothing changes (tests/runtime/test_http.py and test_web.py still pass open).
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import time
from urllib.parse import urlencode

import pytest

from client import wire
from client.userfile import hash_token, user_entry
from tests.e2e.test_users import GRANTS as E2E_GRANTS
from tests.e2e.test_users import TOKENS as E2E_TOKENS
from tests.e2e.test_users import depth
from tests.support.wireclient import Raw
from tests.runtime.test_http import start
from tests.runtime.test_web import CHROMIUM, needs_chromium

JSON_ACCEPT = {"Accept": "application/json"}
# tests/e2e/test_users.py's users, plus "root", who may declare and publish the test's queues
TOKENS = {**E2E_TOKENS, "root": "token-of-root"}
GRANTS = {**E2E_GRANTS, "root": {"manage": ["*"], "publish": ["*"], "admin": ["*"]}}


def write_users(path) -> None:
    path.write_text("\n".join(user_entry(n, hash_token(TOKENS[n]), GRANTS[n]) for n in TOKENS))


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {name}:{TOKENS[name]}"}


def request(port, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        h = dict(headers or {})
        if body is not None:
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, r.getheaders(), data
    finally:
        conn.close()


def header(headers, name):
    return [v for k, v in headers if k.lower() == name]


def cookie_of(headers, name) -> str:
    for v in header(headers, "set-cookie"):
        if v.startswith(name + "="):
            return v
    raise AssertionError(f"no Set-Cookie {name} in {headers}")


def browser_login(port, name, token=None):
    """Log in through the form as a browser does: (session cookie header value, page csrf)."""
    status, h, body = request(port, "GET", "/login")
    assert status == 200, body
    login_cookie = cookie_of(h, "brokerd_login").split(";")[0]
    form_csrf = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
    status, h, body = request(port, "POST", "/login", {"Cookie": login_cookie},
                              urlencode({"csrf": form_csrf, "user": name, "token": token or TOKENS[name]}))
    assert status == 303, (status, body)
    set_cookie = cookie_of(h, "brokerd_session")
    session = set_cookie.split(";")[0]
    status, _, page = request(port, "GET", "/", {"Cookie": session})
    assert status == 200, page
    csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
    return session, csrf, set_cookie, page


@pytest.fixture
def web(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    write_users(path)
    b = start(broker_factory, "--users-file", str(path))
    r = Raw(b.port, name="root", extra={"user": "root", "token": TOKENS["root"]})
    assert r.hello[0] == wire.OP_OK, r.hello
    try:
        for q in ("emails", "secret"):
            r.ok(wire.OP_DECLARE, q, {})
            r.ok(wire.OP_PUBLISH, q, b"x", None, 0, None)
    finally:
        r.close()
    return b


def test_every_route_but_the_probes_needs_a_login(web):
    p = web.http_port
    for path in ("/api/overview", "/api/tasks", "/api/queues", "/metrics", "/api/dead/emails", "/api/task/x"):
        status, h, body = request(p, "GET", path)
        assert status == 401, (path, status, body)
        assert json.loads(body)["error"] == "AUTH_REQUIRED"
        assert header(h, "www-authenticate")
    status, h, _ = request(p, "GET", "/")
    assert status == 303 and header(h, "location") == ["/login"]
    status, _, body = request(p, "POST", "/api/queues/emails/purge")
    assert status == 401 and depth(web) == 1
    for path in ("/healthz", "/readyz", "/static/app.js"):
        assert request(p, "GET", path)[0] == 200, path


def test_bearer_token_works_and_a_wrong_one_is_refused_without_echo(web):
    p = web.http_port
    status, _, body = request(p, "GET", "/api/queues", bearer("admin"))
    assert status == 200 and set(json.loads(body)["queues"]) >= {"emails", "secret"}
    status, _, body = request(p, "GET", "/api/queues", {"Authorization": "Bearer admin:not-the-token-xyz"})
    assert status == 401 and json.loads(body)["error"] == "AUTH_FAILED"
    assert b"not-the-token-xyz" not in body
    # a bearer POST needs no CSRF token (browsers never send Authorization on their own)
    status, _, body = request(p, "POST", "/api/queues/emails/purge", {**bearer("admin"), **JSON_ACCEPT})
    assert status == 200, body
    assert depth(web) == 0


def test_form_login_sets_a_strict_httponly_cookie_and_a_wrong_token_is_not_echoed(web):
    p = web.http_port
    _, _, set_cookie, page = browser_login(p, "admin")
    flags = [f.strip().lower() for f in set_cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain HTTP here; HTTPS adds Secure
    assert b"signed in as <b>admin</b>" in page and b'action="/logout"' in page
    # a wrong token: 401, the form again, the token nowhere in the answer
    status, h, body = request(p, "GET", "/login")
    lc = cookie_of(h, "brokerd_login").split(";")[0]
    csrf = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
    status, h, body = request(p, "POST", "/login", {"Cookie": lc},
                              urlencode({"csrf": csrf, "user": "admin", "token": "wrong-secret-123"}))
    assert status == 401 and b"wrong-secret-123" not in body and not [
        v for v in header(h, "set-cookie") if v.startswith("brokerd_session=")]


def test_login_form_without_its_csrf_value_is_refused(web):
    status, _, body = request(web.http_port, "POST", "/login", {},
                              urlencode({"user": "admin", "token": TOKENS["admin"]}))
    assert status == 403 and json.loads(body)["error"] == "CSRF_FAILED"


def test_csrf_missing_or_forged_or_from_another_session_is_refused_and_changes_nothing(web):
    p = web.http_port
    session, csrf, _, _ = browser_login(p, "admin")
    other_session, other_csrf, _, _ = browser_login(p, "admin")
    assert csrf != other_csrf
    url = "/api/queues/emails/purge"
    for hdrs, body in (({"Cookie": session}, None),                                   # missing
                       ({"Cookie": session, "X-CSRF-Token": "forged"}, None),          # forged
                       ({"Cookie": session, "X-CSRF-Token": other_csrf}, None),        # another session's
                       ({"Cookie": session}, urlencode({"csrf": other_csrf}))):        # form field, another's
        status, _, out = request(p, "POST", url, {**hdrs, **JSON_ACCEPT}, body)
        assert status == 403 and json.loads(out)["error"] == "CSRF_FAILED", (hdrs, out)
        assert depth(web) == 1
    # the page's own token, as app.js sends it, and as the plain form sends it
    status, _, out = request(p, "POST", url, {"Cookie": session, "X-CSRF-Token": csrf, **JSON_ACCEPT})
    assert status == 200, out
    assert depth(web) == 0
    status, h, _ = request(p, "POST", "/api/queues/emails/pause", {"Cookie": session, "Accept": "text/html"},
                           urlencode({"csrf": csrf}))
    assert status == 303


def test_logout_ends_the_session(web):
    p = web.http_port
    session, csrf, _, _ = browser_login(p, "admin")
    status, h, _ = request(p, "POST", "/logout", {"Cookie": session}, urlencode({"csrf": csrf}))
    assert status == 303 and header(h, "location") == ["/login"]
    assert request(p, "GET", "/api/overview", {"Cookie": session})[0] == 401


def test_what_a_user_sees_and_may_press_follows_their_grants(web):
    p = web.http_port
    # ops: manage on emails only; no results-read
    status, _, body = request(p, "GET", "/api/queues", bearer("ops"))
    assert status == 200 and set(json.loads(body)["queues"]) == {"emails"}
    status, _, body = request(p, "GET", "/metrics", bearer("ops"))
    assert status == 200 and b'queue="emails"' in body and b'queue="secret"' not in body
    status, _, body = request(p, "GET", "/api/overview", bearer("ops"))
    assert [q["name"] for q in json.loads(body)["queues"]] == ["emails"]
    status, _, body = request(p, "GET", "/api/tasks", bearer("ops"))
    assert status == 403 and "'results-read'" in json.loads(body)["message"]
    status, _, body = request(p, "GET", "/api/graphs", bearer("ops"))  # task names and runtimes: task data
    assert status == 403 and "'results-read'" in json.loads(body)["message"]
    status, _, body = request(p, "POST", "/api/queues/secret/purge", bearer("ops"))
    assert status == 403 and json.loads(body)["error"] == "ACCESS_REFUSED"
    # web: publish on emails, results-read; may see emails and tasks, may not purge
    status, _, body = request(p, "POST", "/api/queues/emails/purge", bearer("web"))
    msg = json.loads(body)["message"]
    assert status == 403 and "'manage'" in msg and "'emails'" in msg and "'web'" in msg
    assert depth(web) == 1
    assert request(p, "GET", "/api/tasks", bearer("web"))[0] == 200
    assert request(p, "GET", "/api/graphs", bearer("web"))[0] == 200
    # the page of a user without manage has no buttons
    _, _, _, page = browser_login(p, "web")
    assert b'data-queue="emails"' in page and b'data-queue="secret"' not in page
    assert b"/api/queues/emails/purge" not in page
    assert request(p, "POST", "/api/queues/emails/purge", bearer("ops"))[0] == 200
    assert depth(web) == 0


def test_open_metrics_setting_leaves_only_metrics_and_queue_depths_open(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    write_users(path)
    b = start(broker_factory, "--users-file", str(path), env={"BROKERD_HTTP_OPEN_METRICS": "true"})
    p = b.http_port
    assert request(p, "GET", "/metrics")[0] == 200
    assert request(p, "GET", "/api/queues")[0] == 200
    assert request(p, "GET", "/api/overview")[0] == 401
    assert request(p, "POST", "/api/queues/emails/purge")[0] == 401


def test_without_users_everything_stays_open(broker_factory):
    b = start(broker_factory)
    assert request(b.http_port, "GET", "/api/overview")[0] == 200
    assert request(b.http_port, "GET", "/")[0] == 200


class DevTools:
    """Chromium driven over --remote-debugging-pipe (DevTools JSON on fds 3 and 4, NUL-ended):
    enough to type into the login form and read the page, with no websocket library."""

    def __init__(self, profile: str):
        import os
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's fd 3 reads our commands, fd 4 writes its answers
        def fds():
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--no-default-browser-check", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            # close_fds=False: the dup2'ed fds 3 and 4 must survive (every other fd of ours is
            # close-on-exec, as os.pipe and Python's files make them)
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20.0) -> dict:
        import os
        import select
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, reply
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"Chromium did not answer {method} within {timeout}s"
            if select.select([self._from_child], [], [], left)[0]:
                chunk = os.read(self._from_child, 1 << 16)
                assert chunk, "Chromium closed its DevTools pipe"
                self._buf += chunk

    def evaluate(self, expr: str, session: str):
        """The value of ``expr`` in the page, or None when the page navigated away while it ran
        (Chromium answers "Inspected target navigated or closed"; under load a click's navigation
        and the next poll race) — callers poll with ``until``, so None means "not yet"."""
        try:
            reply = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
        except AssertionError as e:
            if "navigated or closed" in str(e) or "Execution context was destroyed" in str(e):
                return None
            raise
        return reply["result"].get("value")

    def close(self) -> None:
        import os
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._to_child)
        os.close(self._from_child)


@needs_chromium
def test_chromium_logs_in_through_the_form_and_sees_the_page(web, tmp_path):
    """A real browser: /login, type user and token, submit; the live page shows who is signed
    in and only the queues of their grants; its polling (cookie + JSON) keeps working."""
    dt = DevTools(str(tmp_path / "profile"))
    try:
        target = dt.call("Target.createTarget", {"url": f"http://127.0.0.1:{web.http_port}/login"})["targetId"]
        sid = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def js(expr: str):
            return dt.evaluate(expr, sid)

        def until(expr: str, what: str, timeout: float = 20.0):
            deadline = time.monotonic() + timeout
            while True:
                v = js(expr)
                if v:
                    return v
                assert time.monotonic() < deadline, f"{what}: not within {timeout}s; page: {js('document.body && document.body.innerText')}"
                time.sleep(0.1)

        until("!!document.getElementById('login-form')", "the login form")
        js("var f = document.getElementById('login-form'); f.elements.user.value = 'ops';"
           f"f.elements.token.value = {json.dumps(TOKENS['ops'])}; f.submit(); true")
        until("document.body.getAttribute('data-live') === 'ok'", "the live page after logging in")
        text = js("document.body.innerText")
        assert "signed in as ops" in text
        rows = js("Array.from(document.querySelectorAll('tr[data-queue]')).map(r => r.getAttribute('data-queue'))")
        assert rows == ["emails"], rows  # ops may manage emails only; "secret" is not shown
        assert js("!!document.querySelector('button[data-action=\"/api/queues/emails/purge\"]')")
        assert js("document.cookie") == ""  # HttpOnly: the page's script cannot read the session
    finally:
        dt.close()
