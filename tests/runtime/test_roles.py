"""server.roles, the runtime API the election helper drives (issue 16 items 3-4): promote, follow
(a step-down that cuts a divergent tail), fence; and a follower's refusal of an older epoch.

Two brokerds in this process (broker.boot.open_server, the real start-up path) on loopback with
real data dirs; clients are raw sockets in worker threads.
"""

from __future__ import annotations

import pytest
import trio

from broker.boot import open_server
from broker.config import Config
from broker.runtime.replication import FollowError
from broker.runtime.roles import RoleError
from client import wire
from client.wire import FrameReader
from tests.support.wireclient import Raw

WAIT = 15.0  # seconds any wait here may take at most


async def start(nursery, data_dir, **kw):
    server = open_server(Config(port=0, http_port=0, data_dir=str(data_dir), heartbeat=0, **kw))
    await nursery.start(server.serve)
    return server


async def until(pred, what: str):
    with trio.fail_after(WAIT):
        while not pred():
            await trio.sleep(0.01)


def publish(port: int, queue: str, ids) -> list:
    c = Raw(port)
    try:
        return [c.call(wire.OP_PUBLISH, queue, b"x", i, 0, None) for i in ids]
    finally:
        c.close()


def depth(server, queue: str) -> int:
    q = server.state.queues.get(queue)
    return q.ready_count + q.delayed_count + q.inflight_count if q is not None else 0


async def test_promote_follow_and_fence_as_the_election_helper_calls_them(tmp_path, nursery):
    a = await start(nursery, tmp_path / "a")
    b = await start(nursery, tmp_path / "b", follow=f"127.0.0.1:{a.port}")
    assert (a.roles.role, b.roles.role) == ("leader", "follower")
    assert b.roles.leader_address == f"127.0.0.1:{a.port}" and a.roles.leader_address.endswith(f":{a.port}")
    replies = await trio.to_thread.run_sync(publish, a.port, "q", ["m1", "m2", "m3"])
    assert all(r[0] == wire.OP_OK for r in replies)
    await until(lambda: b.roles.last_lsn() == a.roles.last_lsn() and depth(b, "q") == 3, "B to catch up")
    assert b.state.standby  # a hot standby: nothing placed, the depths counted as records came

    # B wins the election
    assert await b.roles.promote("won the lease") == 1
    assert (b.roles.role, b.roles.epoch, b.state.standby) == ("leader", 1, False)
    with pytest.raises(RoleError, match="already the leader"):
        await b.roles.promote("again")
    # A has not heard yet: it confirms two more alone (an unconfirmed, divergent tail) ...
    replies = await trio.to_thread.run_sync(publish, a.port, "q", ["a1", "a2"])
    assert all(r[0] == wire.OP_OK for r in replies)
    replies = await trio.to_thread.run_sync(publish, b.port, "q", ["b1"])
    assert replies[0][0] == wire.OP_OK
    # ... then loses its lease and steps down to follow B
    await a.roles.follow(f"127.0.0.1:{b.port}", "lost the lease")
    assert a.roles.role == "follower" and a.roles.leader_address == f"127.0.0.1:{b.port}"
    f = (await trio.to_thread.run_sync(publish, a.port, "q", ["late"]))[0]
    assert f[0] == wire.OP_ERROR and f[2] == "NOT_LEADER" and f"127.0.0.1:{b.port}" in f[3], f
    await until(lambda: a.follower.truncated == 2, "A to cut its 2 unconfirmed records")
    # (the log is on disk a moment before the batch is applied: wait for the state)
    await until(lambda: a.roles.last_lsn() == b.roles.last_lsn() == a.state.last_lsn and a.follower.connected,
                "A to follow B")
    assert a.roles.epoch == 1 and depth(a, "q") == depth(b, "q") == 4  # m1-m3 and b1, not a1, a2
    assert {m.id for m in b.state.live_messages()} == {"m1", "m2", "m3", "b1"}

    # B loses its lease: fenced at once, writes refused; it wins again at epoch 2, and A follows
    b.roles.fence("lease expired")
    assert b.roles.role == "follower" and b.roles.fenced and b.roles.leader_address is None
    f = (await trio.to_thread.run_sync(publish, b.port, "q", ["fenced"]))[0]
    assert f[0] == wire.OP_ERROR and f[2] == "NOT_LEADER" and "lease expired" in f[3], f
    assert await b.roles.promote("won the lease back") == 2
    assert (await trio.to_thread.run_sync(publish, b.port, "q", ["b2"]))[0][0] == wire.OP_OK
    await until(lambda: a.roles.epoch == 2 and depth(a, "q") == 5, "A to follow B's new term")
    # a standby at epoch 2 refuses records sent under an older term
    sent = []

    class Stream:
        async def send_all(self, data):
            sent.append(data)

    with pytest.raises(FollowError, match="STALE_EPOCH"):
        await a.follower._apply(Stream(), [wire.OP_RECORDS, 99, [], 1])
    reader = FrameReader()
    reader.feed(b"".join(sent))
    (err,) = reader.frames()
    assert err[0] == wire.OP_ERROR and err[2] == "STALE_EPOCH" and "epoch 1" in err[3], err
    # a kept_from past what the leader says it wrote (it would let this log delete records nothing
    # rewrote) or not an lsn is refused before anything is appended or deleted
    lsn = a.roles.last_lsn()
    for bad in (lsn + 50, "7", 0):
        with pytest.raises(FollowError, match="kept_from"):
            await a.follower._apply(Stream(), [wire.OP_RECORDS, lsn, [], 2, bad])
    assert a.roles.last_lsn() == lsn and a.wal.wal.segments()[0].first_lsn == 1
    nursery.cancel_scope.cancel()


