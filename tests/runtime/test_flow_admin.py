"""Flow control on the operator's side (issue 15): RATES, RATE and TENANTS over netcat, their grants,
and the web page's limits, against a real brokerd."""

from __future__ import annotations

import http.client
import json

import pytest

from client import Client
from client.errors import AccessRefused
from client.userfile import hash_token, new_token, user_entry
from tests.support.broker import admin_exchange


def get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_rates_rate_and_tenants_over_netcat_and_on_the_page(broker):
    with Client(broker.address) as c:
        for i in range(6):
            c.publish("sms", b"x", headers={"x-task": "proj.send_sms", "x-rate-limit": "1/h", "x-tenant": "acme"})
        c.publish("sms", b"y", headers={"x-task": "proj.send_sms", "x-tenant": "initech", "x-tenant-weight": 3})
        out = broker.admin("TENANTS sms\n")
        assert "OK 2 tenants with ready messages in sms" in out
        assert [line.split() for line in out.splitlines()[2:4]] == [["acme", "6", "1"], ["initech", "1", "3"]]
        status, body = get(broker.http_port, "/api/overview")
        assert json.loads(body)["tenants"] == [{"queue": "sms", "tenants": 2, "top": [
            {"tenant": "acme", "ready": 6, "weight": 1}, {"tenant": "initech", "ready": 1, "weight": 3}]}]
        assert b"acme: 6" in get(broker.http_port, "/")[1] and b"initech: 1 (weight 3)" in get(broker.http_port, "/")[1]
        cons = c.consume(["sms"], prefetch=10)
        assert cons.get(timeout=10) is not None  # the bucket's one token; the rest wait
        rates = broker.admin("RATES\n")
        row = next(line.split() for line in rates.splitlines() if "proj.send_sms" in line)
        assert row == ["task", "proj.send_sms", "1/h", "task", "6"] + (["-"] if len(row) == 6 else []), rates
        assert broker.admin("RATE proj.send_sms 100/s\n").startswith("OK rate of proj.send_sms is 100/s (was 1/h)")
        got = 0
        while got < 6 and cons.get(timeout=10) is not None:
            got += 1
        assert got == 6  # the live rate released what the old one held
        assert "live" in broker.admin("RATES\n")
        assert broker.admin("RATE proj.send_sms\n").startswith("ERR BAD_REQUEST usage: RATE <task> <limit>")
        assert broker.admin("RATE proj.send_sms 5/fortnight\n").startswith("ERR BAD_REQUEST rate limit '5/fortnight'")
        assert broker.admin("TENANTS nosuch\n").startswith("ERR NOT_FOUND")
        status, body = get(broker.http_port, "/api/overview")
        assert status == 200
        limits = json.loads(body)["limits"]
        assert {"kind": "task", "name": "proj.send_sms", "limit": "100/s", "source": "live", "waiting": 0,
                "inflight": None} in limits
        status, page = get(broker.http_port, "/")
        assert b"Rate limits and caps" in page and b"proj.send_sms" in page


def post(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, headers={"Accept": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_the_page_sets_a_tasks_rate_for_all_workers(broker):
    """The limits panel's form: POST /api/rates/task/<name>?limit= is RATE_LIMIT (logged, global)."""
    assert b"data-rate-set" in get(broker.http_port, "/")[1]  # no users: everyone may (open mode)
    status, d = post(broker.http_port, "/api/rates/task/proj.send_sms?limit=5/s")
    assert status == 200 and d["limit"] == "5/s" and "rate limit of task proj.send_sms is 5/s" in d["message"], d
    row = next(line.split() for line in broker.admin("RATES\n").splitlines() if "proj.send_sms" in line)
    assert row[:4] == ["task", "proj.send_sms", "5/s", "live"]
    status, d = post(broker.http_port, "/api/rates/task/proj.send_sms?limit=5/fortnight")
    assert status == 400 and "5/fortnight" in d["message"], d
    status, d = post(broker.http_port, "/api/rates/queue/nosuch?limit=1/s")
    assert status == 404, d
    assert get(broker.http_port, "/api/rates/task/proj.send_sms")[0] == 405  # GET is not an action
    # hostile values cost only their request: a huge name, control characters, a huge limit
    status, d = post(broker.http_port, "/api/rates/task/" + "x" * 5000 + "?limit=1/s")
    assert status == 400 and "at most" in d["message"], d
    status, d = post(broker.http_port, "/api/rates/task/a%00b%0A?limit=" + "9" * 400 + "/s")
    assert status == 400, d
    assert broker.admin("STATS\n").startswith("OK")  # the broker is fine
    status, d = post(broker.http_port, "/api/rates/task/proj.send_sms?limit=0")
    assert status == 200 and d["limit"] is None and d["previous"] == "5/s", d


def test_rate_and_tenants_need_the_admin_grant(broker_factory, tmp_path):
    tok_w, tok_o = new_token(), new_token()
    users = tmp_path / "users.toml"
    users.write_text(user_entry("web", hash_token(tok_w), {"publish": ["*"]})
                     + user_entry("ops", hash_token(tok_o), {"admin": ["billing.*"], "publish": ["*"]}))
    b = broker_factory("--users-file", str(users))
    with Client(f"brokerd://web:{tok_w}@{b.address}") as c:
        c.publish("sms", b"x", headers={"x-tenant": "acme"})
        c.publish("billing.runs", b"x", headers={"x-tenant": "acme"})
        for line in ("RATE proj.send_sms 5/s", "RATES", "TENANTS billing.runs"):
            with pytest.raises(AccessRefused):
                c.admin(line)
    with Client(f"brokerd://ops:{tok_o}@{b.address}") as c:
        with pytest.raises(AccessRefused):
            c.admin("TENANTS sms")  # a queue it has no admin grant on
        assert c.admin("TENANTS billing.runs").startswith("OK 1 tenant")
        assert "proj.send_sms" not in c.admin("RATES")  # the refused RATE changed nothing
    assert admin_exchange(b.port, "RATES\n").startswith("ERR")  # netcat without a login
    # the page's rate form needs 'control' too: refused for a user without it, nothing set, no form shown
    status, d = post(b.http_port, "/api/rates/task/proj.send_sms?limit=5/s", {"Authorization": f"Bearer web:{tok_w}"})
    assert status == 403 and d["error"] == "ACCESS_REFUSED" and "'control'" in d["message"], d
    assert b"data-rate-set" not in get(b.http_port, "/", {"Authorization": f"Bearer web:{tok_w}"})[1]
    with Client(f"brokerd://ops:{tok_o}@{b.address}") as c:
        assert "proj.send_sms" not in c.admin("RATES")
