"""Durability: the write-ahead log under the trio server.

The server hands every batch's log records and outgoing frames to
``submit``.  Records are appended to the log's in-memory buffer at once (cheap:
a struct pack); the writer task (``run``) takes whatever is pending, writes it
with one ``os.write`` and fsyncs it with one ``fsync`` in a worker thread, so
the event loop keeps serving while the disk works; a small write with no fsync or
segment rotation in it (``INLINE_WRITE_BYTES``) is made on the loop itself, one
os.write to the page cache being cheaper than the hand-off to a thread and back.
Records submitted while a write or fsync is in flight go together in the next
one: group commit.

Under ``fsync=always`` a batch's confirms are held until the fsync that covers
its records returns — that is what makes a confirm mean "on disk".  Under
``interval`` and ``never`` they are held until the ``os.write`` that covers
them returns: the operating system has the records, so a ``kill -9`` of
brokerd loses nothing confirmed; an OS crash or power loss may lose what the
kernel had not yet written (``never``) or up to ``fsync_interval_ms`` of
confirmed work (``interval``).  Deliveries wait for the write under every
policy.

A failed write or fsync (ENOSPC, EIO) is not retried: the log is marked
failed, held confirms become LOG_FAILED errors, publishes are refused with
LOG_FAILED, and STATS says so, until an operator restarts brokerd.

Compaction: when the log holds much more than the live messages need, the
state rewrites the live contents of the oldest segment forward; once those
records are on disk (fsynced, whatever the policy) the old segment is deleted.
A crash at any point leaves either the old records or their rewritten copies,
and replay takes the later copy.  The live size it compares the log with is
at least what compaction itself last measured (the bytes it rewrote that are
still in the log), so live data is rewritten again only after the log has
grown past it: never a pass per batch over the same live bodies.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections import deque

import cbor2
import trio

from broker.errors import NotEnoughReplicas, NotLeader
from broker.runtime.iothread import IoThread
from broker.state import log_records as R
from broker.wal import WalFailed, WriteAheadLog
from client.wire import MAX_PUBLISH_BATCH, OP_CONFIRM_RANGE, OP_OK, error_frame

log = logging.getLogger("brokerd.wal")

# Bucket bounds (seconds) of the fsync latency histogram shown by /metrics later.
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


_NEXT_BYTES = [cbor2.dumps(k) for k in range(MAX_PUBLISH_BATCH)]  # PUBLISH_NEXT payloads, by item


class Durability:
    def __init__(self, wal: WriteAheadLog, state, config):
        self.wal = wal
        self.state = state
        self.policy = config.fsync
        self.interval = config.fsync_interval_ms / 1000.0
        self.segment_bytes = config.segment_bytes
        self.data_dir = config.data_dir
        self._waiting: deque = deque()  # (lsn, box, release) held for the fsync
        self._early: deque = deque()  # (lsn, box, release) held for the write
        self._wake = trio.Event()
        self._write_lock = trio.Lock()
        self._deletes: list[tuple[int, int]] = []  # (lsn that must be durable, delete through)
        self._compacting = False
        # A checkpoint written but not yet pointed at: (its last lsn, its first lsn); the pointer
        # is saved once the last is on disk (broker/state/replay.py "Checkpoints").
        self._checkpoint_due: tuple[int, int] | None = None
        self._records_at_checkpoint = 0  # self.records when the last checkpoint was written
        self.checkpoints = 0
        # The first lsn of the checkpoint a restart would start from (None: none); once compaction
        # deletes its segment a restart reads the whole log, so a new one is due at once.
        self._checkpoint_at: int | None = wal.replay_from
        self._checkpoint_lost = False
        self.failed: WalFailed | None = None
        # figures
        self.batches = 0
        self.records = 0
        self.bytes = 0
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        self.fsync_hist = [0] * (len(FSYNC_BUCKETS) + 1)
        self.compactions = 0
        self.segments_deleted = 0
        self.compacted_bytes = 0  # bytes of records compaction (and checkpoints) rewrote forward
        # What compaction measured: (first lsn, last lsn, bytes) of each run of records it (or a
        # checkpoint) rewrote that is still in the log, oldest first, and their sum: the live size
        # the trigger holds to (see "compaction" below).
        self._rewritten: deque = deque()
        self._rewritten_bytes = 0
        self._publish_bytes = 0
        self._publishes = 0
        self.recovery = wal.recovery
        # When the write or fsync now running in a worker thread began (monotonic),
        # None between them: /healthz and the systemd watchdog read writer_stall().
        self._io_started: float | None = None
        self._io = IoThread()  # where those writes and fsyncs run (cheaper than trio.to_thread)
        # Records the state emitted but the log could not append yet (MemoryError), in order.
        self._backlog: deque = deque()
        self._inline_written = False  # submit wrote on the loop; the writer task owes _after_write
        self._memory_warned = False
        # Replication (broker/runtime/replication.py): the last records appended, so a
        # follower near the head is served from memory, not the segment files; a wake-up
        # for the followers after each write; and, on a leader with --sync-replicas, the
        # lsn that many followers have fsynced (confirms wait for it too).
        self.recent: deque = deque()  # (lsn, type, payload bytes), oldest first
        self._recent_bytes = 0
        self._written_event = trio.Event()
        self.replica_lsn = None  # None, or a callable: the lsn N followers have on disk
        # While this brokerd leads under an election lease (broker/runtime/election.py): a callable
        # that is False once the lease could have expired at the engine, and what to do then
        # (fence).  Checked right before held replies go out (Roles.guard_confirms).
        self.lease_ok = None
        self.on_lease_lost = None

    # -- on the event loop ---------------------------------------------------------
    def submit(self, records: list, box: dict, release, early: dict | None = None) -> None:
        """Append a batch's records; release ``early`` (deliveries) and ``box``
        (the replies that confirm a change) once the log allows it.

        Under every policy nothing is released before the records are written
        to the operating system (``os.write`` returned), so a ``kill -9`` of
        brokerd cannot lose what a client was told.  Under ``always`` the
        confirms wait for the fsync as well; deliveries only for the write (a
        ``kill -9`` then cannot lose the record that counts their attempt).

        Appending never fails half-way through a record, and a record that
        cannot be appended now (MemoryError) stays in a backlog, in order, with
        its replies held, until the writer can append it: the log fails only
        for the disk (DESIGN.md, "Trust").
        """
        if self.failed is not None:
            # The state stopped logging when the log failed; nothing can be promised.
            if early:
                release(early)
            if box:
                release(_refuse_confirms(box, str(self.failed)))
            return
        self._backlog.extend(records)
        if not self._append_backlog():
            if early:
                release(early)
            if box:
                release(_refuse_confirms(box, str(self.failed)))
            return
        lsn = self.state.last_lsn
        if early:
            self._early.append((lsn, early, release))
        if box:
            if self.policy == "always" or self.replica_lsn is not None:
                self._waiting.append((lsn, box, release))
            else:
                self._early.append((lsn, box, release))
        if (self.policy != "interval" and not self._write_lock.locked()
                and self.wal.small_write_due(self.INLINE_WRITE_BYTES)):
            self._write_inline()
        self._wake.set()

    def _write_inline(self) -> None:
        """Write what is pending now, on the loop, and release what waited for it.

        For a write ``small_write_due`` calls one small ``os.write`` to the page cache (no fsync
        of the log's own, no rotation), and only while the writer task is not inside a write or
        fsync of its own (the write lock is free), so writes stay in lsn order.  Done in the
        caller's step, what waited only for the write (deliveries; under ``never`` the confirms
        too) goes out in that same step instead of a round later through the writer task (issue
        18: W1's consumer waited a round of the other connections' work per hop).  The writer
        task still does what follows a write when it wakes: under ``always`` the fsync that
        releases the confirms, then ``_after_write`` (spill, checkpoints, compaction).  Not under
        ``interval``, whose writer times its fsyncs from its own writes."""
        try:
            self._write_pending()
        except WalFailed as exc:
            self._fail(exc)
            return
        self._inline_written = True
        self._written_event.set()  # followers: more to send
        self._written_event = trio.Event()
        self._release_written()

    def _append_backlog(self) -> bool:
        """Append what the backlog holds, in order; False if the log failed.

        Each record is encoded whole before ``append``, which adds all of a
        record or none of it; a MemoryError leaves that record and the ones
        after it in the backlog (the writer retries), never half a record.

        The hot path of every change (one pass per record): names are bound once per batch
        and the replication tail (``_remember``) is kept inline while its lsns are consecutive.
        """
        backlog = self._backlog
        wal = self.wal
        append = wal.append
        dumps = cbor2.dumps
        recent = self.recent
        publish = R.PUBLISH
        frame_t = R.PUBLISH_FRAME
        next_t = R.PUBLISH_NEXT  # payload k, an int from publish_run: its CBOR from a table
        next_bytes = _NEXT_BYTES
        n_next = len(next_bytes)
        publish_bytes = publishes = 0
        tail_bytes = 0
        next_in_tail = recent[-1][0] + 1 if recent else None
        try:
            while backlog:
                t, payload = backlog[0]
                try:
                    if t == next_t and 0 < payload < n_next:
                        data = next_bytes[payload]
                    else:
                        try:
                            data = dumps(payload)
                        except MemoryError:
                            raise
                        except Exception:
                            data = _encode_record(t, payload)  # logs it, writes it all the same
                    lsn = append(t, data)
                except MemoryError:
                    if not self._memory_warned:
                        self._memory_warned = True
                        log.warning(
                            "out of memory appending to the log; %d records wait in order, their replies held, "
                            "and are retried", len(backlog),
                        )
                    self._wake.set()
                    return True
                except WalFailed as exc:
                    self._fail(exc)
                    return False
                backlog.popleft()
                if lsn == next_in_tail or next_in_tail is None:
                    recent.append((lsn, t, data))
                    tail_bytes += len(data)
                    next_in_tail = lsn + 1
                else:
                    self._recent_bytes += tail_bytes
                    tail_bytes = 0
                    self._remember(lsn, t, data)  # not the next lsn: it starts the tail over
                    next_in_tail = lsn + 1
                if t == publish or t == next_t or t == frame_t:  # (a frame's bytes and its NEXTs: its items)
                    publish_bytes += len(data)
                    publishes += 1
        finally:
            self._publish_bytes += publish_bytes
            self._publishes += publishes
            if tail_bytes:
                self._recent_bytes += tail_bytes
                while self._recent_bytes > self.RECENT_BYTES and len(recent) > 1:
                    self._recent_bytes -= len(recent.popleft()[2])
        self._memory_warned = False
        if lsn_disagrees := (wal.next_lsn - 1 != self.state.last_lsn):
            # A bug, not a disk fault: stop promising rather than crash brokerd.
            self._fail(WalFailed(
                f"internal error: the log is at LSN {wal.next_lsn - 1} but the broker state at "
                f"{self.state.last_lsn}; nothing more can be logged safely"
            ))
        return not lsn_disagrees

    def _lease_valid(self) -> bool:
        """False once the election lease this brokerd leads under could have expired: another
        brokerd may be leading by now, so nothing held may be confirmed.  A process paused (SIGSTOP,
        a VM stall) past its lease resumes with replies waiting for a write that just finished,
        and nothing orders this writer before the elector's watchdog: so the check is here, at the
        moment replies would go out.  Fences (held confirms fail with NOT_LEADER; deliveries go)."""
        check = self.lease_ok
        if check is None or check():
            return True
        if self.on_lease_lost is not None:
            self.on_lease_lost()  # Roles.fence: the _waiting confirms are refused with NOT_LEADER
        message = ("this brokerd's election lease could have expired before these writes were confirmed; "
                   "they may or may not be kept: send them to the group's current leader")
        self.refuse_replica_waits(message, NotLeader.code)
        while self._early:
            _, box, release = self._early.popleft()
            release(_refuse_confirms(box, message, NotLeader.code))
        return False

    def _release_written(self) -> None:
        if not self._lease_valid():
            return
        written = self.wal.written_lsn
        early = self._early
        while early and early[0][0] <= written:
            _, box, release = early.popleft()
            release(box)

    def _release_durable(self) -> None:
        self._release_written()
        durable = self.wal.synced_lsn if self.policy == "always" else self.wal.durable_lsn
        if self.replica_lsn is not None:
            durable = min(durable, self.replica_lsn())  # and on --sync-replicas followers' disks
        waiting = self._waiting
        while waiting and waiting[0][0] <= durable:
            _, box, release = waiting.popleft()
            release(box)

    def _fail(self, exc: WalFailed) -> None:
        if self.failed is not None:
            return
        self.failed = exc
        message = f"{exc}; publishes are refused until brokerd is restarted"
        self.state.fail_log(message)
        self._backlog.clear()
        log.error("write-ahead log failed: %s", message)
        while self._early:
            _, box, release = self._early.popleft()
            release(box)
        while self._waiting:
            _, box, release = self._waiting.popleft()
            release(_refuse_confirms(box, message))

    async def wait_durable(self, lsn: int) -> None:
        """Return once records up to ``lsn`` are durable under the policy (or the log failed)."""
        while self.failed is None:
            durable = self.wal.synced_lsn if self.policy == "always" else self.wal.durable_lsn
            held = (self._waiting and self._waiting[0][0] <= lsn) or (self._early and self._early[0][0] <= lsn)
            if durable >= lsn and not held:
                return  # on disk, and every reply it held has been released
            self._wake.set()
            await trio.sleep(0.0005)

    # -- replication ----------------------------------------------------------------------
    # The in-memory tail followers are served from: enough for a follower that keeps up,
    # small next to the memory a broker holds; one further behind reads the segment files.
    RECENT_BYTES = 16 * 1024 * 1024  # bytes of encoded records kept for followers

    def _remember(self, lsn: int, t: int, data: bytes) -> None:
        recent = self.recent
        if recent and recent[-1][0] + 1 != lsn:
            # Not the next lsn: the log was cut back (a deposed leader's tail) or restarted at a
            # snapshot.  records_from finds a record by its offset from recent[0], so the tail
            # must hold consecutive lsns: start it over here.
            recent.clear()
            self._recent_bytes = 0
        recent.append((lsn, t, data))
        self._recent_bytes += len(data)
        while self._recent_bytes > self.RECENT_BYTES and len(recent) > 1:
            self._recent_bytes -= len(recent.popleft()[2])

    def remember_replicated(self, records) -> None:
        """A follower appended ``(lsn, type, payload bytes)`` from its leader: keep them in the
        tail too, so that once promoted it serves its own followers from memory, and the tail
        has no hole where it followed."""
        for lsn, t, data in records:
            self._remember(lsn, t, data)

    def forget_after(self, lsn: int) -> None:
        """The log was cut back to ``lsn``: the tail must not serve the records cut."""
        recent = self.recent
        while recent and recent[-1][0] > lsn:
            self._recent_bytes -= len(recent.pop()[2])

    async def wait_written(self, lsn: int) -> None:
        """Return once the log has written past ``lsn`` (bounded: a second, then look again)."""
        if self.wal.written_lsn > lsn:
            return
        with trio.move_on_after(1.0):
            await self._written_event.wait()

    async def records_from(self, first: int, last: int, max_bytes: int) -> list:
        """``(lsn, type, payload)`` of written records ``first``..``last``, at most about ``max_bytes``,
        never ending between a PUBLISH_FRAME and its PUBLISH_NEXT records (``_whole_frames``)."""
        recent = self.recent
        if recent and recent[0][0] <= first <= recent[-1][0]:
            out = _whole_frames(itertools.islice(recent, first - recent[0][0], None), last, max_bytes)
            if out and out[0][0] == first:
                return out
        # Older than the tail in memory (or, defensively, not found in it): read the segments.
        # (An empty answer would make the leader's sender ask again forever: a follower stuck.)
        async with self._write_lock:  # no segment is deleted while it is read
            records = await trio.to_thread.run_sync(self.wal.read_records, first, last)
        return _whole_frames(records, last, max_bytes)

    def replica_progress(self) -> None:
        """A follower reported a higher durable lsn: release the confirms it covers."""
        self._release_durable()

    def refuse_replica_waits(self, message: str, code: str = NotEnoughReplicas.code) -> None:
        """Too few followers in sync: held confirms fail with NOT_ENOUGH_REPLICAS, never
        go out as if on enough disks.  (Their records stay in the local log.)  A leader that
        steps down or is fenced fails them with NOT_LEADER (broker/runtime/roles.py)."""
        while self._waiting:
            _, box, release = self._waiting.popleft()
            release(_refuse_confirms(box, message, code))

    # -- the writer task ---------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        wal = self.wal
        while self.failed is None:
            if self._backlog:
                self._append_backlog()
                if self._backlog:  # still out of memory: let the loop free some
                    await trio.sleep(0.01)
            if not wal.pending_count and self._inline_written:
                self._inline_written = False  # written by submit (_write_inline): what follows a write
                if self.policy == "always":
                    await self._locked(self._sync)
                if self.failed is None:
                    await self._after_write()
                continue
            if not wal.pending_count:
                self._wake = trio.Event()
                timeout = self.interval if (self.policy == "interval" and wal.written_lsn > wal.synced_lsn) else 1.0
                with trio.move_on_after(timeout):
                    await self._wake.wait()
                if not wal.pending_count:
                    if self.policy == "interval" and wal.written_lsn > wal.synced_lsn:
                        await self._locked(self._sync)
                    continue
            await self._locked(self._write_pending)
            if self.policy == "always" and self.failed is None:
                # The WAL itself runs with fsync=never under this policy: we
                # fsync here, after releasing what only needed the write.
                await self._locked(self._sync)
            if self.failed is None:
                await self._after_write()

    # A write of at most this many bytes, with no fsync or rotation in it, is made on the event
    # loop: one os.write to the page cache costs microseconds, the hand-off to a worker thread
    # and back ~0.1-0.3 ms of latency and CPU.  A sequential confirmed publish pays the hop twice
    # under --fsync always (write, then fsync), once under never.
    INLINE_WRITE_BYTES = 256 * 1024

    async def _locked(self, fn) -> None:
        async with self._write_lock:
            if self.failed is not None:
                return
            self._io_started = time.monotonic()
            try:
                if fn == self._write_pending and self.wal.small_write_due(self.INLINE_WRITE_BYTES):
                    fn()
                    await trio.lowlevel.checkpoint()  # as the thread hop was: others may run here
                else:
                    await self._io.run(fn)
            except WalFailed as exc:
                self._fail(exc)
                return
            finally:
                self._io_started = None
        if fn == self._write_pending:
            self._written_event.set()  # followers: more to send
            self._written_event = trio.Event()
            self._release_written()
        else:
            self._release_durable()

    def _write_pending(self) -> None:
        """In a worker thread: one write (and per policy one fsync) of all pending records."""
        batch = self.wal.take_batch()
        if batch is None:
            return
        synced_before = self.wal.synced_lsn
        t0 = time.perf_counter()
        self.wal.write_batch(batch)
        dt = time.perf_counter() - t0
        self.batches += 1
        self.records += batch.count
        self.bytes += batch.nbytes
        if self.wal.synced_lsn != synced_before:
            self._count_fsync(dt)

    def _sync(self) -> None:
        if self.wal.synced_lsn >= self.wal.written_lsn:
            return
        t0 = time.perf_counter()
        self.wal.sync()
        self._count_fsync(time.perf_counter() - t0)

    def _count_fsync(self, dt: float) -> None:
        self.fsyncs += 1
        self.fsync_seconds += dt
        for i, bound in enumerate(FSYNC_BUCKETS):
            if dt <= bound:
                self.fsync_hist[i] += 1
                break
        else:
            self.fsync_hist[-1] += 1

    def writer_stall(self, now: float) -> float:
        """Seconds the writer has spent inside the one write or fsync now running.

        0 while it waits for work, and after the log failed (it has nothing
        left to do: a full disk is a reason to drain, not to restart).  A
        large figure means the disk stopped answering: a wedged writer.
        """
        started = self._io_started
        if started is None or self.failed is not None:
            return 0.0
        return max(0.0, now - started)

    # -- compaction --------------------------------------------------------------------
    # Compaction writes before it frees: the rewritten copies of the oldest
    # segment's live messages go to the head first, the old segment is deleted
    # after.  It starts only when the disk has room for that plus one segment
    # of headroom for ordinary traffic (compaction_space_needed); otherwise it
    # waits and looks again at most every COMPACTION_RETRY_SECONDS (a statvfs),
    # so a restart on a nearly full disk does not fill it and fail the log.
    COMPACTION_RETRY_SECONDS = 1.0  # seconds between free-space checks while compaction waits
    _compaction_retry_at = 0.0  # monotonic time of the next check (class defaults: set per instance on use)
    _compaction_waiting = False  # logged "postponed" once; logs "resumed" when it goes ahead
    _delete_waiting = False  # a segment delete failed (EMFILE, ENOSPC for the manifest); retried

    def live_bytes(self) -> int:
        """The live size compaction is triggered against: the larger of the guess from the
        queued messages' count (``live_bytes_estimate``) and what compaction measured.

        The guess prices every queued message at the average recent publish, which is far too
        small when the bodies still queued are much bigger than those published lately (1,000
        queued 100 KB bodies, then 100-byte publishes after a restart): the log then always
        looked more than twice the live size, and every write batch started another pass that
        rewrote the same live bodies forward, forever.  The measure is the bytes compaction (and
        checkpoints) rewrote forward that are still in the log: those records were live when
        written.  Some may have died since (acked): that only lets the log grow more before the
        next pass, at most to twice what was live when measured, and the pass that reaches them
        takes them off the measure.  Rewritten again, a record is counted once: the run that
        held it leaves the measure when its segment is deleted."""
        return max(self.live_bytes_estimate(), self._rewritten_bytes)

    def _measure_rewritten(self, first: int, last: int, nbytes: int) -> None:
        """Records ``first``..``last`` (``nbytes`` of log) were rewritten forward as live."""
        if last >= first and nbytes > 0:
            self._rewritten.append((first, last, nbytes))
            self._rewritten_bytes += nbytes
            self.compacted_bytes += nbytes

    def _forget_rewritten_before(self, lsn: int) -> None:
        """Segments before ``lsn`` were deleted: the runs wholly in them are gone from the log
        (a run partly in what is kept stays counted whole, until its last segment goes)."""
        rewritten = self._rewritten
        while rewritten and rewritten[0][1] < lsn:
            self._rewritten_bytes -= rewritten.popleft()[2]

    def _submit_rewritten(self, records: list) -> None:
        """Append records compaction or a checkpoint rewrote forward, and measure them."""
        before = self.wal.pending_bytes
        first = self.wal.next_lsn
        self.submit(records, {}, lambda box: None)
        self._measure_rewritten(first, self.wal.next_lsn - 1, self.wal.pending_bytes - before)

    def live_bytes_estimate(self) -> int:
        live = sum(q.ready_count + q.delayed_count + q.inflight_count for q in self.state.queues.values())
        if self._publishes:
            avg = self._publish_bytes / self._publishes + 18
        elif self.wal.replay_from is not None and (segs := self.wal.segments()) and \
                segs[-1].last_lsn >= segs[0].first_lsn:
            # Started from a checkpoint: the records replayed were few and big (its blocks), so
            # the whole log's average record is the guess, as a whole replay's would have been.
            avg = sum(s.size_bytes for s in segs) / (segs[-1].last_lsn - segs[0].first_lsn + 1)
        elif self.recovery is not None and self.recovery.records:
            # Nothing published since the restart: the replayed log's average
            # record is a far better guess than a constant (a constant much
            # too small made every restart of a log of big messages compact).
            avg = self.recovery.bytes / self.recovery.records
        else:
            avg = 160
        return int(live * avg)

    def compaction_space_needed(self, oldest) -> int:
        """Bytes of free disk compaction needs before it rewrites ``oldest``.

        What it rewrites is at most the live messages, and at most about what
        ``oldest`` holds (a MESSAGE record is the size of the PUBLISH it
        copies); plus one segment of headroom, so that the traffic that goes on
        meanwhile does not hit a full disk before the old segment is deleted.
        """
        return min(self.live_bytes(), oldest.size_bytes) + self.segment_bytes

    def needs_compaction(self) -> bool:
        segs = self.wal.segments()
        if len(segs) < 2:
            return False
        total = sum(s.size_bytes for s in segs)
        return total > 2 * self.live_bytes() + 2 * self.segment_bytes

    # -- checkpoints ---------------------------------------------------------------------
    # A checkpoint writes the whole state (~16-24 bytes per queued message in a block, plus the
    # other live objects and results) so that a restart reads the log from there on instead of
    # from its start (broker/state/replay.py "Checkpoints").  One is written at every clean
    # shutdown, and while running once this many records were written since the last one, or a
    # tenth of the queued messages if more: a crash then replays at most that many records one
    # by one (~8 us of CPU each; 10,000,000 queued: at most 1,000,000 records, ~8 s, on top of
    # loading the checkpoint, ~4 s), and checkpoints cost at most ~24 bytes of log per queued
    # message every tenth of the queue, ~240 bytes per record written at depth (a 100-byte
    # publish is ~150 bytes of log), and ~2 CPU-s per checkpoint at 10,000,000 queued (~5 % of
    # what the million records cost to handle).  A quarter (session 6) left 2,500,000 records
    # to replay after a crash at 10,000,000 queued: 30 CPU-s.
    CHECKPOINT_RECORDS = 500_000  # records written since the last checkpoint that make one due
    CHECKPOINT_SHARE = 10  # ... or queued // this, if more

    def checkpoint_due(self) -> bool:
        if self._checkpoint_due is not None or self._compacting or not self.state.log_enabled:
            return False
        if self._checkpoint_lost:
            return True
        since = self.records - self._records_at_checkpoint
        if since < self.CHECKPOINT_RECORDS:
            return False
        queued = sum(q.ready_count for q in self.state.queues.values())
        return since >= queued // self.CHECKPOINT_SHARE

    def write_checkpoint(self) -> int:
        """On the loop: append a checkpoint; its pointer is saved once it is on disk.  Returns
        its first lsn (0: none, the log is off)."""
        first = self.state.checkpoint()
        if first:
            # Its records are live copies too (of the unpacked messages, and the rest): measured.
            self._submit_rewritten(self.state.take_records())
            self._checkpoint_due = (self.state.last_lsn, first)
            self._records_at_checkpoint = self.records
            self._checkpoint_lost = False
            self.checkpoints += 1
        return first

    def _save_checkpoint(self) -> None:
        """In a worker thread: fsync, then point CHECKPOINT at the checkpoint's first record."""
        last, first = self._checkpoint_due
        self.wal.sync()  # every record of the checkpoint on disk before anything points at it
        try:
            self.wal.save_checkpoint(first)
            self._checkpoint_at = first
        except OSError as exc:  # not a disk fault of the log: the next restart reads more of it
            log.warning("could not save the checkpoint pointer (%s); a restart reads the log from an older one", exc)
        self._checkpoint_due = None
        # The checkpoint's buffers (~16 B per queued message, in pieces below the mmap threshold)
        # are free now but stay resident until the heap is trimmed (measured: 17 B per queued
        # message left behind per checkpoint without this).
        from broker.runtime.server import _trim_malloc

        _trim_malloc()

    async def _after_write(self) -> None:
        # Blocks of queued bodies whose records are now written may leave memory (broker/state/spill.py).
        self.state.spill(self.wal.written_lsn)
        if self._checkpoint_due is not None and self._checkpoint_due[0] <= self.wal.written_lsn:
            await self._locked(self._save_checkpoint)
        elif self.checkpoint_due():
            self.write_checkpoint()
        # Delete segments whose live contents were rewritten and are now on disk.
        if self._deletes and self._deletes[0][0] <= self.wal.written_lsn:
            await self._locked(self._sync_and_delete)
            segs = self.wal.segments()  # back on the loop: what the deletes took off the measure
            self._forget_rewritten_before(segs[0].first_lsn if segs else self.wal.next_lsn)
        if not self._compacting and not self._deletes and self.needs_compaction():
            now = time.monotonic()
            if now < self._compaction_retry_at:
                return
            oldest = self.wal.segments()[0]
            need = self.compaction_space_needed(oldest)
            try:
                free = shutil.disk_usage(self.data_dir).free
            except OSError:
                free = need  # cannot tell: go ahead as before
            if free < need:
                self._compaction_retry_at = now + self.COMPACTION_RETRY_SECONDS
                if not self._compaction_waiting:
                    self._compaction_waiting = True
                    log.warning(
                        "compaction postponed: rewriting %s needs %d bytes free in %s but only %d are; "
                        "the log keeps working and grows until space is freed (checked again every %gs)",
                        oldest.name, need, self.data_dir, free, self.COMPACTION_RETRY_SECONDS,
                    )
                return
            if self._compaction_waiting:
                self._compaction_waiting = False
                log.warning("compaction resumed: %d bytes free in %s", free, self.data_dir)
            self._compacting = True
            try:
                # The spilled blocks it rewrites are read back first, in a thread: not on the loop
                # (a segment's worth of bodies, 64 MiB by default, from disk if not cached).
                lsns = self.state.compaction_reads(oldest.last_lsn)
                if lsns:
                    async with self._write_lock:  # no segment is deleted while it is read
                        self.state.prefetched = await trio.to_thread.run_sync(self._read_ahead, lsns)
                moved = self.state.compact(oldest.last_lsn)
                self._submit_rewritten(self.state.take_records())
                self._deletes.append((self.state.last_lsn, oldest.last_lsn))
                self.compactions += 1
                log.info(
                    "compaction: rewrote %d live messages from %s forward; deleting it once they are on disk",
                    moved, oldest.name,
                )
            finally:
                self.state.prefetched = None
                self._compacting = False

    def _read_ahead(self, lsns: list) -> dict | None:
        """In a thread: the records ``lsns`` (and the PUBLISH_FRAMEs their PUBLISH_NEXTs name), for
        ``state.prefetched``.  None if any can't be read: compaction then reads them itself, on the
        loop, and a record truly missing fails the log there (spill.py) as it always did."""
        try:
            records = self.wal.read_payloads(lsns)
            frames = {lsn - cbor2.loads(raw) for lsn, (t, raw) in records.items() if t == R.PUBLISH_NEXT}
            missing = sorted(f for f in frames if f not in records)
            if missing:
                records.update(self.wal.read_payloads(missing))
            return records
        except Exception:  # (LookupError, OSError, damage): reported where it is read again
            return None

    def _sync_and_delete(self) -> None:
        keep = []
        for need, through in self._deletes:
            if need <= self.wal.written_lsn:
                self.wal.sync()  # the rewritten copies must be on disk before the originals go
                try:
                    deleted = self.wal.delete_segments_through(through)
                except WalFailed:
                    raise
                except OSError as exc:
                    # The manifest or an unlink failed (EMFILE, ENOSPC): nothing
                    # is lost by keeping the segment; try again after the next write.
                    if not self._delete_waiting:
                        self._delete_waiting = True
                        log.warning("could not delete compacted log segments yet (%s); retrying after the next write", exc)
                    keep.append((need, through))
                    continue
                self._delete_waiting = False
                self.segments_deleted += len(deleted)
                segs = self.wal.segments()
                if self._checkpoint_at is not None and segs and self._checkpoint_at < segs[0].first_lsn:
                    self._checkpoint_at = None  # its segment is gone: write a new one
                    self._checkpoint_lost = True
            else:
                keep.append((need, through))
        self._deletes = keep

    # -- shutdown and figures ------------------------------------------------------------
    async def close(self, checkpoint: bool = True) -> None:
        """Flush and fsync everything, release held confirms, close the log.  ``checkpoint``
        (a leader's clean stop): write one first, the next start reads the log from it; a
        follower's log must stay its leader's, record for record, and gets none."""
        async with self._write_lock:
            if self.failed is None:
                first = self.write_checkpoint() if checkpoint and self.state.log_enabled else 0
                try:
                    await self._io.run(self._close_wal, first)
                except WalFailed as exc:
                    self._fail(exc)
                    return
                self._release_durable()
                log.info("write-ahead log flushed and closed")
            else:
                self.wal.close()

    def _close_wal(self, checkpoint: int) -> None:
        if checkpoint:  # its records were appended by write_checkpoint (submit), on the loop
            self.wal.write_batch(self.wal.take_batch())
            self._save_checkpoint()
        self.wal.close()

    def statistics(self) -> dict:
        segs = self.wal.segments()
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            free = -1
        rec = self.recovery
        return {
            "wal_state": "FAILED: " + str(self.failed) if self.failed else "ok",
            "wal_fsync": self.policy,
            "wal_segments": len(segs),
            "wal_bytes": sum(s.size_bytes for s in segs),
            "wal_records_written": self.records,
            "wal_batches": self.batches,
            "wal_fsyncs": self.fsyncs,
            "wal_records_per_fsync": round(self.records / self.fsyncs, 1) if self.fsyncs else 0,
            "wal_compactions": self.compactions,
            "wal_segments_deleted": self.segments_deleted,
            "wal_compacted_bytes": self.compacted_bytes,
            "wal_live_bytes": self.live_bytes(),
            "disk_free_bytes": free,
            "recovery_seconds": round(rec.seconds, 3) if rec else 0,
            "recovery_records": rec.records if rec else 0,
            "recovery_truncated_bytes": rec.truncated_bytes if rec else 0,
        }