async def test_held_confirms_are_refused_and_the_leader_fenced_once_its_election_lease_could_be_gone(tmp_path, nursery):
    """A leader under an election lease (the elector installs roles.guard_confirms) that was paused
    past the lease's fence time must not confirm the writes it had in hand when it resumes: another
    brokerd may lead by then.  The check is made where held replies go out, so it holds whichever
    task runs first after the pause: the publish is refused with NOT_LEADER and this brokerd fenced."""
    a = await start(nursery, tmp_path / "a")
    valid = [True]
    a.roles.guard_confirms(lambda: valid[0])
    ok = (await trio.to_thread.run_sync(publish, a.port, "q", ["m1"]))[0]
    assert ok[0] == wire.OP_OK, ok
    valid[0] = False  # the fence time has passed (the process was stopped past it)
    refused = (await trio.to_thread.run_sync(publish, a.port, "q", ["m2"]))[0]
    assert refused[0] == wire.OP_ERROR and refused[2] == "NOT_LEADER", refused
    assert "lease" in refused[3], refused
    assert a.roles.fenced and a.roles.role == "follower"
    later = (await trio.to_thread.run_sync(publish, a.port, "q", ["m3"]))[0]
    assert later[0] == wire.OP_ERROR and later[2] == "NOT_LEADER", later  # fenced: no more writes
    a.roles.guard_confirms(None)
    assert a.wal.lease_ok is None and a.wal.on_lease_lost is None


async def test_a_cut_below_where_the_compacted_log_starts_is_refused_naming_the_way_out(tmp_path):
    """A log compacted after the new leader's term began (a deposed leader's, or its follower's:
    followers delete what their leader compacted) cannot be cut back there: the follower says so
    and how to take the leader's snapshot, and its log is left as it was."""
    from types import SimpleNamespace

    from broker.runtime.replication import Follower
    from broker.wal.log import WriteAheadLog

    wal = WriteAheadLog(str(tmp_path), fsync="never")
    list(wal.open())
    wal.start_at(100)  # as after a snapshot or compaction: the log keeps lsn 100 on
    follower = Follower(SimpleNamespace(wal=SimpleNamespace(wal=wal)), "127.0.0.1:1")
    with pytest.raises(FollowError, match="keeps records from lsn 100 on .* empty this data directory"):
        await follower._truncate(40, 3)
    assert wal.segments()[0].first_lsn == 100 and wal.next_lsn == 100
    wal.close()


def _admin_after(sock, line: bytes) -> bytes:
    sock.sendall(line)
    sock.shutdown(2 - 1)  # SHUT_WR: what nc does at the end of its input
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    return out


async def test_a_step_down_leaves_a_connection_that_has_not_said_what_it_is_alone(tmp_path, nursery):
    """A connection accepted but not yet sniffed (no byte read: admin text or binary?) holds no
    consumer and no delivery: a step-down must not close it with a binary CLOSING, which an admin
    client (netcat, STATS) then reads as garbage (seen in the failover soak test under load)."""
    import socket

    a = await start(nursery, tmp_path / "a")
    b = await start(nursery, tmp_path / "b")
    sock = socket.create_connection(("127.0.0.1", b.port), timeout=WAIT)
    await until(lambda: len(b.conns) == 1, "B to accept the connection")
    await b.roles.follow(f"127.0.0.1:{a.port}", "lost the lease")
    reply = await trio.to_thread.run_sync(_admin_after, sock, b"STATS\n")
    text = reply.decode()  # admin text, not a binary frame
    assert "replication_leader" in text or "connections" in text, text[:200]
