"""client/celery/transport.py through kombu itself (no Celery worker) against a real brokerd."""

from __future__ import annotations

import pytest

pytest.importorskip("kombu", reason="kombu is not installed (pip install 'brokerd[celery]')")

import client.celery  # noqa: E402,F401  registers brokerd://
from kombu import Connection, Consumer, Exchange, Producer, Queue  # noqa: E402
from kombu.asynchronous import Hub  # noqa: E402

from client.errors import ConnectionLost  # noqa: E402

WAIT = 10.0  # seconds: bound of each drain_events


def consumer_rows(broker):
    text = broker.admin("CONSUMERS\n")
    return [line.split() for line in text.splitlines()[2:] if line and line != "END"]


def test_qos_is_brokerds_prefetch_and_reject_requeue_redelivers_flagged(broker):
    q = Queue("kq", Exchange("kq", type="direct"), routing_key="kq")
    got = []
    with Connection(f"brokerd://{broker.address}") as conn:
        Producer(conn).publish({"n": 1}, exchange=q.exchange, routing_key="kq", declare=[q], priority=4,
                               headers={"id": "m-1"})
        ch = conn.default_channel
        ch.basic_qos(0, 3, False)  # as Celery does: QoS first, then consume
        with Consumer(ch, [q], callbacks=[lambda body, m: got.append((body, m))]):
            conn.drain_events(timeout=WAIT)
            (prefetch,) = [int(row[4]) for row in consumer_rows(broker) if row[3] == "kq"]
            assert prefetch == 3
            body, m = got.pop()
            assert body == {"n": 1} and m.delivery_info["redelivered"] is False and m.properties["priority"] == 4
            m.reject(requeue=True)
            conn.drain_events(timeout=WAIT)
            body, m = got.pop()
            assert m.delivery_info["redelivered"] is True and m.headers["id"] == "m-1"
            m.ack()


def test_a_qos_change_is_brokerds_credit_in_place_and_returns_nothing(broker):
    """Celery raises its prefetch by one for each eta task its timer holds: basic_qos is CREDIT on the
    live consumer.  (It was a cancel and a new CONSUME, which sent what was buffered back.)"""
    q = Queue("cq", routing_key="cq")
    got = []
    with Connection(f"brokerd://{broker.address}") as conn:
        for n in range(2):
            Producer(conn).publish({"n": n}, routing_key="cq", declare=[q], headers={"id": f"c-{n}"})
        ch = conn.default_channel
        ch.basic_qos(0, 1, False)
        with Consumer(ch, [q], callbacks=[lambda body, m: got.append((body, m))]):
            conn.drain_events(timeout=WAIT)
            assert [b for b, _ in got] == [{"n": 0}]
            (before,) = [row for row in consumer_rows(broker) if row[3] == "cq"]
            ch.basic_qos(0, 2, False)
            conn.drain_events(timeout=WAIT)
            (after,) = [row for row in consumer_rows(broker) if row[3] == "cq"]
            assert int(before[4]) == 1 and int(after[4]) == 2
            assert after[:4] == before[:4]  # the same consumer, not a new one
            assert [b for b, _ in got] == [{"n": 0}, {"n": 1}]
            assert all(m.delivery_info["redelivered"] is False for _, m in got)
            for _, m in got:
                m.ack()


def test_the_event_loop_waits_on_a_descriptor_the_client_signals(broker):
    """Push delivery: the transport registers one fd with kombu's hub; a delivery makes it readable."""
    q = Queue("hubq", routing_key="hubq")
    got = []
    with Connection(f"brokerd://{broker.address}") as conn:
        conn.connect()
        hub = Hub()
        try:
            conn.transport.register_with_event_loop(conn.connection, hub)
            assert conn.transport._wake_r in hub.readers
            assert conn.transport.polling_interval is None
            with Consumer(conn, [q], callbacks=[lambda body, m: (got.append(body), m.ack())]):
                Producer(conn).publish("hello", routing_key="hubq", declare=[q])
                import select
                readable, _, _ = select.select([conn.transport._wake_r], [], [], WAIT)
                assert readable, "the wake-up descriptor never became readable"
                conn.transport.on_readable(conn.connection)
                assert got == ["hello"]
        finally:
            hub.close()


