"""The blocking ``Client`` against a real brokerd process (tests/conftest.py fixtures).

No sleeps: ordering is made certain with round trips on the same connection
(the broker answers each connection's requests in order, and the deliveries a
request causes are queued before the replies to later requests), and
``Consumer.get(timeout)`` waits for what must come.  Timeouts here are only
upper bounds for a broken build, never measurements.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest

from client import (
    Client,
    ConnectionClosed,
    ConnectionLost,
    NotFound,
    PreconditionFailed,
    PublishError,
    QueueFull,
    StaleDelivery,
    Timeout,
)
from client.errors import BadRequest

WAIT = 10.0  # seconds; an upper bound for something that must happen


def barrier(c):
    """Return once every frame the broker sent ``c`` before now has been received.

    A confirmed publish, not a PING: under fsync=always the broker holds a
    batch's frames until its log record is on disk, but sends the reply to a
    request that wrote no record (PING, STATS) at once, so a PING reply can
    overtake deliveries queued before it.  A publish's confirm is released in
    log order, behind them.  (Reported to the lead: broker/server.py _flush.)
    """
    c.publish("test.barrier", b"")


def get(consumer, timeout=WAIT):
    d = consumer.get(timeout)
    assert d is not None, "no delivery arrived"
    return d


def test_publish_then_consume_round_trips_every_delivery_field(broker):
    with Client(broker.address, name="t") as c:
        mid = c.publish("rt", b"\x00body\xff", priority=7, headers={"trace": "abc", "n": 1}, id="msg-1")
        assert mid == "msg-1"
        consumer = c.consume(["rt"], prefetch=1)
        d = get(consumer)
        assert d.body == b"\x00body\xff"
        assert d.queue == "rt"
        assert d.id == "msg-1"
        assert d.priority == 7
        assert d.headers == {"trace": "abc", "n": 1}
        assert d.attempts == 1 and d.redelivered is False
        assert isinstance(d.tag, int) and d.consumer == consumer.tag
        d.ack(wait=True)
        assert c.stats("rt")["acked"] == 1


def test_client_generated_ids_are_unique_and_returned(broker):
    with Client(broker.address) as c:
        ids = [c.publish("ids", b"x", confirm=False) for _ in range(200)]
        ids.append(c.publish("ids", b"x"))
        c.wait_for_confirms()
        assert len(set(ids)) == len(ids)
        consumer = c.consume("ids", prefetch=500)
        got = [get(consumer).id for _ in ids]
        assert got == ids  # and FIFO for one thread's publishes


def test_a_prefetch_1_consumer_sees_priority_order_then_fifo_within_a_priority(broker):
    with Client(broker.address) as c:
        sent = [(0, "a"), (5, "b"), (0, "c"), (5, "d"), (9, "e"), (0, "f")]
        for prio, body in sent:
            c.publish("prio", body.encode(), priority=prio)
        consumer = c.consume(["prio"], prefetch=1)
        seen = []
        for _ in sent:
            d = get(consumer)
            seen.append(d.body.decode())
            d.ack()
        assert seen == ["e", "b", "d", "a", "c", "f"]


def test_pipelined_publishes_are_all_confirmed_by_wait_for_confirms(broker):
    with Client(broker.address) as c:
        ids = [c.publish("pipe", b"%d" % i, confirm=False) for i in range(2000)]
        c.wait_for_confirms(timeout=WAIT)
        assert c.stats("pipe")["ready"] == 2000
        assert len(set(ids)) == 2000
        c.wait_for_confirms()  # nothing outstanding: returns at once


def test_a_refused_confirmed_publish_raises_queue_full(broker):
    with Client(broker.address) as c:
        c.declare("full", max_length=1, overflow="reject")
        c.publish("full", b"1")
        with pytest.raises(QueueFull, match=r"^QUEUE_FULL: queue 'full' is full"):
            c.publish("full", b"2")
        c.ping()  # the connection stays usable


def test_wait_for_confirms_names_the_refused_pipelined_publish(broker):
    with Client(broker.address) as c:
        c.declare("full", max_length=1, overflow="reject")
        first = c.publish("full", b"1", confirm=False)
        second = c.publish("full", b"2", confirm=False)
        with pytest.raises(PublishError) as info:
            c.wait_for_confirms(timeout=WAIT)
        assert info.value.ids == [second]
        assert isinstance(info.value.failures[0][1], QueueFull)
        assert first not in info.value.ids
        c.wait_for_confirms()  # reported once


def test_ack_settles_the_delivery(broker):
    with Client(broker.address) as c:
        c.publish("acks", b"x")
        consumer = c.consume("acks", prefetch=5)
        get(consumer).ack()
        s = c.stats("acks")  # the batched ack goes out (and is applied) before the STATS
        assert (s["acked"], s["inflight"], s["ready"]) == (1, 0, 0)


def test_nack_with_requeue_redelivers_with_attempts_raised(broker):
    with Client(broker.address) as c:
        c.publish("nq", b"x", id="m")
        consumer = c.consume("nq", prefetch=1)
        get(consumer).nack(requeue=True)
        d = get(consumer)
        assert (d.id, d.attempts, d.redelivered) == ("m", 2, True)


def test_nack_with_delay_holds_the_message_in_the_broker_then_redelivers_it(broker):
    with Client(broker.address) as c:
        c.publish("nd", b"x", id="m")
        consumer = c.consume("nd", prefetch=1)
        get(consumer).nack(requeue=True, delay=0.2)
        assert c.stats("nd")["delayed"] == 1
        d = get(consumer)
        assert (d.id, d.attempts) == ("m", 2)


def test_nack_without_requeue_dead_letters(broker):
    with Client(broker.address) as c:
        c.publish("nr", b"x")
        consumer = c.consume("nr", prefetch=1)
        get(consumer).nack(requeue=False)
        assert c.stats("nr")["dead"] == 1


def test_touch_returns_the_reservation_timeout(broker):
    with Client(broker.address) as c:
        c.declare("tt", reserve_timeout=30)
        c.publish("tt", b"x")
        c.publish("plain", b"x")
        d = get(c.consume("tt", prefetch=1))
        assert d.touch() == 30
        assert get(c.consume("plain", prefetch=1)).touch() is None


def test_an_ack_after_the_broker_took_the_delivery_back_raises_stale_delivery(broker):
    with Client(broker.address) as c:
        c.declare("rt2", reserve_timeout=0.2)
        c.publish("rt2", b"x", id="m")
        consumer = c.consume("rt2", prefetch=1)
        first = get(consumer)
        again = get(consumer)  # the reservation ran out: the broker delivered it again
        assert (again.id, again.attempts) == ("m", 2)
        with pytest.raises(StaleDelivery, match=f"^STALE_DELIVERY: delivery {first.tag} is not in flight"):
            first.ack(wait=True)
        again.ack(wait=True)
        with pytest.raises(StaleDelivery):
            again.ack()  # twice: refused locally


def test_a_consumer_never_holds_more_unacked_deliveries_than_its_prefetch(broker):
    with Client(broker.address) as c:
        for i in range(20):
            c.publish("pf", b"%d" % i, confirm=False)
        c.wait_for_confirms()
        consumer = c.consume("pf", prefetch=3)
        acked = 0
        max_unacked = 0
        while acked < 20:
            barrier(c)  # acks batched so far go out first; every delivery sent before it is received
            unacked = consumer.received - acked
            max_unacked = max(max_unacked, unacked)
            assert unacked <= 3
            d = get(consumer)
            if d.tag % 2 == 0:
                d.ack()
                acked += 1
            else:  # hold it across one more round trip
                barrier(c)
                assert consumer.received - acked <= 3
                d.ack()
                acked += 1
        assert max_unacked == 3
        assert consumer.received == 20


def test_a_second_consumer_of_the_same_queue_gets_a_fair_share(broker):
    with Client(broker.address) as a, Client(broker.address) as b, Client(broker.address) as p:
        ca = a.consume("fair", prefetch=100)
        cb = b.consume("fair", prefetch=100)
        for i in range(100):
            p.publish("fair", b"%d" % i, confirm=False)
        p.wait_for_confirms()
        barrier(a)
        barrier(b)  # both have received everything the broker sent them
        na, nb = ca.received, cb.received
        assert na + nb == 100
        assert 40 <= na <= 60 and 40 <= nb <= 60


def test_closing_a_client_returns_its_unacked_messages_redelivered(broker):
    first = Client(broker.address)
    first.publish("ret", b"x", id="m")
    d = get(first.consume("ret", prefetch=1))
    assert d.attempts == 1
    first.close()
    with Client(broker.address) as second:
        again = get(second.consume("ret", prefetch=1))
        assert (again.id, again.redelivered, again.attempts) == ("m", True, 2)


def test_cancel_gives_back_deliveries_not_yet_handed_out(broker):
    with Client(broker.address) as c:
        for i in range(5):
            c.publish("cx", b"%d" % i)
        consumer = c.consume("cx", prefetch=5)
        d = get(consumer)
        barrier(c)  # the other four are buffered locally
        assert consumer.received == 5
        consumer.cancel()
        assert consumer.get(0) is None and list(consumer) == []
        s = c.stats("cx")
        assert (s["ready"], s["inflight"], s["consumers"]) == (4, 1, 0)
        d.ack(wait=True)


def test_one_client_is_safe_to_share_between_8_threads(broker):
    with Client(broker.address) as c:
        results: list[list[str]] = [[] for _ in range(8)]
        errors = []

        def work(i):
            try:
                for n in range(500):
                    results[i].append(c.publish("threads", b"%d-%d" % (i, n)))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        ids = [mid for r in results for mid in r]
        assert len(ids) == 4000 and len(set(ids)) == 4000
        assert c.stats("threads")["ready"] == 4000


def test_killing_the_broker_raises_connection_lost(broker):
    c = Client(broker.address, reconnect=0)  # reconnect=0: no 30 s of reconnecting first (tests/e2e/test_failover.py)
    consumer = c.consume("k", prefetch=1)
    broker.kill()
    with pytest.raises(ConnectionLost) as info:
        consumer.get(WAIT)
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(ConnectionLost):
        c.publish("k", b"x")
    c.close()


def test_a_closed_client_refuses_new_calls(broker):
    c = Client(broker.address)
    c.close()
    c.close()  # idempotent
    with pytest.raises(ConnectionClosed):
        c.publish("q", b"x")


def test_queue_management_verbs(broker):
    with Client(broker.address) as c:
        opts = c.declare("mgmt", max_attempts=3, reserve_timeout=5)
        assert opts == {"dead_letter": None, "max_attempts": 3, "reserve_timeout": 5.0, "max_length": None, "overflow": "reject"}
        assert c.declare("mgmt", max_attempts=3, reserve_timeout=5) == opts
        with pytest.raises(PreconditionFailed):
            c.declare("mgmt", max_attempts=4)
        for _ in range(3):
            c.publish("mgmt", b"x")
        assert c.purge("mgmt") == 3
        c.pause("mgmt")
        c.publish("mgmt", b"y")
        consumer = c.consume("mgmt", prefetch=1)
        barrier(c)
        assert consumer.received == 0  # paused: nothing delivered
        c.resume("mgmt")
        get(consumer).ack(wait=True)
        consumer.cancel()
        assert c.delete("mgmt") == 0
        with pytest.raises(NotFound):
            c.stats("mgmt")
        assert "queues" in c.stats() and "broker" in c.stats()
        assert c.admin("QUEUES").startswith("OK ")
        with pytest.raises(BadRequest):
            c.admin("NO-SUCH-COMMAND")
        assert c.ping() >= 0


@contextlib.contextmanager
def frozen(broker):
    """The broker process stopped (SIGSTOP) for the duration: it reads and sends nothing."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


