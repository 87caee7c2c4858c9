"""Users, tokens and grants (broker/auth.py): pure, checked directly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import auth
from broker.auth import AuthError, AuthThrottle, Users, check, check_token, hash_token, parse_users, required
from client import wire

FAST = dict(n=2**4, r=1, p=1)  # a cheap hash for tests that only need its format


def test_a_token_checks_against_its_own_hash_only():
    h = hash_token("s3cret")
    assert h.startswith("scrypt$16384$8$1$") and "s3cret" not in h
    assert check_token(h, "s3cret")
    assert not check_token(h, "s3cret ")
    assert not check_token(h, "")
    assert hash_token("s3cret") != h  # a fresh salt each time
    for broken in ("", "scrypt$x", "md5$1$1$1$AA$AA", h.replace("scrypt", "bcrypt"), h + "$extra"):
        assert not check_token(broken, "s3cret")


def test_every_client_op_names_the_grant_it_needs():
    # A new op must say who may send it: the table is the one place that decides.
    missing = {name for op, name in wire.CLIENT_OPS.items() if op not in auth.REQUIRED}
    assert not missing, f"ops without a grant rule in broker/auth.py REQUIRED: {sorted(missing)}"
    for op, rule in auth.REQUIRED.items():
        assert rule is None or rule[0] in auth.GRANT_KINDS, (op, rule)


def users_file(**grants_by_user) -> str:
    return "".join(auth.user_entry(name, hash_token("t-" + name, **FAST), grants) for name, grants in grants_by_user.items())


@pytest.fixture
def users():
    return parse_users(users_file(
        web={"publish": ("emails", "sms.*"), "results-read": ("*",)},
        worker={"consume": ("emails", "sms.*"), "results-write": ("*",)},
        ops={"manage": ("*",), "control": ("*",)},
        root={"admin": ("*",)},
    ))


def test_authenticate_takes_the_right_token_and_nothing_else(users):
    assert users.authenticate("web", "t-web").name == "web"
    assert users.authenticate("web", "t-worker") is None
    assert users.authenticate("nobody", "t-web") is None
    assert users.authenticate(None, "t-web") is None and users.authenticate("web", 5) is None
    assert len(users) == 4 and bool(Users()) is False


@pytest.mark.parametrize("who,frame,allowed", [
    ("web", [wire.OP_PUBLISH, 1, "emails", b"x", None, 0, None], True),
    ("web", [wire.OP_PUBLISH, 1, "sms.eu", b"x", None, 0, None], True),
    ("web", [wire.OP_PUBLISH, 1, "payments", b"x", None, 0, None], False),
    ("web", [wire.OP_CONSUME, 1, ["emails"], 5], False),
    ("worker", [wire.OP_CONSUME, 1, ["emails", "sms.us"], 5], True),
    ("worker", [wire.OP_CONSUME, 1, ["emails", "payments"], 5], False),
    ("worker", [wire.OP_ACK, 1, [1, 2]], True),
    ("worker", [wire.OP_CREDIT, 1, 1, 64], True),
    ("web", [wire.OP_CREDIT, 1, 1, 64], False),
    ("worker", [wire.OP_RELEASE, 1, [1, 2]], True),
    ("web", [wire.OP_RELEASE, 1, [1, 2]], False),
    ("worker", [wire.OP_RESULT_SET, 1, "t", "SUCCESS", 1, None, None], True),
    ("web", [wire.OP_RESULT_SET, 1, "t", "SUCCESS", "forged", None, None], False),
    ("web", [wire.OP_RESULT_GET, 1, "t", 5], True),
    ("worker", [wire.OP_RESULT_GET, 1, "t", 5], False),
    ("web", [wire.OP_PURGE, 1, "emails"], False),
    ("ops", [wire.OP_PURGE, 1, "emails"], True),
    ("web", [wire.OP_CONTROL_REQUEST, 1, "shutdown", None, None], False),
    ("ops", [wire.OP_CONTROL_REQUEST, 1, "shutdown", None, None], True),
    ("web", [wire.OP_CHORD, 1, "c", ["a"], {"queue": "emails", "body": b""}, {"queue": "payments", "body": b""}], False),
    ("web", [wire.OP_CHORD, 1, "c", ["a"], {"queue": "emails", "body": b""}, None], True),
    ("web", [wire.OP_CHORD_ADD, 1, "c", ["a"]], True),  # CHORD_ADD needs publish, as CHORD
    ("worker", [wire.OP_CHORD_ADD, 1, "c", ["a"]], False),
    ("ops", [wire.OP_CHORD_ADD, 1, "c", ["a"]], False),
    ("ops", [wire.OP_ADMIN, 1, "PURGE emails"], False),
    ("root", [wire.OP_ADMIN, 1, "PURGE emails"], True),
    ("web", [wire.OP_PING, 1], True),
    ("web", [99, 1], False),  # an op the table does not know: admins only
])
def test_each_op_needs_its_grant_on_its_queues(users, who, frame, allowed):
    refusal = check(users.by_name[who], frame)
    assert (refusal is None) is allowed, refusal


def test_a_refusal_names_the_user_the_operation_the_grant_and_the_queue(users):
    r = check(users.by_name["web"], [wire.OP_PUBLISH, 1, "payments", b"x", None, 0, None])
    assert r.message("PUBLISH") == "user 'web' may not PUBLISH on queue 'payments': it needs the 'publish' grant on queue 'payments'"
    r = check(users.by_name["web"], [wire.OP_RESULT_SET, 1, "t", "SUCCESS", 1, None, None])
    assert r.message("RESULT_SET") == "user 'web' may not RESULT_SET: it needs the 'results-write' grant"


def test_a_schedule_needs_publish_on_the_queue_it_fires_into():
    u = parse_users(users_file(beat={"schedules": ("*",), "publish": ("reports",)})).by_name["beat"]
    assert check(u, [wire.OP_SCHEDULE_PUT, 1, "s", {"task": "x", "every": 5, "queue": "reports"}]) is None
    r = check(u, [wire.OP_SCHEDULE_PUT, 1, "s", {"task": "x", "every": 5, "queue": "payments"}])
    assert (r.kind, r.queue) == ("publish", "payments")
    assert required([wire.OP_SCHEDULE_LIST, 1, None]) == [("schedules", None)]


def test_listings_show_a_user_only_queues_some_grant_covers(users):
    web = users.by_name["web"]
    assert web.sees("emails") and web.sees("sms.eu") and not web.sees("payments")
    assert users.by_name["root"].sees("payments")


@pytest.mark.parametrize("text,message", [
    ("users = 3", "users file: 'users' must be a table of [users.NAME] tables"),
    ("[users.web]\ntoken = \"hunter2\"\n", 'users file: [users.web] needs token = "scrypt$..." (a hash from brokerd-ctl user add, never the token itself)'),
    ("[users.web]\ntoken = \"scrypt$1$1$1$AA$AA\"\nsend = [\"q\"]\n",
     "users file: [users.web] has unknown grant 'send'; known: " + ", ".join(auth.GRANT_KINDS)),
    ("[users.web]\ntoken = \"scrypt$1$1$1$AA$AA\"\npublish = \"emails\"\n",
     'users file: [users.web] publish must be a list of queue-name globs, e.g. publish = ["emails", "sms.*"]'),
    ('[users."bad name"]\ntoken = "scrypt$1$1$1$AA$AA"\n', "users file: user name 'bad name' must be 1-64 letters, digits, '_', '.', '@' or '-'"),
    ("[other]\nx = 1\n", "users file: unknown top-level key(s) ['other']; users go in [users.NAME] tables"),
])
def test_a_bad_users_file_is_refused_naming_the_user_and_the_key(text, message):
    with pytest.raises(AuthError) as exc:
        parse_users(text)
    assert str(exc.value) == message


def test_the_documented_example_parses():
    assert set(parse_users(auth.USERS_FILE_EXAMPLE).by_name) == {"webapp", "worker"}


def test_grant_arguments_as_the_cli_takes_them():
    assert auth.parse_grant_args(["publish=emails,sms.*", "results-read=*", "publish=reports"]) == {
        "publish": ("emails", "sms.*", "reports"), "results-read": ("*",)}
    for bad in ("publish", "send=q", "publish="):
        with pytest.raises(AuthError, match=r"^grant .* must be KIND=GLOB\[,GLOB\.\.\.\] with KIND one of publish, "):
            auth.parse_grant_args([bad])


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(auth.GRANT_KINDS),
                       st.lists(st.text(min_size=1, max_size=12).filter(lambda t: "\n" not in t and "\r" not in t),
                                min_size=1, max_size=3).map(tuple), max_size=4))
def test_a_written_user_entry_reads_back_the_same(grants):
    users = parse_users(auth.user_entry("u1", hash_token("tok", **FAST), grants))
    u = users.by_name["u1"]
    assert u.grants == {k: v for k, v in grants.items()}
    assert users.authenticate("u1", "tok") is u


def test_failed_logins_from_one_address_wait_longer_each_time_up_to_a_cap():
    t = AuthThrottle(base=0.5, cap=4.0, window=60.0, max_addresses=3)
    assert [t.failed("1.2.3.4", 100.0 + i) for i in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert t.failed("5.6.7.8", 106.0) == 0.5  # another address starts afresh
    assert t.failed("1.2.3.4", 200.0) == 0.5  # past the window: forgiven
    t.succeeded("5.6.7.8")
    assert t.failed("5.6.7.8", 201.0) == 0.5
    for i in range(10):
        t.failed(f"10.0.0.{i}", 300.0)
    assert len(t._failures) <= 3  # a flood of sources cannot grow it
