"""Exchanges over real TCP against a real brokerd: fanout to several queues, a topic `#` queue,
temporary bindings and queues gone with their connection, lasting bindings across a restart, grants."""

from __future__ import annotations

import time

import pytest

from client import Client, PreconditionFailed
from client import wire
from client.userfile import hash_token, user_entry
from tests.support.wireclient import Raw

WAIT = 10.0  # seconds; an upper bound for something that must happen


def get(consumer, timeout=WAIT):
    d = consumer.get(timeout)
    assert d is not None, "no delivery arrived"
    return d


def until(check, what: str, timeout: float = WAIT):
    """Wait for a state the broker reaches after a close it learns of asynchronously; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_fanout_reaches_three_queues_on_three_connections(broker):
    clients = [Client(broker.address, name=f"w{i}") for i in range(3)]
    try:
        consumers = []
        for i, c in enumerate(clients):
            assert c.bind("celery.pidbox", f"w{i}.celery.pidbox", "", type="fanout", temporary=True) is True
            consumers.append(c.consume([f"w{i}.celery.pidbox"], prefetch=1))
        with Client(broker.address, name="ctl") as p:
            reply = p.emit("celery.pidbox", "", b'{"method": "ping"}', id="ctl-1", headers={"h": 1})
        assert reply == {"id": "ctl-1", "queues": 3}
        for i, consumer in enumerate(consumers):
            d = get(consumer)
            assert (d.body, d.id, d.queue, d.headers) == (b'{"method": "ping"}', "ctl-1", f"w{i}.celery.pidbox", {"h": 1})
            d.ack()
    finally:
        for c in clients:
            c.close()


def test_topic_hash_queue_gets_every_event_and_a_type_clash_is_refused(broker):
    with Client(broker.address, name="flower") as f, Client(broker.address, name="worker") as w:
        f.declare("celeryev.5c0d", temporary=True)
        f.bind("celeryev", "celeryev.5c0d", "#", type="topic", temporary=True)
        f.bind("celeryev", "tasks.only", "task.*", type="topic")
        events = f.consume(["celeryev.5c0d"], prefetch=10)
        assert w.emit("celeryev", "worker.heartbeat", b"hb")["queues"] == 1
        assert w.emit("celeryev", "task.succeeded", b"ok")["queues"] == 2
        assert [get(events).body for _ in range(2)] == [b"hb", b"ok"]
        with pytest.raises(PreconditionFailed, match="exchange 'celeryev' exists with type 'topic'"):
            w.bind("celeryev", "q", "", type="fanout")


def test_temporary_binding_and_queue_are_gone_after_their_connection_closes(broker):
    with Client(broker.address, name="lasting") as keeper:
        keeper.declare("events.kept")
        a = Client(broker.address, name="a")
        a.bind("celeryev", "events.kept", "#", type="topic", temporary=True)
        a.declare("a.reply", temporary=True)
        a.bind("reply.celery.pidbox", "a.reply", "a.reply", temporary=True)
        assert keeper.emit("reply.celery.pidbox", "a.reply", b"r")["queues"] == 1
        assert "celeryev" in broker.admin("EXCHANGES\n")
        a.close()
        until(lambda: "0 exchanges" in broker.admin("EXCHANGES\n"), "the temporary bindings are gone")
        assert keeper.emit("celeryev", "task.sent", b"x") == {"id": None, "queues": 0}
        assert "a.reply" not in broker.admin("QUEUES\n")  # with its message
        assert "events.kept" in broker.admin("QUEUES\n")  # a lasting queue stays


def test_lasting_bindings_survive_a_kill_and_temporary_queues_do_not(broker):
    with Client(broker.address, name="setup") as c:
        c.bind("celery", "celery", "celery")  # the direct task path: key == queue name
        c.bind("fan", "f1", "", type="fanout")
        c.bind("fan", "f2", "", type="fanout")
        c.unbind("fan", "f2", "")
        c.declare("tmp.q", temporary=True)
        c.bind("fan", "tmp.q", "", type="fanout")
        assert c.emit("fan", "", b"before")["queues"] == 2
        broker.kill()  # kill -9 with the connection open: what was confirmed must be back
    broker.restart()
    assert "tmp.q" not in broker.admin("QUEUES\n")
    out = broker.admin("BINDINGS fan\n")
    assert "OK 1 binding of fanout exchange fan" in out and "f1" in out and "f2" not in out
    with Client(broker.address, name="after") as c:
        assert c.emit("celery", "celery", b"task")["queues"] == 1
        assert c.emit("fan", "", b"after")["queues"] == 1
        cons = c.consume(["f1"], prefetch=5)
        assert [get(cons).body for _ in range(2)] == [b"before", b"after"]


TOKENS = {"web": "token-of-web", "worker": "token-of-worker", "nobody": "token-of-nobody"}
GRANTS = {
    "web": {"publish": ["celeryev"]},
    "worker": {"manage": ["*.pidbox"], "consume": ["celery.pidbox"]},
    "nobody": {"consume": ["*"]},
}


@pytest.fixture
def users_broker(broker_factory, tmp_path):
    path = tmp_path / "users.toml"
    path.write_text("\n".join(user_entry(n, hash_token(TOKENS[n]), GRANTS[n]) for n in TOKENS))
    return broker_factory("--users-file", str(path))


def login(b, name) -> Raw:
    r = Raw(b.port, name=name, extra={"user": name, "token": TOKENS[name]})
    assert r.hello[0] == wire.OP_OK, r.hello
    return r


def test_bind_unbind_and_emit_need_their_grants(users_broker):
    b = users_broker
    nobody = login(b, "nobody")
    for op, args, kind in [
        (wire.OP_BIND, ["celery.pidbox", "w1.pidbox", "", {"type": "fanout"}], "'manage' grant on queue 'w1.pidbox'"),
        (wire.OP_UNBIND, ["celery.pidbox", "w1.pidbox", ""], "'manage' grant on queue 'w1.pidbox'"),
        (wire.OP_EMIT, ["celeryev", "task.x", b"e"], "'publish' grant on queue 'celeryev'"),
    ]:
        reply = nobody.call(op, *args)
        assert reply[0] == wire.OP_ERROR and reply[2] == "ACCESS_REFUSED" and kind in reply[3], reply
    nobody.ok(wire.OP_PING)  # the connection stays open
    worker = login(b, "worker")
    assert worker.ok(wire.OP_BIND, "celery.pidbox", "w1.pidbox", "", {"type": "fanout"}) is True
    # manage on the queue is not enough to read another exchange: consume on it is needed too
    reply = worker.call(wire.OP_BIND, "celeryev", "w1.pidbox", "#", {"type": "topic"})
    assert reply[2] == "ACCESS_REFUSED" and "'consume' grant on queue 'celeryev'" in reply[3], reply
    web = login(b, "web")
    # 0 queues: the refused BIND to celeryev changed nothing
    assert web.ok(wire.OP_EMIT, "celeryev", "task.x", b"e", None, 0, None) == {"id": None, "queues": 0}
    for r in (nobody, worker, web):
        r.close()