def test_heartbeats_keep_an_idle_connection_open(broker):
    with Client(broker.address, heartbeat=0.2) as c:
        consumer = c.consume("idle", prefetch=1)
        assert consumer.get(timeout=0.6) is None  # idle for three intervals
        assert c.is_open
        c.ping()


def test_a_silent_broker_is_declared_lost_after_two_heartbeat_intervals(broker):
    with Client(broker.address, heartbeat=0.2) as c:
        consumer = c.consume("silent", prefetch=1)
        with frozen(broker):
            with pytest.raises(ConnectionLost, match="^HEARTBEAT_TIMEOUT: "):
                consumer.get(WAIT)


def test_a_reply_slower_than_the_timeout_raises_timeout_and_the_client_stays_usable(broker):
    with Client(broker.address, heartbeat=0, timeout=0.3) as c:
        with frozen(broker):
            with pytest.raises(Timeout):
                c.ping()
        c.timeout = WAIT
        c.ping()
        assert c.is_open


def test_a_broker_shutting_down_says_why(broker):
    c = Client(broker.address)
    consumer = c.consume("bye", prefetch=1)
    broker.terminate()
    with pytest.raises(ConnectionLost, match="^SHUTTING_DOWN: "):
        consumer.get(WAIT)
    c.close()


def test_a_pipelining_caller_drives_the_connection_through_public_calls_only(broker):
    """What the worker needs (submit without waiting, flush once, wake on deliveries,
    learn why the connection ended), with no private attribute."""
    from client import verbs

    with Client(broker.address) as c:
        consumer = c.consume("pipe.q", prefetch=4)
        woken = threading.Event()
        consumer.on_wake(woken.set)
        c.publish("pipe.q", b"one")
        assert woken.wait(WAIT), "on_wake was not called when the delivery arrived"
        assert len(consumer.buffer) == 1
        d = consumer.get(WAIT)
        assert d.body == b"one"
        done = threading.Semaphore(0)
        p = c.submit(verbs.store_result(c, "pipe-1", "SUCCESS", 1, None, delivery=d), done)
        assert not done.acquire(timeout=0)  # buffered, not sent: nothing can have answered
        c.flush()
        assert done.acquire(timeout=WAIT)
        assert p.error is None and p.result == {"acked": True}
        assert c.get_result("pipe-1")["result"] == 1
        assert c.fileno() >= 0
        assert c.wait_closed(timeout=0.01) is None  # still open
    assert isinstance(c.wait_closed(WAIT), ConnectionClosed)
