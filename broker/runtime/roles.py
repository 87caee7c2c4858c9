"""Who this brokerd is in a replicated group, and the changes of role (issue 16 items 3-4).

A brokerd is the **leader** (it takes writes, and followers replicate its log) or a **follower**
(``--follow``: a hot standby, broker/runtime/replication.py).  A leader can also be **fenced**:
it stops taking writes at once without following anyone (an election lease was lost, or a
follower showed it a newer epoch); it then counts as a follower with no leader.

Each leadership term has an epoch, written to the log as an EPOCH record when a brokerd is
promoted (``broker/state/replay.py``); followers refuse records from an older term, and a
deposed leader that follows again cuts its log back to where the new leader's term began.

The election helper (broker/runtime/election.py) and PROMOTE (protocol.md §5.45, the admin line
``PROMOTE``, ``brokerd-ctl promote``) drive it through these names only:

    await server.roles.promote(reason) -> int      follower (or fenced) -> leader; the new epoch
    await server.roles.follow(address, reason)      leader -> follower of ``address``
    server.roles.fence(reason)                      leader -> no writes, nobody followed
    server.roles.guard_confirms(lease_valid)        no reply goes out once the lease could be gone
    server.roles.role / .epoch / .leader_address / .last_lsn()

Every change of role is logged at INFO with its reason.
"""

from __future__ import annotations

import logging
import time

import cbor2
import trio

from broker.errors import NotLeader
from broker.handlers import admin
from client.wire import OP_PROMOTE, encode, error_frame, ok_frame

log = logging.getLogger("brokerd.roles")

# Characters of the operator's reason PROMOTE takes (it goes into the log line).
MAX_REASON = 200  # characters
# Seconds a step-down waits for the connections it closed to be gone before it rebuilds the
# state as a standby (their tasks only unwind: nothing is sent or awaited for long).
STEP_DOWN_WAIT = 5.0  # seconds


class RoleError(Exception):
    """A change of role that cannot be made now (the message says why)."""


class Fenced:
    """Stands in for a Follower while a fenced leader follows nobody: writes get NOT_LEADER,
    reads are answered from the state as it was when the writes stopped."""

    address = None
    connected = False

    def __init__(self, server, reason: str):
        self.server = server
        self.reason = reason

    def refusal(self) -> str:
        return (f"this brokerd stopped taking writes ({self.reason}) and follows no leader yet; "
                "send writes to the group's current leader")

    def view(self, now: float):
        return self.server.state

    def statistics(self) -> dict:
        return {"role": "fenced", "leader": "", "lsn": self.server.roles.last_lsn(), "reason": self.reason}


