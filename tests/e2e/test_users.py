"""Users and grants on a real brokerd: login in HELLO and admin AUTH,
every request checked against its user's grants, listings filtered, brokerd-ctl user add."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from client import wire
from client.userfile import hash_token, user_entry
from tests.support.broker import ROOT, BrokerProcess, admin_exchange
from tests.support.wireclient import Raw

TOKENS = {name: f"token-of-{name}" for name in
          ("web", "worker", "ops", "beat", "control", "admin", "nobody")}
GRANTS = {
    "web": {"publish": ["emails"], "results-read": ["*"]},
    "worker": {"consume": ["emails"], "results-write": ["*"]},
    "ops": {"manage": ["emails"]},
    "beat": {"schedules": ["*"], "publish": ["emails"]},
    "control": {"control": ["*"]},
    "admin": {"admin": ["*"]},
    "nobody": {},
}


def write_users(path) -> None:
    path.write_text("\n".join(user_entry(n, hash_token(TOKENS[n]), GRANTS[n]) for n in TOKENS))


@pytest.fixture
def users_broker(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    write_users(path)
    return broker_factory("--users-file", str(path))


def login(b, name) -> Raw:
    r = Raw(b.port, name=name, extra={"user": name, "token": TOKENS[name]})
    assert r.hello[0] == wire.OP_OK, r.hello
    return r


def depth(b, queue="emails") -> int:
    r = login(b, "admin")
    try:
        return r.ok(wire.OP_STATS, queue)["ready"]
    finally:
        r.close()


def refused(reply, user, op) -> None:
    assert reply[0] == wire.OP_ERROR and reply[2] == "ACCESS_REFUSED", reply
    assert repr(user) in reply[3] and op in reply[3], reply


def test_missing_or_wrong_credentials_get_auth_failed_and_repeats_wait_longer(users_broker):
    waited = []
    for extra in ({}, {"user": "web", "token": "tok-WRONG-123"}, {"user": "stranger", "token": "x"}):
        t0 = time.monotonic()
        r = Raw(users_broker.port, extra=extra)
        waited.append(time.monotonic() - t0)
        assert r.hello[0] == wire.OP_CLOSING and r.hello[1] == "AUTH_FAILED", r.hello
        r.close()
    # AuthThrottle: 0.5 s, then 1 s, then 2 s from the same address
    assert waited[0] >= 0.45 and waited[1] >= 0.95 and waited[2] >= 1.9, waited
    assert any("auth failed" in line and "user='web'" in line for line in users_broker.log)
    assert not any("tok-WRONG-123" in line for line in users_broker.log), "a token reached the log"
    # the right token still works (and is not slowed by the failures)
    login(users_broker, "web").close()


@pytest.mark.parametrize("user, op, args, kind", [
    ("web", wire.OP_PUBLISH, ["emails", b"x", None, 0, None], "publish"),
    ("ops", wire.OP_PURGE, ["emails"], "manage"),
    ("ops", wire.OP_PAUSE, ["emails"], "manage"),
])
def test_each_queue_grant_allows_its_user_and_refuses_others_without_change(users_broker, user, op, args, kind):
    b = users_broker
    a = login(b, "admin")
    a.ok(wire.OP_ADMIN, "STATS")
    a.close()
    w = login(b, "web")
    w.ok(wire.OP_PUBLISH, "emails", b"seed", None, 0, None)
    w.close()
    before = depth(b)
    for other in ("nobody", "worker", "control"):
        r = login(b, other)
        refused(r.call(op, *args), other, wire.CLIENT_OPS[op])
        r.ok(wire.OP_PING)  # the connection stays open (ok() asserts the OK reply)
        r.close()
    assert depth(b) == before  # nothing changed
    r = login(b, user)
    r.ok(op, *args)
    r.close()


def test_a_grant_covers_only_its_queues(users_broker):
    w = login(users_broker, "web")
    w.ok(wire.OP_PUBLISH, "emails", b"x", None, 0, None)
    reply = w.call(wire.OP_PUBLISH, "sms", b"x", None, 0, None)
    refused(reply, "web", "PUBLISH")
    assert "'sms'" in reply[3] and "'publish'" in reply[3]
    w.close()


def test_consume_results_schedules_control_and_admin_grants_both_ways(users_broker):
    b = users_broker
    checks = [  # (allowed user, refused user, op, args)
        ("worker", "web", wire.OP_CONSUME, [["emails"], 1]),
        ("worker", "web", wire.OP_RESULT_SET, ["t1", "SUCCESS", 1, None, None]),
        ("web", "worker", wire.OP_RESULT_GET, ["t1", None]),
        ("beat", "web", wire.OP_SCHEDULE_LIST, []),
        ("control", "web", wire.OP_WORKERS, []),
        ("admin", "ops", wire.OP_ADMIN, ["QUEUES"]),
    ]
    for allowed, other, op, args in checks:
        r = login(b, other)
        refused(r.call(op, *args), other, wire.CLIENT_OPS[op])
        r.close()
        r = login(b, allowed)
        reply = r.call(op, *args)
        assert reply[0] == wire.OP_OK, (allowed, op, reply)
        r.close()
    r = login(b, "web")  # the result written by the allowed worker is there, the refused one changed nothing
    assert r.ok(wire.OP_RESULT_GET, "t1", None)["state"] == "SUCCESS"
    r.close()


def test_listings_show_only_the_queues_a_user_sees(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(user_entry("root", hash_token("r"), {"admin": ["*"], "publish": ["*"]})
                    + user_entry("mail", hash_token("m"), {"publish": ["emails"], "admin": ["emails"]}))
    b = broker_factory("--users-file", str(path))
    root = Raw(b.port, extra={"user": "root", "token": "r"})
    for q in ("emails", "secret"):
        root.ok(wire.OP_PUBLISH, q, b"x", None, 0, None)
    assert set(root.ok(wire.OP_STATS)["queues"]) >= {"emails", "secret"}
    root.close()
    mail = Raw(b.port, extra={"user": "mail", "token": "m"})
    assert set(mail.ok(wire.OP_STATS)["queues"]) == {"emails"}
    refused(mail.call(wire.OP_STATS, "secret"), "mail", "STATS")
    text = mail.ok(wire.OP_ADMIN, "QUEUES")
    assert "emails" in text and "secret" not in text
    assert "ACCESS_REFUSED" in mail.ok(wire.OP_ADMIN, "PURGE secret")
    mail.close()
    out = admin_exchange(b.port, "AUTH mail m\nQUEUES\nPEEK secret\n")
    assert "OK logged in as mail" in out and "emails" in out and "secret'" in out
    assert "ERR ACCESS_REFUSED" in out and "  secret" not in out


def test_netcat_must_auth_first(users_broker):
    b = users_broker
    out = admin_exchange(b.port, "HELP\nPING\nQUEUES\n")
    assert out.startswith("OK commands")
    assert "OK pong" in out and "ERR AUTH_REQUIRED" in out
    out = admin_exchange(b.port, f"AUTH admin {TOKENS['admin']}\nQUEUES\n")
    assert "OK logged in as admin" in out and "OK 0 queues" in out
    out = admin_exchange(b.port, f"AUTH web {TOKENS['web']}\nQUEUES\n")  # no admin grant
    assert "OK logged in as web" in out and "ERR ACCESS_REFUSED" in out
    t0 = time.monotonic()
    out = admin_exchange(b.port, "AUTH admin wrong\nQUEUES\n")
    assert time.monotonic() - t0 >= 0.45
    assert out.startswith("ERR AUTH_FAILED") and "QUEUES" not in out and "OK" not in out


def test_audit_lines_name_user_and_peer(users_broker):
    w = login(users_broker, "web")
    w.ok(wire.OP_PUBLISH, "emails", b"x", None, 0, None)
    w.close()
    r = login(users_broker, "ops")
    r.ok(wire.OP_PURGE, "emails")
    r.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("brokerd.audit" in l and "PURGE" in l for l in users_broker.log):
        time.sleep(0.05)
    line = next(l for l in users_broker.log if "brokerd.audit" in l and "PURGE" in l)
    assert "user='ops'" in line and "127.0.0.1:" in line


def test_without_a_users_file_nothing_is_asked(broker):
    r = Raw(broker.port)  # no user, no token
    r.ok(wire.OP_PUBLISH, "emails", b"x", None, 0, None)
    r.close()
    assert admin_exchange(broker.port, "QUEUES\n").startswith("OK 1 queue")


def test_a_bad_users_file_refuses_start_naming_user_and_key(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(user_entry("web", hash_token("t"), {"publish": ["emails"]}) + 'pubilsh = ["x"]\n')
    b = BrokerProcess(tmp_path / "data", "--users-file", str(path))
    with pytest.raises(RuntimeError) as err:
        b.start(timeout=20)
    assert b.proc.returncode == 2
    assert "[users.web]" in str(err.value) and "'pubilsh'" in str(err.value)


def test_ctl_user_add_prints_a_token_that_logs_in(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    ctl = [sys.executable, "-m", "client.ctl", "user", "add"]
    done = subprocess.run(ctl + ["web", "--users-file", str(path), "--grant", "publish=emails,sms.*",
                                 "--grant", "results-read=*"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert path.stat().st_mode & 0o777 == 0o600 and token not in path.read_text()
    again = subprocess.run(ctl + ["web", "--users-file", str(path), "--grant", "publish=x"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "already exists" in again.stderr
    b = broker_factory("--users-file", str(path))
    r = Raw(b.port, extra={"user": "web", "token": token})
    r.ok(wire.OP_PUBLISH, "sms.eu", b"x", None, 0, None)
    refused(r.call(wire.OP_PUBLISH, "other", b"x", None, 0, None), "web", "PUBLISH")
    r.close()


def test_the_sdk_logs_in_from_a_brokerd_url_and_meets_its_grants(users_broker):
    """The whole path as an application uses it: credentials in the URL, grants enforced."""
    from client import AccessRefused, App, AuthFailed, Client

    web = f"brokerd://web:{TOKENS['web']}@{users_broker.address}"
    with Client(web) as c:
        c.publish("emails", b"hello")
        with pytest.raises(AccessRefused, match=r"user 'web' may not PUBLISH on queue 'payments'"):
            c.publish("payments", b"no")
        assert "token-of-web" not in repr(c)
    with pytest.raises(AuthFailed):
        Client(f"brokerd://web:wrong@{users_broker.address}")
    app = App("proj", broker=web)
    try:
        assert app.send_task("proj.send", (1,), queue="emails").id
    finally:
        app.close()
    assert depth(users_broker) == 2


def test_one_user_cannot_take_every_connection(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    write_users(path)
    b = broker_factory("--users-file", str(path), "--max-connections-per-user", "2")
    first, second = login(b, "web"), login(b, "web")
    third = Raw(b.port, name="web", extra={"user": "web", "token": TOKENS["web"]})
    assert third.hello[0] == wire.OP_CLOSING and third.hello[1] == "TOO_MANY_CONNECTIONS", third.hello
    assert third.hello[2] == "user 'web' already holds 2 connections (max_connections_per_user); close some or raise the limit"
    login(b, "worker").close()  # other users are not affected
    first.close()
    deadline = time.monotonic() + 5
    while True:  # the slot comes back when a connection closes
        r = Raw(b.port, name="web", extra={"user": "web", "token": TOKENS["web"]})
        if r.hello[0] == wire.OP_OK or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.hello[0] == wire.OP_OK, r.hello
    r.close()
    second.close()


@pytest.mark.parametrize("extra", [
    {"user": 5, "token": "x"}, {"user": "web", "token": ["x"]}, {"user": "web\r\nEND", "token": "t"},
    {"user": "w" * 100_000, "token": "t"}, {"user": {"a": {"b": [1, 2]}}, "token": None},
    {"user": "web", "token": "\x00" * 1000},
])
def test_hostile_login_values_get_auth_failed_and_cost_nothing_else(users_broker, extra):
    healthy = login(users_broker, "web")
    r = Raw(users_broker.port, name="attacker", extra=extra)
    assert r.hello[0] == wire.OP_CLOSING and r.hello[1] == "AUTH_FAILED", r.hello
    assert "\r\n" not in r.hello[2] and len(r.hello[2]) < 400, r.hello[2]
    assert healthy.ok(wire.OP_PUBLISH, "emails", b"ok", None, 0, None)
    healthy.close()


def test_hostile_netcat_auth_lines_are_refused_one_line_each(users_broker):
    for line in ("AUTH\n", "AUTH web\n", "AUTH web token-of-web extra\n", "AUTH \x1b[2Jweb\r\x00 x\n",
                 "AUTH " + "w" * 3000 + " x\n"):
        out = admin_exchange(users_broker.port, line)
        first = out.split("\r\n")[0]
        assert first.startswith("ERR "), (line, out)
        assert "\x1b" not in out and "\x00" not in out, out
    assert login(users_broker, "web").ok(wire.OP_PING) is None
