"""Protocol version 2 on a real brokerd (protocol.md §5.1, §5.46-5.48, §10): version-1 and
version-2 clients side by side on one broker, raw frames and the SDK, confirms that cover exactly
what was stored, PUBLISH_BATCH's grant and what a hostile batch costs (its own request only)."""

from __future__ import annotations

import pytest

import client.session
from client import wire
from client.errors import PublishError
from client.producer import Client
from client.userfile import hash_token, user_entry
from tests.support.wireclient import Raw, drain


def raw_frames(r: Raw, until, limit: int = 200) -> list:
    """Read frames until ``until(frames)`` holds; return everything read (heartbeats aside)."""
    for _ in range(limit):
        if until(r.pending):
            break
        r._read(5.0)
    assert until(r.pending), r.pending
    out, r.pending = r.pending, []
    return out


def test_a_raw_version_1_client_sees_exactly_version_1_frames(broker):
    r = Raw(broker.port)  # HELLO version 1
    assert r.hello[2]["version"] == 1
    for i in range(3):
        r.request(wire.OP_PUBLISH, "q1", b"x", f"m{i}", 0, None)
    got = raw_frames(r, lambda fs: len(fs) >= 3)
    assert got == [[wire.OP_OK, 1 + i + 1, f"m{i}"] for i in range(3)]  # one OK each, never a range
    r.ok(wire.OP_CONSUME, ["q1"], 10)
    got = raw_frames(r, lambda fs: sum(f[0] == wire.OP_DELIVER for f in fs) >= 3)
    assert [f[0] for f in got] == [wire.OP_DELIVER] * 3  # never a DELIVER_BATCH
    # PUBLISH_BATCH is an ordinary op on version 1: its OK says null (all stored under their ids)
    assert r.call(wire.OP_PUBLISH_BATCH, [["q1b", b"a", "b1"], ["q1b", b"b", "b2"]]) == [wire.OP_OK, r.rid, None]
    assert drain(broker.port, "q1b") == ["b1", "b2"]


def test_a_raw_version_2_client_gets_ranges_and_delivery_batches(broker):
    r = Raw(broker.port, version=[1, 2])
    assert r.hello[2]["version"] == 2
    rids = [r.next_rid() for _ in range(5)]
    # one write: five publishes, the third refused (its priority), so its ERROR splits the ranges
    r.send_raw(b"".join(wire.encode([wire.OP_PUBLISH, rid, "q2", b"x", f"m{rid}", 300 if i == 2 else 0, None])
                        for i, rid in enumerate(rids)))
    got = raw_frames(r, lambda fs: any(f[0] == wire.OP_CONFIRM_RANGE and f[2] == rids[-1] for f in fs))
    errors = [f for f in got if f[0] == wire.OP_ERROR]
    ranges = [f for f in got if f[0] == wire.OP_CONFIRM_RANGE]
    assert [f[1] for f in errors] == [rids[2]] and errors[0][2] == "BAD_REQUEST"
    covered = {rid for f in ranges for rid in rids if f[1] <= rid <= f[2] and rid != rids[2]}
    assert covered == set(rids) - {rids[2]}
    # the refused one's ERROR ends the run: no range spans its request id
    assert not [f for f in ranges if f[1] <= rids[2] <= f[2]]
    assert not [f for f in got if f[0] == wire.OP_OK]  # the client knew every answer: no OK at all
    r.ok(wire.OP_CONSUME, ["q2"], 10)
    got = raw_frames(r, lambda fs: any(f[0] == wire.OP_DELIVER_BATCH for f in fs))
    (b,) = [f for f in got if f[0] == wire.OP_DELIVER_BATCH]
    assert [item[2] for item in b[2]] == [f"m{rid}" for rid in rids if rid != rids[2]]


def test_a_batch_with_one_refused_item_confirms_exactly_the_others(broker):
    r = Raw(broker.port, version=2)
    r.ok(wire.OP_DECLARE, "capped", {"max_length": 2, "overflow": "reject"})
    reply = r.call(wire.OP_PUBLISH_BATCH, [["capped", b"a", "c1"], ["capped", b"b", "c2"], ["capped", b"c", "c3"],
                                           ["other", b"d", "c4"]])
    assert reply[0] == wire.OP_OK and reply[2][:2] == ["c1", "c2"] and reply[2][3] == "c4"
    assert reply[2][2][0] == "QUEUE_FULL" and reply[2][2][1].startswith("item 2: ")
    assert drain(broker.port, "capped") == ["c1", "c2"]
    assert drain(broker.port, "other") == ["c4"]


@pytest.fixture
def v1_only(monkeypatch):
    monkeypatch.setattr(client.session, "OFFERED_VERSIONS", (1,))


def sdk_round(address: str, queue: str, n: int) -> tuple[int, list]:
    with Client(address, name=queue) as c:
        for i in range(n):
            c.publish(queue, b"%d" % i, id=f"{queue}-{i}", confirm=False)
        c.wait_for_confirms(timeout=20)
        single = c.publish(queue, b"one", id=f"{queue}-single")  # waits for its own confirm
        assert single == f"{queue}-single"
        got = []
        for d in c.consume([queue], prefetch=64):
            got.append(d.id)
            d.ack()
            if len(got) == n + 1:
                break
        return c._session.version, got