class Roles:
    def __init__(self, server):
        self.server = server
        self._lock = trio.Lock()  # one change of role at a time
        self._writer_scope: trio.CancelScope | None = None
        self.changes = 0  # role changes since start (STATS)

    # -- what the election helper and the page read ----------------------------------------
    @property
    def role(self) -> str:
        """"leader" while this brokerd takes writes, else "follower" (also when fenced)."""
        return "leader" if self.server.follower is None else "follower"

    @property
    def fenced(self) -> bool:
        return isinstance(self.server.follower, Fenced)

    @property
    def epoch(self) -> int:
        return self.server.state.epoch

    @property
    def leader_address(self) -> str | None:
        """HOST:PORT of the leader: this brokerd's own when it leads; None while fenced."""
        f = self.server.follower
        if f is None:
            cfg = self.server.config
            port = self.server.port if self.server.listeners else cfg.port
            return f"{cfg.host}:{port}"
        return f.address

    def last_lsn(self) -> int:
        """The last lsn this brokerd's log has on disk (fsynced)."""
        wal = self.server.wal
        return wal.wal.synced_lsn if wal is not None else self.server.state.last_lsn

    def statistics(self) -> dict:
        srv = self.server
        out = {"epoch": self.epoch, "role_changes": self.changes}
        repl = srv.follower or srv.replication
        if repl is not None:
            out.update(repl.statistics())
        if srv.follower is None and srv.replication is not None:
            for f in srv.replication.followers():  # one line each: follower.<HOST:PORT>
                out[f"follower.{f['address']}"] = (f"lsn={f['lsn']} lag_records={f['lag_records']} "
                                                   f"lag_seconds={f['lag_seconds']:g}")
        return out

    # -- the log writer: runs only while this brokerd leads ----------------------------------
    async def writer(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The Durability writer task, in a scope a step-down can end."""
        with trio.CancelScope() as scope:
            self._writer_scope = scope
            await self.server.wal.run(task_status=task_status)

    async def _stop_writer(self) -> None:
        durability = self.server.wal
        if self._writer_scope is None:
            return
        from broker.runtime.replication import write_and_sync

        async with durability._write_lock:  # not in the middle of a write or a compaction
            self._writer_scope.cancel()
            self._writer_scope = None
            if durability.wal.pending_count and durability.failed is None:
                await trio.to_thread.run_sync(write_and_sync, durability.wal)

    # -- changes of role --------------------------------------------------------------------
    async def promote(self, reason: str) -> int:
        """Become the leader: stop following, place the standby's messages (no replay), log
        EPOCH(epoch + 1), take writes.  Returns the new epoch once its record is on disk."""
        srv = self.server
        async with self._lock:
            if srv.follower is None:
                raise RoleError(f"this brokerd is already the leader (epoch {self.epoch}); nothing to promote")
            if srv.wal is None:
                raise RoleError("this brokerd has no log; only a brokerd with a data directory can lead")
            was = srv.follower
            if hasattr(was, "stop"):
                await was.stop()
            durability = srv.wal
            state = srv.state
            now = time.time()
            state.align_lsn(durability.wal.next_lsn - 1)
            state.enable_log()
            epoch = state.epoch + 1
            lsn = state.begin_epoch(epoch)
            # Queued bodies may live in the log from now on, as on a brokerd that started as
            # leader (broker/boot.py): big bodies and, past --max-memory, every body spill; set
            # before the standby's messages are placed, so their blocks can spill too.  (A
            # standby's bodies are in its log already: broker/boot.py.)
            state.set_body_reader(durability.wal.read_payloads)
            state.configure_spill(srv.config.spill_body_bytes)
            if state.standby:
                state.standby_finish(now)  # what it decides (dead-letters, chords) is logged in the new term
            from broker.runtime.replication import LeaderReplication

            srv.follower = None
            if srv.replication is None:
                srv.replication = LeaderReplication(srv, srv.config.sync_replicas)
            if srv.config.sync_replicas:
                durability.replica_lsn = srv.replication.replica_lsn
            if self._writer_scope is None:
                await srv.nursery.start(self.writer)
            srv.flush()
            self.changes += 1
            await durability.wait_durable(lsn)
            log.info("promoted to leader, epoch %d, at lsn %d (was %s): %s", epoch, lsn,
                     f"following {was.address}" if was.address else "fenced", reason)
            srv._tick_wake.set()  # timers, schedules and deliveries run from now on
            return epoch

    def guard_confirms(self, lease_valid) -> None:
        """While this brokerd leads under an election lease: ``lease_valid()`` is asked right before
        any held reply goes out, and once it is False this brokerd fences instead (the held confirms
        fail with NOT_LEADER).  ``None`` removes the guard (the term ended)."""
        wal = self.server.wal
        if wal is None:
            return
        wal.lease_ok = lease_valid
        wal.on_lease_lost = None if lease_valid is None else (
            lambda: self.fence("the election lease could have expired (this process was paused or starved "
                               "past it) before held confirms went out"))

    def fence(self, reason: str) -> None:
        """Stop taking writes at once; follow nobody.  Held confirms fail with NOT_LEADER."""
        srv = self.server
        if srv.follower is not None:
            return  # a follower or fenced already takes no writes
        srv.follower = Fenced(srv, reason)
        self.changes += 1
        if srv.wal is not None:
            srv.wal.refuse_replica_waits(srv.follower.refusal(), NotLeader.code)
        log.info("fenced: this brokerd takes no writes from now on (epoch %d, lsn %d): %s",
                 self.epoch, self.last_lsn(), reason)

    async def follow(self, address: str, reason: str) -> None:
        """Step down (or re-point): follow ``address``.  Writes stop at once; client
        connections are closed (they reconnect to the leader); the state is rebuilt from the
        log as a standby; the follower then cuts any tail the new leader never had."""
        from broker.runtime.replication import Follower

        srv = self.server
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise RoleError(f"follow needs the leader as HOST:PORT (got {address!r})")
        async with self._lock:
            self.fence(reason)
            was = srv.follower
            if hasattr(was, "stop"):
                await was.stop()
            await self._stop_writer()
            if not srv.state.standby:  # it led (or was fenced): its state has consumers and deliveries
                # Client connections past their HELLO (the state knows them: consumers, deliveries).
                # Not admin ones, nor one not yet sniffed: closed with a binary CLOSING, an admin
                # client that had not yet sent its line read that as garbage.
                closed = [c for c in list(srv.conns.values()) if c.name != "<admin>" and c.id in srv.state.conns]
                for c in closed:
                    c.evict(NotLeader.code, f"this brokerd follows {address} now; send writes there")
                with trio.move_on_after(STEP_DOWN_WAIT):
                    while any(c.id in srv.conns for c in closed):
                        await trio.sleep(0.01)
                await self.reload_standby()
            # (a follower re-pointed keeps its standby state; the new leader says if its tail must go)
            old = srv.follower
            user, token = (old.user, old.token) if hasattr(old, "user") else (srv.config.follow_user,
                                                                              srv.config.follow_token)
            srv.follower = Follower(srv, address, user or "", token or "")
            srv.nursery.start_soon(srv.follower.run)
            self.changes += 1
            log.info("following %s from lsn %d, epoch %d: %s", address, self.last_lsn(), self.epoch, reason)

    # -- PROMOTE (protocol.md §5.45) and the admin line -------------------------------------
    async def answer_promote(self, conn, f: list, cid: int) -> None:
        """The PROMOTE op, or a binary ADMIN "PROMOTE [reason]" line: answered once the new
        epoch is on disk (or refused with why)."""
        rid = f[1] if len(f) > 1 and type(f[1]) is int else 0
        if f[0] == OP_PROMOTE:
            reason = f[2] if len(f) > 2 else None
            if reason is not None and (type(reason) is not str or len(reason) > MAX_REASON):
                conn.queue_bytes(encode(error_frame(
                    rid, "BAD_REQUEST", f"PROMOTE field 2 must be the reason, text of at most {MAX_REASON} "
                    f"characters, or null (got {type(reason).__name__})")))
                return
        else:
            reason = f[2].split(None, 1)[1] if len(f[2].split(None, 1)) > 1 else None
        try:
            epoch = await self.promote(self._why(conn, reason))
        except RoleError as exc:
            conn.queue_bytes(encode(error_frame(rid, "BAD_REQUEST", str(exc))))
            return
        if f[0] == OP_PROMOTE:
            conn.queue_bytes(encode(ok_frame(rid, {"epoch": epoch, "lsn": self.last_lsn()})))
        else:
            conn.queue_bytes(encode(ok_frame(rid, admin.single(f"leader, epoch {epoch}"))))

    async def promote_line(self, line: str, conn) -> str:
        """The admin text line ``PROMOTE [reason]``: the reply text."""
        if conn.user is not None and not conn.user.may("admin"):
            return admin.error("ACCESS_REFUSED", f"user {conn.user.name!r} may not run PROMOTE: it needs the "
                                                 "'admin' grant")
        parts = line.strip().split(None, 1)
        reason = parts[1][:MAX_REASON] if len(parts) > 1 else None
        try:
            epoch = await self.promote(self._why(conn, reason))
        except RoleError as exc:
            return admin.error("BAD_REQUEST", str(exc))
        return admin.single(f"leader, epoch {epoch}")

    @staticmethod
    def _why(conn, reason) -> str:
        who = conn.user.name if conn.user is not None else "an operator"
        return f"PROMOTE by {who} from {conn.peer}" + (f": {reason}" if reason else "")

    async def reload_standby(self) -> None:
        """Rebuild the state as a standby from the log as it is on disk (after a step-down or a
        truncation): the one time a follower reads its log back."""
        srv = self.server
        durability = srv.wal
        wal = durability.wal
        async with durability._write_lock:
            first = wal.segments()[0].first_lsn
            raw = await trio.to_thread.run_sync(wal.read_records, first, wal.written_lsn)
        state = srv.state
        state.reset_for_standby()
        state.standby_begin()
        loads = cbor2.loads
        state.standby_apply(((lsn, t, loads(p)) for lsn, t, p in raw), time.time())
        state.align_lsn(wal.next_lsn - 1)
