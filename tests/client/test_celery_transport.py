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
