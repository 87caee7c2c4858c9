"""Replication: a leader ships its write-ahead log to followers; a follower is a standby.

Leader (every brokerd): a connection that sends REPLICATE (protocol.md §5.40, the
``replicate`` grant) becomes a follower link.  The leader answers OK with where the
stream starts, then sends RECORDS frames: the records the log has written, with
their lsns, read from memory (Durability.recent) or, for a follower further
behind, from the segment files.  A follower older than the oldest kept segment
gets the log from that segment on: compaction has rewritten everything live
into the kept segments, so they are a snapshot followed by the tail.  The
follower answers with REPLICA_ACK frames carrying its fsynced lsn; with
``sync_replicas`` N > 0 a confirm waits for N followers' acks as well as the
local fsync (Durability.replica_lsn), and with fewer than N followers in sync
publishes are refused with NOT_ENOUGH_REPLICAS and confirms held at that moment
fail with it.

Follower (``--follow HOST:PORT``): connects, asks for the log from its own next
lsn (and says its epoch), appends every record with the same lsn to its own log,
fsyncs, applies the batch to its live state (a hot standby: ``BrokerState.standby_apply``,
the replay one batch at a time, so a promotion places the messages and replays
nothing) and acks.  Its admin reads (STATS, QUEUES, QUEUE) answer from that state.
It refuses every write with NOT_LEADER naming the leader.  It never writes a
record of its own (no compaction records, no ticker), so its log stays the
leader's, lsn for lsn.

A follower compacts by deleting only: the leader's compaction records are in its
log already (the rewritten copies have lsns like any other record), so what the
leader could delete the follower can too.  Each RECORDS frame says the first lsn
the leader's log still keeps (``kept_from``); once the follower has fsynced through
that frame's ``leader_lsn`` (every copy the leader wrote before deleting is then on
its disk), it deletes its own segments wholly before ``kept_from``.  Its log then
starts at or before the leader's: a replay from there gives the state a replay from
the leader's start gives (the records before it are older states of things whose
latest copy comes later), its lsns go on unchanged, and a promoted follower serves
its kept segments as a snapshot as the leader did.  So a follower's disk is bounded
as its leader's is, by the leader's trigger.

Epochs (broker/runtime/roles.py): RECORDS frames carry the leader's epoch; a
follower refuses records of an epoch older than its own (STALE_EPOCH), and a
leader refuses a follower that has seen a newer epoch than its own (it has been
deposed: it fences itself).  A follower whose log runs past the end of its epoch
in the leader's log (a deposed leader's unconfirmed tail) is told ``truncate_to``;
it cuts its log back there, rebuilds its standby state and asks again.
"""

from __future__ import annotations

import logging
import time

import cbor2
import trio

from broker.errors import NotLeader, StaleEpoch
from broker.state.replay import epoch_end
from client.wire import (
    OP_CLOSING,
    OP_ERROR,
    OP_HEARTBEAT,
    OP_OK,
    OP_RECORDS,
    OP_REPLICA_ACK,
    OP_REPLICATE,
    ClientHandshake,
    HEARTBEAT_FRAME,
    FrameReader,
    Hello,
    encode,
    error_frame,
    ok_frame,
    records_frame,
)

log = logging.getLogger("brokerd.replication")

# Bytes of records per RECORDS frame: well under the default max_frame (so a follower with
# defaults reads it), big enough that a catch-up of a large log takes few round trips.
MAX_BATCH_BYTES = 1024 * 1024  # bytes
# Seconds a follower waits before reconnecting to a leader it lost or could not reach.
RECONNECT_DELAY = 0.5  # seconds
# Seconds between a follower's heartbeats when no record arrives (the leader closes a
# connection silent for two heartbeat intervals).
FOLLOWER_HEARTBEAT = 2.0  # seconds
RECEIVE_BYTES = 256 * 1024  # bytes per read