def test_sdk_clients_of_both_versions_publish_and_consume_on_one_broker(broker, monkeypatch):
    version, got = sdk_round(broker.address, "sdk2", 700)
    assert version == 2
    assert got == [f"sdk2-{i}" for i in range(700)] + ["sdk2-single"]
    monkeypatch.setattr(client.session, "OFFERED_VERSIONS", (1,))
    version, got = sdk_round(broker.address, "sdk1", 700)
    assert version == 1
    assert got == [f"sdk1-{i}" for i in range(700)] + ["sdk1-single"]


def test_the_sdk_on_version_2_sends_publish_batches_and_names_the_refused_ones(broker):
    with Client(broker.address, name="p") as c:
        assert c._session.version == 2
        c.declare("tight", max_length=3, overflow="reject")
        for i in range(5):
            c.publish("tight", b"x", id=f"t{i}", confirm=False)
        with pytest.raises(PublishError) as info:
            c.wait_for_confirms(timeout=10)
        assert [mid for mid, _ in info.value.failures] == ["t3", "t4"]
        assert {exc.code for _, exc in info.value.failures} == {"QUEUE_FULL"}
    assert drain(broker.port, "tight") == ["t0", "t1", "t2"]
    # the producer's frames were PUBLISH_BATCHes: the broker saw no PUBLISH from it
    assert any("protocol=2" in line for line in broker.log)


def test_hostile_batches_cost_only_their_own_request(broker):
    r = Raw(broker.port, version=2)
    bystander = Raw(broker.port)
    for bad in (None, "x", [], [1, 2], [["q"] * 2] * (wire.MAX_PUBLISH_BATCH + 1)):
        reply = r.call(wire.OP_PUBLISH_BATCH, *([] if bad is None else [bad]))
        assert reply[0] == wire.OP_ERROR and reply[2] == "BAD_REQUEST", reply
        assert "PUBLISH_BATCH" in reply[3]
    # a batch of bad items: every one named, the connection and the broker fine
    reply = r.call(wire.OP_PUBLISH_BATCH, [[7, b"x"], ["q", "text"], ["q", b"x", "i", 0, {"bogus": 1}]])
    assert [res[0] for res in reply[2]] == ["BAD_REQUEST"] * 3
    assert [res[1][:7] for res in reply[2]] == ["item 0:", "item 1:", "item 2:"]
    assert r.ok(wire.OP_PING) is None and bystander.ok(wire.OP_PING) is None
    assert bystander.call(wire.OP_STATS, "q")[2] == "NOT_FOUND"  # nothing stored, not even the queue made


def test_a_batch_needs_publish_on_every_queue_it_names(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(user_entry("web", hash_token("t-web"), {"publish": ["emails"]})
                    + user_entry("admin", hash_token("t-admin"), {"admin": ["*"], "manage": ["*"]}))
    b = broker_factory("--users-file", str(path))
    r = Raw(b.port, version=2, extra={"user": "web", "token": "t-web"})
    reply = r.call(wire.OP_PUBLISH_BATCH, [["emails", b"a", "e1"], ["sms", b"b", "s1"]])
    assert reply[0] == wire.OP_ERROR and reply[2] == "ACCESS_REFUSED", reply
    assert "'web'" in reply[3] and "PUBLISH_BATCH" in reply[3] and "'sms'" in reply[3]
    admin = Raw(b.port, extra={"user": "admin", "token": "t-admin"})
    assert admin.call(wire.OP_STATS, "emails")[2] == "NOT_FOUND"  # nothing of the refused batch was stored
    assert r.call(wire.OP_PUBLISH_BATCH, [["emails", b"a", "e1"]])[0] == wire.OP_CONFIRM_RANGE
    assert admin.ok(wire.OP_STATS, "emails")["ready"] == 1


def test_version_1_and_version_2_clients_share_queues_both_ways(broker):
    v1 = Raw(broker.port)  # raw version-1 frames, as a client from before version 2 sends them
    for i in range(50):
        v1.request(wire.OP_PUBLISH, "to-v2", b"%d" % i, f"a{i}", 0, None)
    assert v1.reply(v1.rid)[0] == wire.OP_OK
    with Client(broker.address, name="v2") as c:
        assert c._session.version == 2
        for i in range(50):
            c.publish("to-v1", b"%d" % i, id=f"b{i}", confirm=False)
        c.wait_for_confirms(timeout=20)
        got = []
        for d in c.consume(["to-v2"], prefetch=20):
            got.append((d.id, d.body))
            d.ack()
            if len(got) == 50:
                break
    assert got == [(f"a{i}", b"%d" % i) for i in range(50)]
    v1.ok(wire.OP_CONSUME, ["to-v1"], 100)
    frames = raw_frames(v1, lambda fs: sum(f[0] == wire.OP_DELIVER for f in fs) >= 50)
    assert {f[0] for f in frames} <= {wire.OP_DELIVER, wire.OP_OK}  # nothing of version 2 reaches it
    assert [(f[4], f[5]) for f in frames if f[0] == wire.OP_DELIVER] == [(f"b{i}", b"%d" % i) for i in range(50)]
