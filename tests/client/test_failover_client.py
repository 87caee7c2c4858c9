"""Clients of a replica group, without a broker: address lists (and hostile ones), the leader's
address, and the session's part of a resend (dedupe keys, NOT_LEADER refusals kept to resend).
The end-to-end side (real brokers killed and restarted) is tests/e2e/test_failover.py."""

from __future__ import annotations

import argparse
import itertools

import pytest

from client import wire
from client.options import MAX_ADDRESSES, broker_url, parse_leader
from client.producer import Client
from client.session import Session
from client.worker_cli import _broker


class Owner:
    pass


def sent(s: Session) -> list:
    r = wire.FrameReader(strict=False)
    data = s.data_to_send(0.0)
    if data.startswith(wire.PREAMBLE):
        data = data[len(wire.PREAMBLE):]
    r.feed(data)
    return r.frames()


def keyed_session() -> Session:
    return Session(Owner(), name="unit", heartbeat=0, now=0.0, id_prefix="p", ids=itertools.count(1))


def test_a_url_lists_a_group_in_order_with_one_set_of_credentials_and_tls():
    u = broker_url("brokerds://web:s3cret@h1:7700,h2,[::1]:7702?ca=/ca.pem")
    assert u.addresses == (("h1", 7700), ("h2", 7700), ("::1", 7702))
    assert (u.host, u.port) == ("h1", 7700)  # what single-address code sees: the first
    assert u.tls and u.ca == "/ca.pem" and u.hello_options() == {"user": "web", "token": "s3cret"}
    assert str(u) == "brokerds://***:***@h1:7700,h2:7700,[::1]:7702?ca=/ca.pem"
    assert broker_url("h1:1,h2:2").addresses == (("h1", 1), ("h2", 2))  # without a scheme too
    assert broker_url("h1:1").addresses == (("h1", 1),)
    # aimed at one member, the rest of the URL is kept
    assert u.at("h2", 7700).hello_options() == u.hello_options() and u.at("h2", 7700).addresses == u.addresses


@pytest.mark.parametrize("url, message", [
    ("brokerd://h1:7700,,h2:7700", r"address 2 of 3 is empty \(a doubled or trailing comma\?\)"),
    ("brokerd://u:s3cret@h1:7700,", r"address 2 of 2 is empty .*\*\*\*:\*\*\*@"),
    ("h1:7700, ,h2", r"address 2 of 3 is empty"),
    ("brokerd://h1:7700,h2:0", r"port must be from 1 to 65535 \(got 0 in address 2: h2:0\)"),
    ("brokerd://h1:70000", r"port must be from 1 to 65535 \(got 70000"),
    ("brokerd://h1:7700,h2:http", r"port must be a number \(got 'http'\)"),
    ("brokerd://" + ",".join(f"h{i}:1" for i in range(MAX_ADDRESSES + 1)), rf"lists {MAX_ADDRESSES + 1} addresses; at most {MAX_ADDRESSES}"),
    ("brokerd://h 1:7700", r"address 1 has a bad host 'h 1'"),
])
def test_hostile_lists_get_an_error_naming_the_entry_and_never_the_token(url, message):
    with pytest.raises(ValueError, match=message) as err:
        broker_url(url)
    assert "s3cret" not in str(err.value)
    with pytest.raises(ValueError, match=message):
        Client(url)  # refused before any connection is tried
    with pytest.raises(argparse.ArgumentTypeError):
        _broker(url)  # brokerd-worker -b


def test_the_leader_is_read_from_a_hello_reply_or_a_not_leader_message():
    assert parse_leader("10.0.0.5:7700") == ("10.0.0.5", 7700)
    msg = "this brokerd is a follower of the leader at 10.0.0.5:7700 and takes no writes; send writes to 10.0.0.5:7700"
    assert parse_leader(msg) == ("10.0.0.5", 7700)
    assert parse_leader("[::1]:7701") == ("::1", 7701)
    fenced = "this brokerd stopped taking writes (lease lost) and follows no leader yet; send writes to the group's current leader"
    for bad in ("", "leader:0", "nowhere:x", fenced, "[::1]"):
        with pytest.raises(ValueError):
            parse_leader(bad)


def test_every_publish_gets_its_own_key_so_a_retry_under_the_same_id_is_not_a_resend():
    s = keyed_session()
    _, a = s.publish("q", b"1", "task-1", 0, None, confirm=False)
    _, b = s.publish("q", b"2", "task-1", 0, {"delay": 1.0}, confirm=False)  # the retry
    _, c = s.publish("q", b"3", None, 0, None, confirm=False)
    frames = sent(s)
    keys = [f[6]["dedupe"] for f in frames]
    assert a == b == "task-1" and len(set(keys)) == 3
    assert frames[1][6]["delay"] == 1.0
    assert c == keys[2]  # an id the client makes is its key
    # a session without a shared counter sends no key (raw users, the async shell)
    plain = Session(Owner(), name="unit", heartbeat=0, now=0.0, id_prefix="p")
    plain.publish("q", b"1", None, 0, None, confirm=False)
    assert sent(plain)[0][6] is None


def test_unanswered_and_not_leader_publishes_are_kept_to_resend_with_their_keys():
    s = keyed_session()
    for i in range(3):
        s.publish("q", b"m%d" % i, None, 0, None, confirm=False)
    frames = sent(s)
    # the first is confirmed, the second refused by a follower, the third never answered
    s.receive([[wire.OP_OK, frames[0][1], frames[0][4]],
               [wire.OP_ERROR, frames[1][1], "NOT_LEADER", "... send writes to 10.0.0.5:7700"]], 1.0)
    assert s.refused == [] and parse_leader(s.leader_hint) == ("10.0.0.5", 7700)
    resend = s.take_resends()
    assert [(r[1], r[4]["dedupe"]) for r in resend] == [(b"m1", frames[1][6]["dedupe"]), (b"m2", frames[2][6]["dedupe"])]
    assert s.take_resends() == [] and not s.unconfirmed and not s.sent
    # resent on the next session: the same ids and keys go out
    s2 = Session(Owner(), name="unit", heartbeat=0, now=0.0, id_prefix="p", ids=itertools.count(10))
    for queue, body, mid, prio, opts in resend:
        s2.publish(queue, body, mid, prio, opts, confirm=False)
    assert [(f[4], f[6]["dedupe"]) for f in sent(s2)] == [(f[4], f[6]["dedupe"]) for f in frames[1:]]
