"""When a follower counts as in sync for --sync-replicas (broker/runtime/replication.py
LeaderReplication._check_sync), with the leader's log and the follower's link faked.

A follower counts once it has on disk everything the leader had written when some batch was sent
to it whole (it is then one round trip behind).  The leader's log end *at the moment of the ack*
is the wrong bar: while writes never pause (consumers draining a backlog after a failover ack
without a break) the end moves during every round trip, the follower never counts, and every
confirm is refused with NOT_ENOUGH_REPLICAS for as long as the drain lasts.
"""

from __future__ import annotations

from types import SimpleNamespace

import trio

from broker.runtime.replication import LeaderReplication


class FakeLog:
    def __init__(self):
        self.written_lsn = 0
        self.wrote = trio.Event()

    def write(self, n: int) -> None:
        self.written_lsn += n
        self.wrote.set()
        self.wrote = trio.Event()

    def segments(self) -> list:
        return []  # nothing compacted away: no kept_from to tell the follower


class FakeDurability:
    def __init__(self, log: FakeLog, batch: int):
        self.wal = log
        self.batch = batch  # the most records one batch carries (MAX_BATCH_BYTES, in records)

    async def wait_written(self, lsn: int) -> None:
        while self.wal.written_lsn <= lsn:
            await self.wal.wrote.wait()

    async def records_from(self, first: int, last: int, max_bytes: int) -> list:
        return [(lsn, 1, b"x") for lsn in range(first, min(last, first + self.batch - 1) + 1)]


class FakeConn:
    id = 7
    peer = "127.0.0.1:1"
    closed = False
    out_bytes = 0

    def __init__(self):
        self.frames = 0

    def queue_bytes(self, data: bytes) -> None:
        self.frames += 1


def leader(batch: int):
    log = FakeLog()
    server = SimpleNamespace(wal=FakeDurability(log, batch), state=SimpleNamespace(epoch=1),
                             config=SimpleNamespace(output_buffer=1 << 30), replica_alarm=None)
    repl = LeaderReplication(server, 1)
    conn = FakeConn()
    link = {"peer": conn.peer, "acked": 0, "sent": 0, "in_sync": False, "caught_up_at": 0.0, "tail_mark": None}
    repl.links[conn.id] = link
    return repl, log, conn, link


async def settle():
    for _ in range(5):
        await trio.sleep(0)


async def test_a_follower_one_round_trip_behind_counts_while_the_leader_keeps_writing(nursery):
    repl, log, conn, link = leader(batch=1000)
    log.write(5)
    nursery.start_soon(repl._send, conn, link)
    await settle()
    assert link["sent"] == 5  # the whole log went in one batch
    assert repl.server.replica_alarm  # nobody in sync yet: confirms are refused
    log.write(3)  # the leader writes on (an ack, a delivery) before the follower's ack comes back
    await settle()
    link["acked"] = 5  # the follower's REPLICA_ACK for that first batch
    repl._check_sync(conn, link)
    assert link["in_sync"], "a follower one round trip behind a busy leader never counted"
    assert repl.in_sync() == 1 and repl.server.replica_alarm is None
    assert repl.replica_lsn() == 5  # confirms still wait for their own lsn on its disk
    conn.closed = True
    log.write(1)


async def test_a_follower_still_catching_up_does_not_count(nursery):
    repl, log, conn, link = leader(batch=3)  # a follower far behind gets the log in pieces
    log.write(10)
    nursery.start_soon(repl._send, conn, link)
    await settle()
    assert link["sent"] == 10 and link["tail_mark"] == 10  # 1-3, 4-6, 7-9 in pieces, then 10: the tail
    link["acked"] = 6  # it has the first two pieces only
    repl._check_sync(conn, link)
    assert not link["in_sync"] and repl.server.replica_alarm
    link["acked"] = 10
    repl._check_sync(conn, link)
    assert link["in_sync"]
    conn.closed = True
    log.write(1)