# The admin lines a follower answers (from its replayed log); every other one changes
# state and gets NOT_LEADER.
FOLLOWER_ADMIN_READS = frozenset(("STATS", "QUEUES", "QUEUE", "HELP", "PING", "QUIT"))


def follower_may_read(line: str) -> bool:
    words = line.split()
    return bool(words) and words[0].upper() in FOLLOWER_ADMIN_READS


class LeaderReplication:
    """The followers of this brokerd, their durable lsns, and whether enough are in sync."""

    def __init__(self, server, sync_replicas: int):
        self.server = server
        self.sync_replicas = sync_replicas
        self.links: dict[int, dict] = {}  # connection id -> {"peer", "acked", "sent", "in_sync"}
        self._update_alarm()

    # -- what Durability asks -----------------------------------------------------------
    def replica_lsn(self) -> int:
        """The lsn that ``sync_replicas`` followers have fsynced (the N-th highest ack)."""
        n = self.sync_replicas
        if n <= 0:
            return 1 << 62
        acks = sorted((link["acked"] for link in self.links.values() if link["in_sync"]), reverse=True)
        return acks[n - 1] if len(acks) >= n else 0

    def in_sync(self) -> int:
        return sum(1 for link in self.links.values() if link["in_sync"])

    def _update_alarm(self) -> None:
        n = self.sync_replicas
        have = self.in_sync()
        if n > 0 and have < n:
            self.server.replica_alarm = (
                f"{have} of the {n} followers --sync-replicas needs are in sync; nothing can be confirmed "
                f"on {n + 1} disks, so the write was refused (start or reconnect a follower)"
            )
        else:
            self.server.replica_alarm = None

    def followers(self) -> list[dict]:
        """Each follower: its address, durable lsn, and lag in records and in seconds (how long
        since it last had everything this log had written: the oldest record it lacks is at most
        that old)."""
        written = self.server.wal.wal.written_lsn
        now = time.monotonic()
        out = []
        for link in self.links.values():
            behind = max(0, written - link["acked"])
            out.append({"address": link["peer"], "lsn": link["acked"], "lag_records": behind,
                        "lag_seconds": round(now - link["caught_up_at"], 3) if behind else 0.0,
                        "in_sync": link["in_sync"]})
        return out

    def statistics(self) -> dict:
        wal = self.server.wal.wal
        written = wal.written_lsn
        return {
            "role": "leader",
            "leader": self.server.roles.leader_address,
            "lsn": written,
            "sync_replicas": self.sync_replicas,
            "followers": len(self.links),
            "followers_in_sync": self.in_sync(),
            "follower_lag": max((written - link["acked"] for link in self.links.values()), default=0),
        }

    # -- one follower's connection ------------------------------------------------------
    async def serve(self, conn, reader: FrameReader, f: list) -> str:
        """Run a follower link on ``conn`` after its REPLICATE frame ``f``; returns why it ended."""
        srv = self.server
        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
        from_lsn = f[2] if len(f) > 2 else None
        durability = srv.wal
        if durability is None:
            return await _refuse(conn, rid, "BAD_REQUEST", "this brokerd has no log to replicate")
        if type(from_lsn) is not int or from_lsn < 1:
            return await _refuse(conn, rid, "BAD_REQUEST",
                                 f"REPLICATE field 2 must be the follower's next lsn, an integer >= 1 (got {from_lsn!r})")
        their_epoch = f[3] if len(f) > 3 else None
        if their_epoch is not None and (type(their_epoch) is not int or not 0 <= their_epoch < 1 << 63):
            return await _refuse(conn, rid, "BAD_REQUEST",
                                 f"REPLICATE field 3 must be the epoch of the follower's log, an integer >= 0 "
                                 f"(got {their_epoch!r})")
        wal = durability.wal
        if srv.follower is not None:
            return await _refuse(conn, rid, NotLeader.code,
                                 f"this brokerd follows {srv.follower.address}; replicate from the leader"
                                 if srv.follower.address else srv.follower.refusal())
        written = wal.written_lsn
        epoch = srv.state.epoch
        if their_epoch is not None and their_epoch > epoch:
            # Someone was promoted after this brokerd's term began: it is deposed.
            srv.roles.fence(f"a follower ({conn.peer}) has seen epoch {their_epoch}, newer than this "
                            f"leader's {epoch}: a newer leader exists")
            return await _refuse(conn, rid, StaleEpoch.code,
                                 f"this brokerd led epoch {epoch} but the follower has seen epoch {their_epoch}: "
                                 "this one is deposed and takes no more writes; follow the current leader")
        if their_epoch is not None and their_epoch < epoch:
            # Only at a term boundary: a follower ahead of this log within this same term means this
            # log lost records (the "diverged" refusal below), not that the follower must lose them.
            end = epoch_end(srv.state.epochs, their_epoch, written)
            if from_lsn - 1 > end:
                # The follower holds records past the end of its term in this log: written by a
                # deposed leader, never confirmed here.  It cuts them and asks again.
                conn.queue_bytes(encode(ok_frame(rid, {"truncate_to": end, "epoch": epoch, "leader_lsn": written})))
                log.info("follower on conn %d (%s): its log (epoch %d, to lsn %d) left this one after lsn %d; "
                         "told to truncate", conn.id, conn.peer, their_epoch, from_lsn - 1, end)
                return await _refuse(conn, None, "", "")
        if from_lsn > written + 1:
            return await _refuse(conn, rid, "BAD_REQUEST",
                                 f"the follower's log reaches lsn {from_lsn - 1} but the leader's ends at {written}: "
                                 "the logs diverged; empty the follower's data directory and start it again")
        first = wal.segments()[0].first_lsn
        start = from_lsn if from_lsn >= first else first
        conn.queue_bytes(encode(ok_frame(rid, {"start": start, "reset": start != from_lsn, "leader_lsn": written,
                                               "epoch": epoch})))
        link = {"peer": conn.peer, "acked": start - 1, "sent": start - 1, "in_sync": False,
                "caught_up_at": time.monotonic(), "tail_mark": None}
        self.links[conn.id] = link
        self._check_sync(conn, link)  # nothing to catch up: in sync at once
        log.info("follower on conn %d (%s) replicates from lsn %d%s", conn.id, conn.peer, start,
                 " (from the oldest kept segment: a snapshot, then the tail)" if start != from_lsn else "")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_acks, conn, reader, link, nursery.cancel_scope)
                await self._send(conn, link)
        finally:
            del self.links[conn.id]
            self._update_alarm()
            if self.sync_replicas > 0 and self.in_sync() < self.sync_replicas:
                durability.refuse_replica_waits(self.server.replica_alarm or "")
            log.warning("follower on conn %d (%s) left at lsn %d", conn.id, conn.peer, link["acked"])
        return "follower left"

    def _check_sync(self, conn, link: dict) -> None:
        """In sync (it counts for --sync-replicas from now on) once the follower has on disk all
        that this log had written when some batch was sent (``tail_mark``, the first batch that
        held the whole tail): it was one round trip behind then, no more.  Requiring the log's end *now* would keep a follower out for as long as writes never
        pause (consumers draining a backlog after a failover write acks without a break, and each
        ack moves the end during the round trip): every confirm refused meanwhile.  Counting it
        early is safe: a confirm still waits for its own lsn in the follower's acks."""
        if link["in_sync"]:
            return
        mark = link["tail_mark"]
        if link["acked"] >= self.server.wal.wal.written_lsn or (mark is not None and link["acked"] >= mark):
            link["in_sync"] = True  # caught up once: counts for --sync-replicas from now on
            log.info("follower on conn %d (%s) is in sync at lsn %d", conn.id, conn.peer, link["acked"])
            self._update_alarm()

    async def _send(self, conn, link: dict) -> None:
        durability = self.server.wal
        wal = durability.wal
        while not conn.closed:
            # Read before the target: a segment is deleted only once the rewritten copies of what
            # it held are written (Durability._sync_and_delete), so they are all at or before the
            # target, and a follower fsynced through it may delete its own records before kept_from.
            segs = wal.segments()
            kept_from = segs[0].first_lsn if segs else None
            target = wal.written_lsn
            if link["sent"] >= target:
                if kept_from is not None and kept_from != link.get("kept_from"):
                    # Compaction deleted segments since the last frame: say so, with no records, or an
                    # idle follower would keep what this log no longer needs until the next write.
                    link["kept_from"] = kept_from
                    conn.queue_bytes(encode(records_frame(target, [], self.server.state.epoch, kept_from)))
                await durability.wait_written(link["sent"])
                if link["acked"] >= target:
                    # It had every record until this moment: an idle follower is not behind, so its
                    # lag in seconds counts from the first write it lacks, not from its last ack
                    # (which, after an idle minute, made a follower a batch behind look a minute late).
                    link["caught_up_at"] = time.monotonic()
                continue
            records = await durability.records_from(link["sent"] + 1, target, MAX_BATCH_BYTES)
            if not records:
                await trio.sleep(0.01)  # the segment was being compacted away: read again
                continue
            link["sent"] = records[-1][0]
            if link["tail_mark"] is None and link["sent"] >= target:
                link["tail_mark"] = link["sent"]  # this batch held the whole log as it was: caught up
            link["kept_from"] = kept_from
            conn.queue_bytes(encode(records_frame(target, records, self.server.state.epoch, kept_from)))
            if conn.out_bytes > self.server.config.output_buffer:
                conn.drained = trio.Event()
                with trio.move_on_after(5.0):
                    await conn.drained.wait()

    async def _read_acks(self, conn, reader: FrameReader, link: dict, scope) -> None:
        try:
            while True:
                for f in reader.frames():
                    if f[0] == OP_REPLICA_ACK and len(f) > 2 and type(f[2]) is int:
                        if f[2] > link["acked"]:
                            link["acked"] = min(f[2], link["sent"])
                        if link["acked"] >= self.server.wal.wal.written_lsn:
                            link["caught_up_at"] = time.monotonic()
                        self._check_sync(conn, link)
                        self.server.wal.replica_progress()
                    elif f[0] == OP_ERROR:  # the follower refused our records (STALE_EPOCH)
                        log.warning("follower on conn %d (%s) refused the records: %s", conn.id, conn.peer,
                                    " ".join(str(x) for x in f[2:4]))
                        scope.cancel()
                        return
                    elif f[0] != OP_HEARTBEAT:
                        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
                        conn.queue_bytes(encode(error_frame(
                            rid, "BAD_REQUEST", "a replication connection takes only REPLICA_ACK and HEARTBEAT")))
                with trio.move_on_after(max(2 * conn.heartbeat, 1.0) if conn.heartbeat > 0 else 60.0) as cs:
                    data = await conn.stream.receive_some(RECEIVE_BYTES)
                if cs.cancelled_caught or not data:
                    break
                reader.feed(data)
        except Exception as exc:  # a hostile or broken follower costs only its link
            log.warning("follower on conn %d: %s", conn.id, exc)
        scope.cancel()