def _encode_record(rtype: int, payload) -> bytes:
    """A record's payload as CBOR bytes; never fails for a value's sake.

    Frames are checked before they change anything (client/wire.py refuses
    value-sharing tags, broker/handlers/binary.py encodes free-form values once), so
    the plain encoding always works.  Should a value still slip through (a
    bug), the record is written with value sharing and unknown objects as
    their repr rather than failing the log for everyone: replay reads both.
    """
    try:
        return cbor2.dumps(payload)
    except MemoryError:
        raise
    except Exception as exc:
        log.error("log record of type %s could not be encoded plainly (%s); writing it with value sharing",
                  R.NAMES.get(rtype, rtype), exc)
        return cbor2.dumps(payload, value_sharing=True, default=_encode_opaque)


def _encode_opaque(encoder, value) -> None:
    encoder.encode(repr(value))


def _whole_frames(records, last: int, max_bytes: int) -> list:
    """The records (in lsn order, through ``last``) up to about ``max_bytes``, ending where a
    PUBLISH_FRAME's PUBLISH_NEXT records end, never between them: a follower writes each batch it
    is sent at once, and may start a new segment after it; a frame and its items apart in two
    segments could be parted by the compaction of one (log_records: written "never apart").  A
    frame with its items is at most PUBLISH_FRAME_MAX_BYTES plus 19 bytes per item, so a batch
    that holds one whole may pass ``max_bytes`` by that much."""
    out, size = [], 0
    next_t = R.PUBLISH_NEXT
    frame_at = None  # index in out of the last PUBLISH_FRAME whose NEXTs may still follow
    for r in records:
        if r[0] > last:
            break
        if out and size + len(r[2]) > max_bytes and r[1] != next_t:
            break
        if r[1] == next_t and out and size + len(r[2]) > max_bytes and frame_at:
            return out[:frame_at]  # the frame's items go in the next batch, with it
        if r[1] == R.PUBLISH_FRAME:
            frame_at = len(out)
        elif r[1] != next_t:
            frame_at = None
        out.append(r)
        size += len(r[2])
    return out


def _refuse_confirms(box: dict, message: str, code: str = "LOG_FAILED") -> dict:
    """Held replies can no longer be promised: OK becomes LOG_FAILED; deliveries still go.
    A held CONFIRM_RANGE is one publish's (``[72, rid, rid]``; ranges are joined only when sent)."""
    out = {}
    for cid, frames in box.items():
        new = []
        for f in frames:
            new.append(error_frame(f[1], code, message) if f[0] == OP_OK or f[0] == OP_CONFIRM_RANGE else f)
        out[cid] = new
    return out