def test_a_lost_broker_is_a_recoverable_connection_error(broker):
    with Connection(f"brokerd://{broker.address}") as conn:
        conn.connect()
        assert ConnectionLost in conn.recoverable_connection_errors
        c = Consumer(conn, [Queue("lostq", routing_key="lostq")], callbacks=[])
        c.consume()
        broker.kill()
        with pytest.raises(conn.recoverable_connection_errors):
            for _ in range(3):  # the wake-up for the lost connection arrives, then the error
                conn.drain_events(timeout=WAIT)


def test_purge_and_passive_declare_are_brokerds(broker):
    with Connection(f"brokerd://{broker.address}") as conn:
        p = Producer(conn)
        q = Queue("pq", routing_key="pq")
        for i in range(3):
            p.publish(i, routing_key="pq", declare=[q])
        ch = conn.default_channel
        assert ch.queue_declare("pq", passive=True).message_count == 3
        assert q(ch).purge() == 3
        from amqp import ChannelError
        with pytest.raises(ChannelError, match="no queue 'nope' in brokerd"):
            ch.queue_declare("nope", passive=True)


def test_a_forked_child_closing_its_copy_leaves_the_parents_connection_alone(broker):
    """Celery's prefork pool forks after connections exist (pool_grow, max_tasks_per_child) and the
    child closes what it inherited: that must not send a BYE or shut the shared socket down."""
    import os

    with Connection(f"brokerd://{broker.address}") as conn:
        conn.connect()
        client = conn.transport.brokerd
        client.declare("forkq")
        pid = os.fork()
        if pid == 0:  # the child: close the inherited connection as Celery's after-fork hook does
            code = 0
            try:
                conn.close()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's connection still answers, with its own replies
        assert client.stats("forkq")["ready"] == 0
        Producer(conn).publish("after fork", routing_key="forkq")
        assert client.stats("forkq")["ready"] == 1


def test_bindings_are_brokerds_and_direct_routing_keeps_its_fast_path(broker):
    """A direct binding of a queue's own name stays out of brokerd (PUBLISH by name reaches it); any
    other binding is a BIND, temporary for an auto_delete queue, gone with its connection; a fanout
    publish is an EMIT that reaches a queue another connection bound."""
    def bindings(exchange):
        text = broker.admin(f"BINDINGS {exchange}\n")
        return [] if text.startswith("ERR") else [line.split() for line in text.splitlines()[2:-1]]

    work = Queue("fastq", Exchange("fastx", type="direct"), routing_key="fastq")
    bcast = Queue("bq.1", Exchange("bx", type="fanout"), auto_delete=True)
    got = []
    with Connection(f"brokerd://{broker.address}") as a, Connection(f"brokerd://{broker.address}") as b:
        work(a.default_channel).declare()
        assert bindings("fastx") == []  # the fast path: nothing to bind
        with Consumer(a, [bcast], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            assert bindings("bx") == [["bq.1", "-", "yes"]]
            # another connection that never saw the binding: its publish is brokerd's EMIT
            Producer(b).publish("to all", exchange=Exchange("bx", type="fanout"), declare=[Exchange("bx", type="fanout")])
            Producer(b).publish("by name", exchange=Exchange("fastx", type="direct"), routing_key="fastq",
                                declare=[Exchange("fastx", type="direct")])
            a.drain_events(timeout=WAIT)
            assert got == ["to all"]
        assert b.transport.brokerd.stats("fastq")["ready"] == 1  # nothing bound: the key named the queue
    # the temporary queue and its binding go with connection a (once brokerd has seen it close)
    import time
    deadline = time.monotonic() + WAIT
    while bindings("bx") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bindings("bx") == []
    assert "bq.1" not in broker.admin("QUEUES\n")