class Follower:
    """This brokerd follows ``address``: its log is the leader's, its state a hot standby of it."""

    def __init__(self, server, address: str, user: str = "", token: str = ""):
        self.server = server
        self.address = address
        host, _, port = address.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.user, self.token = user, token
        self.leader_lsn = 0
        self.leader_epoch = 0
        self.connected = False
        self.last_error = ""
        self.truncated = 0  # records cut from this log's tail to follow (a deposed leader's)
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._stopped = False
        # The acks (from _apply) and the heartbeats (their own task) share the one stream to the
        # leader; trio refuses two send_all at once on a stream (BusyResourceError), which cut the
        # link under load and dropped the follower out of sync.  One sender at a time.
        self._send_lock = trio.Lock()
        # Segment deletes the leader allowed (``kept_from`` of a RECORDS frame), each waiting for
        # this log to be fsynced through that frame's leader_lsn: [(kept_from, leader_lsn)], oldest
        # first, kept_from rising.  Only one connection's: a leader's log is one history while it
        # leads, and the next leader's may not hold the copies a deposed one wrote.
        self._deletable: list = []

    def refusal(self) -> str:
        return (f"this brokerd is a follower of the leader at {self.address} and takes no writes; "
                f"send writes to {self.address}")

    @property
    def lsn(self) -> int:
        return self.server.wal.wal.synced_lsn

    def statistics(self) -> dict:
        return {
            "role": "follower",
            "leader": self.address,
            "lsn": self.lsn,
            "leader_lsn": self.leader_lsn,
            "lag": max(0, self.leader_lsn - self.lsn),
            "connected": self.connected,
        }

    def view(self, now: float):
        """The live standby state (each batch is applied to it as it arrives)."""
        return self.server.state

    async def stop(self) -> None:
        """Stop following (promotion, or a re-point); returns once no batch is being applied."""
        self._stopped = True  # a run() not started yet never starts
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()

    async def run(self) -> None:
        if self._stopped:
            return
        try:
            with trio.CancelScope() as self._scope:
                while True:
                    again = False
                    try:
                        again = await self._follow_once()
                    except Exception as exc:  # noqa: BLE001 -- whatever a leader sends, the follower lives on
                        # (refused, unreachable, silent past 30 s, a bad frame or a record the log refuses)
                        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                            exc = exc.exceptions[0]  # the heartbeat nursery's wrapping says nothing
                        log.debug("following %s", self.address, exc_info=exc)
                        self.last_error = f"{type(exc).__name__}: {exc}"
                        log.warning("following %s: %s; reconnecting in %gs", self.address, exc, RECONNECT_DELAY)
                    self.connected = False
                    if not again:
                        await trio.sleep(RECONNECT_DELAY)
        finally:
            self.connected = False
            self._done.set()

    async def _follow_once(self) -> bool:
        """One connection to the leader; True to reconnect at once (the log was cut back)."""
        durability = self.server.wal
        wal = durability.wal
        state = self.server.state
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            extra = {"user": self.user, "token": self.token} if self.user else None
            hs = ClientHandshake(Hello(client=f"brokerd follower {self.server.config.port}",
                                       heartbeat=FOLLOWER_HEARTBEAT * 2, extra=extra))
            await stream.send_all(hs.initiate())
            reader = FrameReader(max_frame=max(self.server.config.max_frame, 2 * MAX_BATCH_BYTES))
            frames = await _frames(stream, reader)
            hs.receive(frames.pop(0))
            from_lsn = wal.next_lsn
            self._deletable = []
            await stream.send_all(encode([OP_REPLICATE, 2, from_lsn, state.epoch]))
            while not frames:
                frames = await _frames(stream, reader)
            reply = frames.pop(0)
            if reply[0] != OP_OK:
                raise FollowError(f"the leader refused REPLICATE: {reply[2:]}")
            info = reply[2]
            self.leader_epoch = info.get("epoch", 0)
            if "truncate_to" in info:
                await self._truncate(info["truncate_to"], info.get("epoch", 0))
                return True
            if self.leader_epoch < state.epoch:
                raise FollowError(f"the leader at {self.address} is at epoch {self.leader_epoch}, older than this "
                                  f"log's {state.epoch}: it was deposed; follow the current leader")
            start = info["start"]
            if start != from_lsn:
                if start < from_lsn or type(start) is not int:
                    raise FollowError(f"the leader would start at lsn {start!r}, before this log's end {from_lsn - 1}")
                if wal.written_lsn:
                    # Behind the leader's oldest kept segment: all this log holds is in the leader's
                    # snapshot (same terms: the epoch check above found no divergence). Start over from it.
                    async with durability._write_lock:
                        with trio.CancelScope(shield=True):
                            dropped = await trio.to_thread.run_sync(wal.discard_and_start_at, start)
                    log.warning("this log (to lsn %d) ends before %s keeps its log (from lsn %d): dropped its %d "
                                "records to take the leader's snapshot", from_lsn - 1, self.address, start, dropped)
                    state.reset_for_standby()
                    state.standby_begin()
                else:
                    async with durability._write_lock:
                        await trio.to_thread.run_sync(wal.start_at, start)
                state.align_lsn(start - 1)
            self.connected = True
            self.last_error = ""
            log.info("following %s from lsn %d (epoch %d)", self.address, start, self.leader_epoch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, stream)
                while True:
                    for f in frames:
                        if f[0] == OP_RECORDS:
                            await self._apply(stream, f)
                        elif f[0] == OP_ERROR or f[0] == OP_CLOSING:
                            raise FollowError(f"the leader said {f[1:]}")
                    frames = await _frames(stream, reader)

    async def _truncate(self, lsn: int, leader_epoch: int) -> None:
        """Cut this log back to ``lsn`` (the new leader's log left it there), rebuild the standby."""
        durability = self.server.wal
        wal = durability.wal
        if type(lsn) is not int or lsn < 0:
            raise FollowError(f"the leader sent a truncation point that is not an lsn: {lsn!r}")
        first = wal.segments()[0].first_lsn
        if lsn < first - 1:
            # Compaction (this brokerd's as a leader, or its leader's, which it followed) deleted the
            # records before the cut: only the new leader's snapshot can rebuild this log.
            raise FollowError(
                f"{self.address} (epoch {leader_epoch}) says this log must be cut back to lsn {lsn}, but it keeps "
                f"records from lsn {first} on only (compacted after the new term began); empty this data "
                f"directory and start brokerd again to take the leader's snapshot")
        async with durability._write_lock:
            with trio.CancelScope(shield=True):
                dropped = await trio.to_thread.run_sync(wal.truncate_after, lsn)
                durability.forget_after(lsn)
        self.truncated += dropped
        log.warning("truncated %d records after lsn %d from this log: written as leader of an older epoch and "
                    "never in the log of %s (epoch %d); following it from lsn %d", dropped, lsn, self.address,
                    leader_epoch, lsn + 1)
        with trio.CancelScope(shield=True):
            await self.server.roles.reload_standby()

    async def _apply(self, stream, f: list) -> None:
        durability = self.server.wal
        wal = durability.wal
        state = self.server.state
        their_epoch = f[3] if len(f) > 3 else 0
        if type(their_epoch) is not int or their_epoch < state.epoch:
            message = (f"these records are from epoch {their_epoch!r} but this follower's log is at epoch "
                       f"{state.epoch}: the sender was deposed")
            await self._send(stream, encode(error_frame(0, StaleEpoch.code, message)))
            raise FollowError(f"STALE_EPOCH: {message}")
        kept_from = f[4] if len(f) > 4 else None
        if kept_from is not None and (type(kept_from) is not int or type(f[1]) is not int
                                      or not 1 <= kept_from <= f[1] + 1):
            # Past what the leader has written it would delete records it never rewrote: refused
            # before anything of the frame is appended.
            raise FollowError(f"the leader sent kept_from {kept_from!r} with leader_lsn {f[1]!r}: kept_from must "
                              "be an lsn no later than the one after leader_lsn")
        self.leader_lsn = f[1]
        loads = cbor2.loads
        decoded = []
        expect = wal.next_lsn
        for lsn, t, payload in f[2]:  # all checked and decoded before any is appended
            if lsn != expect:
                raise FollowError(f"the leader sent lsn {lsn} where this log expects {expect}")
            decoded.append((lsn, t, loads(payload)))
            expect += 1
        for lsn, t, payload in f[2]:
            wal.append(t, payload)
        durability.remember_replicated(f[2])
        # Written, fsynced and applied together: a stop (promotion) never leaves the log ahead of the state.
        with trio.CancelScope(shield=True):
            async with durability._write_lock:
                await trio.to_thread.run_sync(write_and_sync, wal)
            state.standby_apply(decoded, time.time())
            state.align_lsn(wal.next_lsn - 1)
        await self._send(stream, encode([OP_REPLICA_ACK, 0, wal.synced_lsn]))
        if kept_from is not None:
            self._allow_delete(kept_from, f[1])
        await self._delete_compacted()

    # Pending deletes kept per connection; past this many, the newest is replaced (a later
    # kept_from with a later leader_lsn: it allows at least as much, a little later).
    MAX_PENDING_DELETES = 64

    def _allow_delete(self, kept_from: int, leader_lsn) -> None:
        pending = self._deletable
        if type(leader_lsn) is not int:
            return
        if pending and kept_from <= pending[-1][0]:
            return  # nothing more than the leader allowed already
        if len(pending) >= self.MAX_PENDING_DELETES:
            pending[-1] = (kept_from, leader_lsn)
        else:
            pending.append((kept_from, leader_lsn))

    async def _delete_compacted(self) -> None:
        """Delete this log's segments the leader's compaction made redundant (see the module
        docstring): those wholly before a ``kept_from`` whose frame this log is fsynced through."""
        durability = self.server.wal
        wal = durability.wal
        pending = self._deletable
        kept_from = 0
        while pending and pending[0][1] <= wal.synced_lsn:
            kept_from = pending.pop(0)[0]
        segs = wal.segments()
        if not kept_from or len(segs) < 2 or segs[0].last_lsn >= kept_from:
            return
        with trio.CancelScope(shield=True):
            async with durability._write_lock:
                try:
                    deleted = await trio.to_thread.run_sync(wal.delete_segments_through, kept_from - 1)
                except OSError as exc:  # EMFILE, ENOSPC for the manifest: nothing lost, tried again later
                    log.warning("could not delete log segments the leader compacted away yet (%s)", exc)
                    pending.insert(0, (kept_from, 0))
                    return
        if deleted:
            durability.segments_deleted += len(deleted)
            log.info("deleted %d log segments before lsn %d: the leader's compaction rewrote what they held "
                     "into later records of this log", len(deleted), kept_from)

    async def _heartbeats(self, stream) -> None:
        while True:
            await trio.sleep(FOLLOWER_HEARTBEAT)
            await self._send(stream, encode(HEARTBEAT_FRAME))

    async def _send(self, stream, data: bytes) -> None:
        async with self._send_lock:
            await stream.send_all(data)


async def _refuse(conn, rid: int | None, code: str, message: str) -> str:
    """Answer a REPLICATE that cannot be served, let the answer out, end the connection
    (``rid`` None: the answer is queued already)."""
    if rid is not None:
        conn.queue_bytes(encode(error_frame(rid, code, message)))
    with trio.move_on_after(1.0):
        while conn.out and not conn.closed:
            await trio.sleep(0.01)
    return f"REPLICATE refused: {code}"


class FollowError(Exception):
    """The leader refused this follower or sent what its log cannot take."""


def write_and_sync(wal) -> None:
    wal.write_batch(wal.take_batch())
    if wal.synced_lsn < wal.written_lsn:
        wal.sync()


async def _frames(stream, reader: FrameReader) -> list:
    while True:
        frames = reader.frames()
        if frames:
            return frames
        with trio.fail_after(30):
            data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise FollowError("the leader closed the connection")
        reader.feed(data)
