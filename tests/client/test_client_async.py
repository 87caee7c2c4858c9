"""``AsyncClient`` against a real brokerd, under trio (pytest-trio) and under asyncio.

Each scenario is written once as a coroutine and run twice: as an ``async``
test by pytest-trio (trio_mode), and inside ``asyncio.run`` from a plain test,
so the two event-loop shells are held to the same promises.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import sniffio

from client import (
    AsyncClient,
    BadRequest,
    ConnectionClosed,
    ConnectionLost,
    NotFound,
    PreconditionFailed,
    PublishError,
    QueueFull,
    StaleDelivery,
)

WAIT = 10.0  # seconds; an upper bound for something that must happen


async def get(consumer, timeout=WAIT):
    d = await consumer.get(timeout)
    assert d is not None, "no delivery arrived"
    return d


async def barrier(c):
    """Every frame the broker sent ``c`` before now has been received (see test_client_sync.barrier)."""
    await c.publish("test.barrier", b"")


async def gather(*fns):
    """Run coroutine functions concurrently under whichever library is running."""
    if sniffio.current_async_library() == "trio":
        import trio

        async with trio.open_nursery() as nursery:
            for fn in fns:
                nursery.start_soon(fn)
    else:
        await asyncio.gather(*(fn() for fn in fns))


# --- scenarios ------------------------------------------------------------------------------
async def round_trip_every_field(broker):
    async with AsyncClient(broker.address, name="t") as c:
        assert c.library == sniffio.current_async_library()
        mid = await c.publish("rt", b"\x00body\xff", priority=7, headers={"trace": "abc"}, id="msg-1")
        assert mid == "msg-1"
        consumer = await c.consume(["rt"], prefetch=1)
        d = await get(consumer)
        assert (d.body, d.queue, d.id, d.priority, d.headers) == (b"\x00body\xff", "rt", "msg-1", 7, {"trace": "abc"})
        assert d.attempts == 1 and d.redelivered is False
        assert isinstance(d.tag, int) and d.consumer == consumer.tag
        await d.ack(wait=True)
        assert (await c.stats("rt"))["acked"] == 1


async def priority_then_fifo(broker):
    async with AsyncClient(broker.address) as c:
        sent = [(0, "a"), (5, "b"), (0, "c"), (5, "d"), (9, "e"), (0, "f")]
        for prio, body in sent:
            await c.publish("prio", body.encode(), priority=prio)
        seen = []
        async for d in c.consume(["prio"], prefetch=1):
            seen.append(d.body.decode())
            await d.ack()
            if len(seen) == len(sent):
                break
        assert seen == ["e", "b", "d", "a", "c", "f"]


async def pipelined_confirms(broker):
    async with AsyncClient(broker.address) as c:
        ids = [await c.publish("pipe", b"%d" % i, confirm=False) for i in range(2000)]
        await c.wait_for_confirms(timeout=WAIT)
        assert (await c.stats("pipe"))["ready"] == 2000
        assert len(set(ids)) == 2000
        consumer = await c.consume("pipe", prefetch=500)
        got = []
        for _ in ids:
            d = await get(consumer)
            got.append(d.id)
            await d.ack()
        assert got == ids  # FIFO for one task's publishes


async def refused_publish(broker):
    async with AsyncClient(broker.address) as c:
        await c.declare("full", max_length=1, overflow="reject")
        await c.publish("full", b"1")
        with pytest.raises(QueueFull, match=r"^QUEUE_FULL: queue 'full' is full"):
            await c.publish("full", b"2")
        await c.purge("full")
        await c.publish("full", b"1", confirm=False)
        second = await c.publish("full", b"2", confirm=False)
        with pytest.raises(PublishError) as info:
            await c.wait_for_confirms(timeout=WAIT)
        assert info.value.ids == [second]
        assert isinstance(info.value.failures[0][1], QueueFull)
        await c.wait_for_confirms()  # reported once


async def ack_nack_touch(broker):
    async with AsyncClient(broker.address) as c:
        await c.declare("ant", reserve_timeout=30)
        await c.publish("ant", b"x", id="m")
        consumer = await c.consume("ant", prefetch=1)
        d = await get(consumer)
        assert await d.touch() == 30
        await d.nack(requeue=True)
        d = await get(consumer)
        assert (d.id, d.attempts, d.redelivered) == ("m", 2, True)
        await d.nack(requeue=True, delay=0.2)
        assert (await c.stats("ant"))["delayed"] == 1
        d = await get(consumer)
        assert (d.id, d.attempts) == ("m", 3)
        await d.ack()
        s = await c.stats("ant")  # the batched ack is sent (and applied) first
        assert (s["acked"], s["inflight"], s["ready"], s["delayed"]) == (1, 0, 0, 0)
        await c.publish("ant", b"y")
        d = await get(consumer)
        await d.nack(requeue=False)
        assert (await c.stats("ant"))["dead"] == 1


async def stale_ack(broker):
    async with AsyncClient(broker.address) as c:
        await c.declare("rt2", reserve_timeout=0.2)
        await c.publish("rt2", b"x", id="m")
        consumer = await c.consume("rt2", prefetch=1)
        first = await get(consumer)
        again = await get(consumer)  # the reservation ran out: delivered again
        assert (again.id, again.attempts) == ("m", 2)
        with pytest.raises(StaleDelivery, match=f"^STALE_DELIVERY: delivery {first.tag} is not in flight"):
            await first.ack(wait=True)
        await again.ack(wait=True)


async def prefetch_bound(broker):
    async with AsyncClient(broker.address) as c:
        for i in range(20):
            await c.publish("pf", b"%d" % i, confirm=False)
        await c.wait_for_confirms()
        consumer = await c.consume("pf", prefetch=3)
        acked = 0
        max_unacked = 0
        while acked < 20:
            await barrier(c)
            unacked = consumer.received - acked
            max_unacked = max(max_unacked, unacked)
            assert unacked <= 3
            d = await get(consumer)
            await d.ack()
            acked += 1
        assert max_unacked == 3 and consumer.received == 20


async def fair_share(broker):
    async with AsyncClient(broker.address) as a, AsyncClient(broker.address) as b, AsyncClient(broker.address) as p:
        ca = await a.consume("fair", prefetch=100)
        cb = await b.consume("fair", prefetch=100)
        for i in range(100):
            await p.publish("fair", b"%d" % i, confirm=False)
        await p.wait_for_confirms()
        await barrier(a)
        await barrier(b)
        assert ca.received + cb.received == 100
        assert 40 <= ca.received <= 60 and 40 <= cb.received <= 60


async def close_returns_unacked(broker):
    async with AsyncClient(broker.address) as first:
        await first.publish("ret", b"x", id="m")
        d = await get(await first.consume("ret", prefetch=1))
        assert d.attempts == 1
    async with AsyncClient(broker.address) as second:
        again = await get(await second.consume("ret", prefetch=1))
        assert (again.id, again.redelivered, again.attempts) == ("m", True, 2)
    with pytest.raises(ConnectionClosed):
        await first.publish("ret", b"x")


async def concurrent_tasks(broker):
    async with AsyncClient(broker.address) as c:
        results: list[list[str]] = [[] for _ in range(8)]

        def worker(i):
            async def run():
                for n in range(250):
                    results[i].append(await c.publish("tasks", b"%d-%d" % (i, n)))
            return run

        await gather(*(worker(i) for i in range(8)))
        ids = [mid for r in results for mid in r]
        assert len(ids) == 2000 and len(set(ids)) == 2000
        assert (await c.stats("tasks"))["ready"] == 2000


async def broker_killed(broker):
    async with AsyncClient(broker.address) as c:
        consumer = await c.consume("k", prefetch=1)
        broker.kill()
        with pytest.raises(ConnectionLost) as info:
            await consumer.get(WAIT)
        assert isinstance(info.value, ConnectionError)
        with pytest.raises(ConnectionLost):
            await c.publish("k", b"x")


async def management_verbs(broker):
    async with AsyncClient(broker.address) as c:
        opts = await c.declare("mgmt", max_attempts=3)
        assert opts["max_attempts"] == 3
        with pytest.raises(PreconditionFailed):
            await c.declare("mgmt", max_attempts=4)
        await c.publish("mgmt", b"x")
        assert await c.purge("mgmt") == 1
        await c.pause("mgmt")
        await c.publish("mgmt", b"y")
        async with c.consume("mgmt", prefetch=1) as consumer:
            await barrier(c)
            assert consumer.received == 0  # paused
            await c.resume("mgmt")
            await (await get(consumer)).ack(wait=True)
        assert await c.delete("mgmt") == 0
        with pytest.raises(NotFound):
            await c.stats("mgmt")
        assert (await c.admin("QUEUES")).startswith("OK ")
        with pytest.raises(BadRequest):
            await c.admin("NO-SUCH-COMMAND")
        assert await c.ping() >= 0


async def heartbeats(broker):
    async with AsyncClient(broker.address, heartbeat=0.2) as c:
        consumer = await c.consume("idle", prefetch=1)
        assert await consumer.get(timeout=0.6) is None  # idle for three intervals
        assert c.is_open
        await c.ping()
        os.kill(broker.proc.pid, signal.SIGSTOP)  # silent from now on
        try:
            with pytest.raises(ConnectionLost, match="^HEARTBEAT_TIMEOUT: "):
                await consumer.get(WAIT)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)


async def errors_leave_the_block_unwrapped(broker):
    with pytest.raises(NotFound):  # not an ExceptionGroup from the client's task group
        async with AsyncClient(broker.address) as c:
            await c.stats("no-such-queue")
    assert not c.is_open


async def handlers_that_raise(broker, caplog):
    """A CONTROL or EVENT handler that raises is logged; the reader task goes on."""
    controls, batches = [], []

    def bad_control(payload):
        raise RuntimeError("boom in a control handler")

    def bad_events(events, dropped):
        raise RuntimeError("boom in an event handler")

    async def until(box, n):
        for _ in range(int(WAIT / 0.01)):
            if len(box) >= n:
                return
            await (trio_sleep() if sniffio.current_async_library() == "trio" else asyncio.sleep(0.01))
        raise AssertionError(f"only {len(box)} of {n} handler calls arrived")

    async with AsyncClient(broker.address, name="victim") as a, AsyncClient(broker.address, name="other") as b:
        a.control_handlers[:] = [bad_control, controls.append]
        consumer = await a.consume("handlers.q", prefetch=1)  # CONTROL broadcasts go to consuming connections
        await a.subscribe_events(bad_events)
        a.event_handlers.append(lambda events, dropped: batches.append(events))
        for round_ in (1, 2):
            assert await b.revoke([f"task-{round_}"], terminate=True) == 1
            await b.emit_events("w@test", [{"type": "task-received", "uuid": f"task-{round_}"}])
            await until(controls, round_)
            await until(batches, round_)
        assert await a.ping() >= 0  # the reader still reads replies
        assert a.is_open
        await consumer.cancel()
    logged = [r.getMessage() for r in caplog.records]
    assert logged.count("a CONTROL handler failed") == 2 and logged.count("an event handler failed") == 2
    assert [p["revoke"] for p in controls] == [["task-1"], ["task-2"]]


async def trio_sleep():
    import trio

    await trio.sleep(0.01)


async def task_verbs(broker):
    """The verbs AsyncClient once lacked, each answered by the broker."""
    async with AsyncClient(broker.address) as c:
        assert await c.store_result("av-1", "SUCCESS", {"n": 1}) == {"acked": False}
        got = await c.get_result("av-1")
        assert (got["state"], got["result"]) == ("SUCCESS", {"n": 1})
        assert await c.forget_result("av-1") is True
        assert await c.revoke(["av-2"]) == 1
        assert (await c.get_result("av-2"))["state"] == "REVOKED"
        await c.schedule_put("av-s", {"every": 3600, "queue": "av.q", "body": b"tick"})
        assert [s["name"] for s in await c.schedule_list() if s["name"] == "av-s"] == ["av-s"]
        assert (await c.schedule_pause("av-s"))["paused"] is True
        assert await c.schedule_remove("av-s") is True
        assert isinstance(await c.chord("av-c", ["m1"], {"queue": "av.q", "body": {"task": "t", "id": "b"}}), dict)
        assert await c.emit_events("av@test", [{"type": "worker-online"}]) == 1
        await c.subscribe_events()
        assert (await c.unsubscribe_events())["subscribed"] is False
        # exchanges and unique publishes (protocol.md §5.36-5.38, §5.2)
        await c.declare("av.tmp", temporary=True)
        assert await c.bind("av.fan", "av.tmp", "", type="fanout", temporary=True) is True
        assert (await c.emit("av.fan", "", b"b", id="av-e"))["queues"] == 1
        assert await c.unbind("av.fan", "av.tmp", "") is True
        assert (await c.publish_unique("av.q", b"u", "av-key", id="av-u1")) == {"id": "av-u1", "duplicate": False}
        assert (await c.publish_unique("av.q", b"u", "av-key")) == {"id": "av-u1", "duplicate": True}


# --- each scenario under both libraries -------------------------------------------------------
def under_both(scenario):
    async def trio_test(broker):
        await scenario(broker)

    def asyncio_test(broker):
        asyncio.run(scenario(broker))

    return trio_test, asyncio_test


def under_both_with_caplog(scenario):
    async def trio_test(broker, caplog):
        await scenario(broker, caplog)

    def asyncio_test(broker, caplog):
        asyncio.run(scenario(broker, caplog))

    return trio_test, asyncio_test


(
    test_the_reader_survives_control_and_event_handlers_that_raise_under_trio,
    test_the_reader_survives_control_and_event_handlers_that_raise_under_asyncio,
) = under_both_with_caplog(handlers_that_raise)
(
    test_results_revokes_schedules_chords_and_events_verbs_under_trio,
    test_results_revokes_schedules_chords_and_events_verbs_under_asyncio,
) = under_both(task_verbs)


(
    test_publish_then_consume_round_trips_every_delivery_field_under_trio,
    test_publish_then_consume_round_trips_every_delivery_field_under_asyncio,
) = under_both(round_trip_every_field)
(
    test_a_prefetch_1_consumer_sees_priority_order_then_fifo_under_trio,
    test_a_prefetch_1_consumer_sees_priority_order_then_fifo_under_asyncio,
) = under_both(priority_then_fifo)
(
    test_pipelined_publishes_are_confirmed_by_wait_for_confirms_under_trio,
    test_pipelined_publishes_are_confirmed_by_wait_for_confirms_under_asyncio,
) = under_both(pipelined_confirms)
(
    test_a_refused_publish_raises_queue_full_or_is_named_by_wait_for_confirms_under_trio,
    test_a_refused_publish_raises_queue_full_or_is_named_by_wait_for_confirms_under_asyncio,
) = under_both(refused_publish)
(
    test_ack_nack_requeue_nack_delay_and_touch_under_trio,
    test_ack_nack_requeue_nack_delay_and_touch_under_asyncio,
) = under_both(ack_nack_touch)
(
    test_an_ack_after_the_broker_took_the_delivery_back_raises_stale_delivery_under_trio,
    test_an_ack_after_the_broker_took_the_delivery_back_raises_stale_delivery_under_asyncio,
) = under_both(stale_ack)
(
    test_a_consumer_never_holds_more_unacked_deliveries_than_its_prefetch_under_trio,
    test_a_consumer_never_holds_more_unacked_deliveries_than_its_prefetch_under_asyncio,
) = under_both(prefetch_bound)
(
    test_a_second_consumer_of_the_same_queue_gets_a_fair_share_under_trio,
    test_a_second_consumer_of_the_same_queue_gets_a_fair_share_under_asyncio,
) = under_both(fair_share)
(
    test_closing_a_client_returns_its_unacked_messages_redelivered_under_trio,
    test_closing_a_client_returns_its_unacked_messages_redelivered_under_asyncio,
) = under_both(close_returns_unacked)
(
    test_one_client_is_safe_to_share_between_8_tasks_under_trio,
    test_one_client_is_safe_to_share_between_8_tasks_under_asyncio,
) = under_both(concurrent_tasks)
(
    test_killing_the_broker_raises_connection_lost_under_trio,
    test_killing_the_broker_raises_connection_lost_under_asyncio,
) = under_both(broker_killed)
(
    test_heartbeats_keep_an_idle_connection_open_and_a_silent_broker_is_lost_under_trio,
    test_heartbeats_keep_an_idle_connection_open_and_a_silent_broker_is_lost_under_asyncio,
) = under_both(heartbeats)
(
    test_an_error_leaves_the_async_with_block_as_itself_under_trio,
    test_an_error_leaves_the_async_with_block_as_itself_under_asyncio,
) = under_both(errors_leave_the_block_unwrapped)
(
    test_queue_management_verbs_under_trio,
    test_queue_management_verbs_under_asyncio,
) = under_both(management_verbs)


def test_importing_client_loads_no_event_loop_library():
    import subprocess
    import sys

    code = (
        "import sys, client, client.wire, client.errors, client.session; "
        "print(sorted(m for m in ('trio', 'asyncio', 'client.producer', 'client.async_client') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
