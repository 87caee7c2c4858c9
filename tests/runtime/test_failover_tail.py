"""A brokerd that led, then followed, then leads again serves its followers (issue 16; found by
bench/failover_soak.py): the in-memory tail of the log that followers are read from
(Durability.recent) has no hole where it followed, and never serves records a truncation cut.

Before the fix, a follower's applied records were not kept in that tail, so after a lead ->
follow -> lead the tail skipped lsns; a new follower asking from the promotion's lsn got an
empty answer, forever: the follower never caught up and, with --sync-replicas 1, no publish on
the new leader was ever confirmed.

Two brokerds in this process (broker.boot.open_server, the real start-up path) on loopback with
real data dirs, driven through server.roles as the election helper drives them.
"""

from __future__ import annotations

import trio

from broker.runtime.durability import Durability
from client import wire
from tests.runtime.test_roles import depth, publish, start, until


async def test_a_leader_that_followed_in_between_serves_a_new_follower_from_its_promotion(tmp_path, nursery):
    a = await start(nursery, tmp_path / "a")
    b = await start(nursery, tmp_path / "b", follow=f"127.0.0.1:{a.port}")
    ok = lambda replies: all(r[0] == wire.OP_OK for r in replies)  # noqa: E731
    assert ok(await trio.to_thread.run_sync(publish, a.port, "q", ["m1"]))
    await until(lambda: b.roles.last_lsn() == a.roles.last_lsn(), "B to follow A")

    # B leads (its tail in memory holds what it writes), A follows it
    await b.roles.promote("won the lease")
    assert ok(await trio.to_thread.run_sync(publish, b.port, "q", ["b1"]))
    await a.roles.follow(f"127.0.0.1:{b.port}", "B leads")
    await until(lambda: a.roles.last_lsn() == b.roles.last_lsn() and a.follower.connected, "A to follow B")

    # A leads; B steps down and follows it: the records B applies now are A's
    await a.roles.promote("B's lease ran out")
    await b.roles.follow(f"127.0.0.1:{a.port}", "A leads")
    assert ok(await trio.to_thread.run_sync(publish, a.port, "q", ["a1", "a2", "a3"]))
    await until(lambda: b.roles.last_lsn() == a.roles.last_lsn() and b.follower.connected, "B to follow A")

    # B leads again; A, asking from B's new epoch record, must get it and what follows
    await b.roles.promote("A's lease ran out")
    await a.roles.follow(f"127.0.0.1:{b.port}", "B leads again")
    assert ok(await trio.to_thread.run_sync(publish, b.port, "q", ["b2"]))
    # (the log is on disk a moment before the batch is applied: wait for the state too)
    await until(lambda: a.roles.last_lsn() == b.roles.last_lsn() == a.state.last_lsn and a.roles.epoch == b.roles.epoch,
                "A to catch up with B's third term (it hung here: B served it nothing)")
    lsns = [r[0] for r in b.wal.recent]
    assert lsns == list(range(lsns[0], lsns[0] + len(lsns))), "the tail in memory has a hole"
    assert depth(a, "q") == depth(b, "q") == 6  # m1, b1, a1-a3, b2 (A is a standby: counted, not placed)
    nursery.cancel_scope.cancel()


async def test_the_tail_in_memory_never_serves_a_record_the_log_cut(tmp_path):
    """A deposed leader's unconfirmed tail is cut from the log; the same lsns are then written
    anew: records_from answers with the new records, never the cut ones."""
    from broker.config import Config
    from broker.state.core import BrokerState
    from broker.wal.log import WriteAheadLog

    wal = WriteAheadLog(str(tmp_path), fsync="never")
    list(wal.open())
    dur = Durability(wal, BrokerState(), Config(port=0, data_dir=str(tmp_path)))
    for lsn in range(1, 6):
        dur._remember(lsn, 1, b"old%d" % lsn)
    dur.forget_after(3)  # what a follower's truncation does
    dur._remember(4, 1, b"new4")
    assert [r[2] for r in dur.recent] == [b"old1", b"old2", b"old3", b"new4"]
    # a hole (the log restarted at a later lsn) starts the tail over instead of misnumbering it
    dur._remember(9, 1, b"nine")
    assert [r[0] for r in dur.recent] == [9]


async def test_a_followers_acks_and_heartbeats_never_send_at_once_on_its_one_stream(tmp_path, nursery, monkeypatch):
    """Under load an ack and a heartbeat met on the follower's stream to the leader; trio refused
    the second send (BusyResourceError: "another task is currently sending"), the link dropped
    and with it the follower's place in --sync-replicas (publishes refused NOT_ENOUGH_REPLICAS).
    Found by bench/core.py --followers 2.  A stream that, like trio's, refuses overlapping sends."""
    import broker.runtime.replication as replication

    a = await start(nursery, tmp_path / "a")
    b = await start(nursery, tmp_path / "b", follow=f"127.0.0.1:{a.port}")
    await until(lambda: b.follower.connected, "B to follow A")
    sends = []

    class SlowStream:  # each send takes a while, as to a busy leader; an overlap raises as trio's does
        busy = False

        async def send_all(self, data):
            if self.busy:
                raise trio.BusyResourceError("another task is currently sending data on this SocketStream")
            self.busy = True
            try:
                await trio.sleep(0.005)
                sends.append(data)
            finally:
                self.busy = False

    monkeypatch.setattr(replication, "FOLLOWER_HEARTBEAT", 0.001)  # a heartbeat due at every ack
    stream = SlowStream()
    epoch = b.state.epoch
    async with trio.open_nursery() as inner:
        inner.start_soon(b.follower._heartbeats, stream)
        for _ in range(50):  # an empty batch: only its ack is sent
            await b.follower._apply(stream, [wire.OP_RECORDS, b.roles.last_lsn(), [], epoch])
        inner.cancel_scope.cancel()
    assert len(sends) >= 50
    nursery.cancel_scope.cancel()
