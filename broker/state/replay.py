"""Replay and compaction: rebuilding the state from the log, and rewriting forward what it still needs.

Part of ``BrokerState`` (a mixin sharing its fields); pure like the rest of
broker/state/: the records come in as ``(lsn, type, payload)`` and ``now`` is
passed in.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right

import cbor2

from broker.state import log_records as R
from broker.state.queue import (
    DELAYED,
    INFLIGHT,
    READY,
    Message,
    QueueOptions,
    packed_from_index,
    packed_index,
    place_block,
    split_block,
)


# Leadership terms a log remembers (EPOCH records, broker/runtime/replication.py): enough to
# find where a deposed leader's log left the new leader's after a few failovers in a row; older
# terms are dropped by compaction (a log further behind than that takes a fresh snapshot).
MAX_EPOCHS_KEPT = 64  # terms


class NotACheckpoint(ValueError):
    """A replay was told to start at a checkpoint, but its first record is not one."""


def epoch_end(epochs, epoch: int, last_lsn: int) -> int:
    """The last lsn of term ``epoch`` in a log whose terms began at ``epochs`` [(epoch, start lsn)],
    oldest first, and which ends at ``last_lsn``: the lsn before the first term newer than ``epoch``
    began, or ``last_lsn`` if none did.  A follower whose log ends later in ``epoch`` than this holds
    records this log never had (its leader wrote them unconfirmed before it was deposed): it
    truncates back to here before following (Kafka's leader-epoch idea)."""
    for e, start in epochs:
        if e > epoch:
            return min(start - 1, last_lsn)
    return last_lsn


class ReplayContext:
    """What replay carries from one record to the next: every live message by seq (placed in the
    queues only at the end), the temporary queues, the highest seq seen.  A standby (a follower)
    keeps one open for as long as it follows, so each batch of records is applied once, as it
    arrives, and promotion only places the messages (``standby_finish``): no replay of the log.

    ``checkpoint``: the lsn of the checkpoint the records start at (see "Checkpoints" below),
    whose Packed blocks are loaded whole into ``blocks``; None: the records start at the log's
    beginning, and every checkpoint met on the way is passed over."""

    __slots__ = ("msgs", "temporary", "max_seq", "standby", "checkpoint", "loading", "blocks", "frame")

    def __init__(self, standby: bool, checkpoint: int | None = None):
        self.frame = None  # (lsn, items, ts) of the last PUBLISH_FRAME: its PUBLISH_NEXT records follow
        self.temporary: set = set()
        self.max_seq = 0
        self.standby = standby
        self.checkpoint = checkpoint
        self.loading = False  # inside the checkpoint replay started at
        self.blocks = _CheckpointBlocks()
        if standby:
            self.msgs = _CountedMessages()
        elif checkpoint is not None:
            self.msgs = _BlockedMessages(self.blocks)
        else:
            self.msgs = {}


# Checkpoints
# -----------
# A log record by record costs ~12 us of CPU per queued message at start-up (scan, CRC, CBOR,
# one Message object each; cProfile of a 300,000-message replay), so 10,000,000 queued took
# minutes.  A checkpoint (``checkpoint()``, record type 33) writes the whole state in a run of
# records from which, with every record after them, the state is rebuilt: the queues' Packed
# blocks as three byte strings each (seqs, publish times, log positions of the bodies: 8 bytes a
# message, no body), every other live message as a MESSAGE record, and what compaction rewrites
# (results, schedules, declares, counters...).  Start-up then reads the log from the checkpoint
# (broker/wal: the CHECKPOINT pointer, written once these records are fsynced) and loads each
# block with array.frombytes; the bodies stay where they are in the older segments, read back
# when delivery reaches them (broker/state/spill.py), and compaction rewrites them forward
# before their segment goes, as for any spilled block.  Records after the checkpoint that name
# a message inside a loaded block (a delivery, a compaction's MESSAGE copy) take it out of its
# block (``_BlockedMessages``).  A replay that starts before a checkpoint passes over its
# blocks: the records before it already built that state.


class _CheckpointBlocks:
    """The Packed blocks a checkpoint loaded, found by seq (bisect over the blocks by their first
    seq, then within a block: its seqs ascend)."""

    __slots__ = ("blocks", "firsts", "reach", "top", "_sorted")

    def __init__(self):
        self.blocks: list = []
        self.firsts: list = []
        self.reach: list = []  # reach[k]: the highest seq in blocks[0..k] (sorted by first seq)
        self.top = 0  # the highest seq in any block: a seq above it is in none (the fast answer)
        self._sorted = True

    def add(self, block) -> None:
        if len(block.seqs):
            self.blocks.append(block)
            self.top = max(self.top, block.seqs[-1])
            self._sorted = False

    def find(self, seq: int):
        """(block, index) of the entry with ``seq`` not yet taken out, else None."""
        if seq > self.top or not self.blocks:
            return None
        if not self._sorted:
            self.blocks.sort(key=lambda b: b.seqs[0])
            self.firsts = [b.seqs[0] for b in self.blocks]
            self.reach = list(itertools.accumulate((b.seqs[-1] for b in self.blocks), max))
            self._sorted = True
        k = bisect_right(self.firsts, seq) - 1
        while k >= 0 and self.reach[k] >= seq:
            b = self.blocks[k]
            seqs = b.seqs
            if seqs[-1] >= seq:
                i = bisect_left(seqs, seq, b.head)
                if i < len(seqs) and seqs[i] == seq:
                    return b, i
            k -= 1
        return None

    def drop_queue(self, name: str) -> None:
        """PURGE: the queue's ready messages are gone, those in blocks too."""
        for b in self.blocks:
            if b.queue.name == name:
                b.head = len(b.seqs)


def _place_blocks_before(blocks: dict, q, priority: int, seq: int) -> None:
    """Put in ``q`` the loaded blocks of this priority, or the part of one, older than ``seq``."""
    waiting = blocks.get((q, priority))
    while waiting:
        b = waiting[0]
        if b.seqs[0] > seq:
            return
        if b.seqs[-1] < seq:
            place_block(q, waiting.pop(0))
            continue
        place_block(q, split_block(b, bisect_left(b.seqs, seq)))
        return
    if waiting is not None:  # all placed: the survivors after them need not look again
        del blocks[(q, priority)]


def _entry(block, i: int) -> Message:
    """Entry i of a loaded block as a Message; its id and body are still only in the log."""
    seq = block.seqs[i]
    m = Message(seq, None, block.queue, None, block.priority, None, 0, None, None, block.ts[i])
    lsn = block.lsn(i)
    if lsn != seq:
        m.lsn = lsn
    return m


class _BlockedMessages(dict):
    """Live messages by seq, during a replay from a checkpoint: a seq that is not (yet) an object
    may be an entry of a loaded block.  Looked up, it becomes an object (the block's head moves
    on; an entry from the middle of a block makes the whole block objects: rare, as delivery
    takes blocks from the front).  A MESSAGE copy of a block entry that is still a plain ready
    message (compaction rewrote it forward) only moves the entry's log position."""

    __slots__ = ("blocks",)

    def __init__(self, blocks: _CheckpointBlocks):
        super().__init__()
        self.blocks = blocks

    def _take(self, seq):
        hit = self.blocks.find(seq)
        if hit is None:
            return None
        b, i = hit
        if i == b.head:
            b.head = i + 1
            m = _entry(b, i)
            dict.__setitem__(self, seq, m)
            return m
        for j in range(b.head, len(b.seqs)):
            dict.__setitem__(self, b.seqs[j], _entry(b, j))
        b.head = len(b.seqs)
        return dict.get(self, seq)

    def get(self, seq, default=None):
        m = dict.get(self, seq)
        if m is None and type(seq) is int and seq <= self.blocks.top:
            m = self._take(seq)
        return default if m is None else m

    def __contains__(self, seq):
        return self.get(seq) is not None

    def __getitem__(self, seq):
        m = self.get(seq)
        if m is None:
            raise KeyError(seq)
        return m

    def pop(self, seq, *default):
        if self.get(seq) is None:
            if default:
                return default[0]
            raise KeyError(seq)
        return dict.pop(self, seq)

    def __setitem__(self, seq, m):
        if not dict.__contains__(self, seq) and seq <= self.blocks.top:
            hit = self.blocks.find(seq)
            if hit is not None:
                b, i = hit
                if (m.queue is b.queue and m.priority == b.priority and m.headers is None and not m.attempts
                        and m.ready_at is None and m.expires is None):
                    b.set_lsn(i, m.lsn if m.lsn is not None else seq)
                    return
                self._take(seq)
        dict.__setitem__(self, seq, m)


def _count(m, d: int) -> None:
    """A standby's queue depths, kept exact as records arrive (nothing is placed in the queues
    until promotion): in flight on the leader, delayed, or ready."""
    q = m.queue
    if m.state == INFLIGHT:
        q.inflight_count += d
    elif m.ready_at is not None:
        q.delayed_count += d
    else:
        q.ready_count += d


class _CountedMessages(dict):
    """A standby's live messages by seq; every add and removal moves its queue's depth."""

    def __setitem__(self, seq, m):
        old = dict.get(self, seq)
        if old is not None:
            _count(old, -1)
        dict.__setitem__(self, seq, m)
        _count(m, 1)

    def pop(self, seq, *default):
        m = dict.pop(self, seq, None)
        if m is None:
            if default:
                return default[0]
            raise KeyError(seq)
        _count(m, -1)
        return m

    def __delitem__(self, seq):
        _count(dict.pop(self, seq), -1)


class ReplayMixin:
    # The current leadership term and where each kept one began (EPOCH records).
    epoch = 0
    epochs: tuple = ()  # ((epoch, start lsn), ...), oldest first; replaced, never mutated
    _standby: ReplayContext | None = None

    # -- durability: replay and compaction ----------------------------------------
    def replay(self, records, now: float, checkpoint: int | None = None) -> int:
        """Rebuild the state from log records ``(lsn, type, payload)``, oldest first.

        Deliveries that were in flight come back ready with their attempts
        counted, so they are marked redelivered (or dead-lettered at
        max_attempts).  Returns the number of records applied.  Emits no
        records for what it replays; it may emit records for what it decides
        (dead-lettering) if logging is on.  ``checkpoint``: the records start at
        the checkpoint with this lsn (``WriteAheadLog.replay_from``); its blocks
        are loaded whole, their bodies left in the log (a body reader is needed).
        """
        if checkpoint is not None:
            if self._body_reader is None:
                raise ValueError("a replay from a checkpoint needs a body reader (set_body_reader)")
            records = iter(records)
            first = next(records, None)
            if first is None or first[0] != checkpoint or first[1] != R.CHECKPOINT or first[2][0] != "begin":
                raise NotACheckpoint(
                    f"the log's CHECKPOINT pointer names lsn {checkpoint}, which is not the start of a "
                    f"checkpoint (record {None if first is None else first[:2]}); delete CHECKPOINT "
                    f"from the data directory and start again to read the whole log")
            records = itertools.chain((first,), records)
        ctx = ReplayContext(standby=False, checkpoint=checkpoint)
        n = self._replay_apply(ctx, records, now)
        self._replay_place(ctx, now)
        return n

    # -- a hot standby: the replay, one batch of records at a time ----------------------
    @property
    def standby(self) -> bool:
        return self._standby is not None

    def standby_begin(self) -> None:
        """Be a standby: records applied from now on are kept as live messages, counted in their
        queues' depths, and placed in the queues only by ``standby_finish`` (promotion)."""
        self._standby = ReplayContext(standby=True)

    def standby_apply(self, records, now: float) -> int:
        """Apply a batch of records a leader sent (they are in the log already)."""
        return self._replay_apply(self._standby, records, now)

    def standby_finish(self, now: float) -> None:
        """Promotion: place every live message as replay's end does; the state serves from now on."""
        ctx, self._standby = self._standby, None
        for q in self.queues.values():  # the counts were a standby's; placing counts them again
            q.ready_count = q.delayed_count = q.inflight_count = 0
        msgs = dict(ctx.msgs)
        ctx.msgs = msgs
        self._replay_place(ctx, now)

    def reset_for_standby(self) -> None:
        """Forget everything (a step-down or a truncated log: the state is rebuilt from the log
        next); keep what the runtime attached (its probes, the result ttl) and the connections'
        ids, without their consumers (their connections are being closed)."""
        keep = {k: self.__dict__[k] for k in ("_server_stats", "output_backlog", "default_result_ttl",
                                              "_body_reader")
                if k in self.__dict__}
        names = {cid: c.name for cid, c in self.conns.items()}
        fresh = type(self)(boot_id=self._boot)
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(keep)
        for cid, name in names.items():
            self.connect(cid, name)

    def _replay_apply(self, ctx: ReplayContext, records, now: float) -> int:
        msgs = ctx.msgs
        standby = ctx.standby
        queues = self.queues
        self._replaying = True
        n = 0
        max_seq = ctx.max_seq
        temporary = ctx.temporary  # queues declared temporary: dropped after the records
        last = self.last_lsn
        # The hot case, a PUBLISH (a crash at depth replays millions since the last checkpoint):
        # _message_from inlined, and a seq above every loaded block's stored straight into the
        # dict (what _BlockedMessages.__setitem__ would do for it, without the call).
        PUBLISH, MESSAGE, FRAME, NEXT = R.PUBLISH, R.MESSAGE, R.PUBLISH_FRAME, R.PUBLISH_NEXT
        blocks = ctx.blocks
        plain_set = dict.__setitem__ if type(msgs) is not _CountedMessages else None
        bodies_in_log = self._body_reader is not None
        queues_get = queues.get
        remember = self.dedupe.remember
        for lsn, t, p in records:
            n += 1
            last = lsn
            if t == PUBLISH or t == MESSAGE or t == FRAME or t == NEXT:
                if t <= MESSAGE:  # (PUBLISH 1, MESSAGE 13; the frame's two are 35, 36)
                    seq, qname, mid, body, prio, headers, attempts, ready_at, expires, ts = p[:10]  # 11th: dedupe key
                    key = p[10] if t == PUBLISH and len(p) > 10 else None
                else:  # a PUBLISH_BATCH logged as it came: item k of the frame at lsn - k
                    if t == FRAME:
                        ctx.frame = (lsn, cbor2.loads(p[2])[2], p[1])  # the frame's items
                        k = 0
                    else:
                        k = p
                        if ctx.frame is None or ctx.frame[0] != lsn - k:
                            ctx.frame = self._frame_from_log(lsn - k, lsn)
                    ts = ctx.frame[2]
                    qname, body, mid, prio, opts = ctx.frame[1][k]
                    seq, prio, headers, attempts, ready_at, expires = lsn, prio or 0, None, 0, None, None
                    key = opts["dedupe"] if opts is not None else None  # (plain: null or {"dedupe": key})
                q = queues_get(qname)
                if q is None:
                    q = self.queue(qname)
                if bodies_in_log:
                    body = None  # still in the log at `lsn`: read back only if needed (_read_needed_bodies)
                m = Message(seq, mid, q, body, prio, headers, attempts, ready_at, expires, ts)
                if lsn != seq:
                    m.lsn = lsn
                if plain_set is not None and seq > blocks.top:
                    plain_set(msgs, seq, m)
                else:
                    msgs[seq] = m
                if seq > max_seq:
                    max_seq = seq
                if t != MESSAGE:
                    q.published += 1
                    if key is not None:  # a keyed publish: a resend after this restart is dropped too
                        remember(key, mid, ts, now)
            elif t == R.DELIVER:
                for seq in (p if type(p) is list else (p,)):
                    m = msgs.get(seq)
                    if m is not None:
                        m.attempts += 1
                        if standby:
                            _count(m, -1)
                            m.state = INFLIGHT
                            _count(m, 1)
                        else:
                            m.state = INFLIGHT
                        m.queue.delivered += 1
                        if m.attempts > 1:
                            m.queue.redelivered += 1
            elif t == R.ACK:
                for seq in (p if type(p) is list else (p,)):
                    m = msgs.pop(seq, None)
                    if m is not None:
                        m.queue.acked += 1
            elif t == R.REQUEUE:
                m = msgs.get(p[0])
                if m is not None:
                    if standby:
                        _count(m, -1)
                    m.attempts = p[1]
                    m.ready_at = p[2]
                    m.state = DELAYED if p[2] is not None else READY
                    if standby:
                        _count(m, 1)
                    if len(p) > 3:
                        m.headers = p[3]
            elif t == R.RESULT:
                self._replay_result(p, lsn, msgs)
            elif t == R.FORGET:
                r = self.results.get(p)
                if r is not None:
                    self._drop_result(r)
            elif R.SCHED_PUT <= t <= R.SCHED_STATE:
                self._replay_schedule_record(t, p, lsn, msgs)
                if t == R.SCHED_TICK and p[2] is not None and p[2][0] > max_seq:
                    max_seq = p[2][0]
            elif t == R.REVOKE:
                self._replay_revoke(p, now)
            elif R.CHORD <= t <= R.CHORD_FIRE or t == R.CHORD_ADD or t == R.CHORD_RUN:
                self._replay_chord_record(t, p, lsn, msgs, now)
                if t == R.CHORD_FIRE and p[2] is not None and p[2][0] > max_seq:
                    max_seq = p[2][0]
            elif t == R.DEAD or t == R.MOVE:
                old = msgs.pop(p[0], None)
                if old is not None and t == R.DEAD:
                    old.queue.dead_lettered += 1
                m = self._message_from(p[1], lsn, True)
                msgs[m.seq] = m
                if m.seq > max_seq:
                    max_seq = m.seq
            elif t == R.DROP:
                m = msgs.pop(p[0], None)
                if m is not None:
                    if p[1] == "revoked":
                        m.queue.expired += 1  # as counted while running
                    else:
                        m.queue.dead_lettered += 1
            elif t == R.EXPIRE:
                m = msgs.pop(p, None)
                if m is not None:
                    m.queue.expired += 1
            elif t == R.DECLARE:
                q = self.queue(p[0])
                q.options = QueueOptions.from_wire(p[1])
                q.declared = True
                if len(p) > 2 and p[2]:
                    temporary.add(p[0])
                else:
                    temporary.discard(p[0])
                if q.options.rate_limit is not None:
                    self.set_queue_rate(q, q.options.rate_limit)
            elif t == R.DELETE:
                for seq in [s_ for s_, m in msgs.items() if m.queue.name == p]:
                    del msgs[seq]
                queues.pop(p, None)
                temporary.discard(p)
                if self.exchanges:
                    self._unbind_queue(p)
            elif t == R.BIND or t == R.UNBIND:
                self._replay_exchange_record(t, p)
            elif t == R.UNIQUE or t == R.UNIQUE_FREE:
                self._replay_unique_record(t, p)
            elif t == R.PURGE:
                for seq in [s_ for s_, m in msgs.items() if m.queue.name == p and m.state != INFLIGHT]:
                    del msgs[seq]
                if ctx.blocks.blocks:
                    ctx.blocks.drop_queue(p)
            elif t == R.PAUSE:
                self.queue(p[0]).paused = bool(p[1])
            elif t == R.RATE:
                self._replay_rate(p)
            elif t == R.EPOCH:
                self._replay_epoch(p, lsn)
            elif t == R.CHECKPOINT:
                self._replay_checkpoint(ctx, p, lsn, now)
                if ctx.blocks.top > max_seq:
                    max_seq = ctx.blocks.top
            elif t == R.COUNTERS:
                for name, values in p.items():
                    q = self.queue(name)
                    for field, v in zip(R.COUNTER_FIELDS, values):
                        setattr(q, field, v)
            # unknown types are from a newer brokerd: the log's format version guards that
        self._replaying = False
        self.last_lsn = last
        ctx.max_seq = max_seq
        self._seq = itertools.count(max(max_seq, self._peek_seq()) + 1)
        return n

    def _replay_place(self, ctx: ReplayContext, now: float) -> None:
        """After the records: put every live message in its queue (ready or delayed)."""
        msgs = ctx.msgs
        self._replay_drop_temporary(msgs, ctx.temporary)
        # A checkpoint's blocks (unless their queue was deleted, or was temporary, after it) by
        # queue and priority, in seq order: each goes in ahead of the first ready survivor with
        # a higher seq (``_place_blocks_before``), so FIFO holds within a priority as below.
        blocks: dict = {}
        for block in sorted(ctx.blocks.blocks, key=lambda b: b.seqs[0]):
            if self.queues.get(block.queue.name) is block.queue and block.head < len(block.seqs):
                if block.head:  # entries taken out by the records after the checkpoint
                    split_block(block, block.head)
                blocks.setdefault((block.queue, block.priority), []).append(block)
        ctx.blocks = _CheckpointBlocks()
        # The survivors, in publish order so FIFO holds within a priority.
        survivors = sorted(dict.values(msgs), key=lambda m: m.seq)
        del msgs
        if self._body_reader is not None:
            self._read_needed_bodies(survivors, now)
        for m in survivors:
            q = m.queue
            if m.headers:
                self._replay_flow_tag(m)
            if m.expires is not None:
                self._ttl.add((m.expires, m.seq, m))
            if m.state == INFLIGHT:
                m.state = READY
                if self._over_attempts(m, now):
                    continue
            if m.ready_at is not None and m.ready_at > now:
                m.state = DELAYED
                q.delayed_count += 1
                self._delayed.add((m.ready_at, m.seq, m))
            else:
                m.ready_at = None
                if blocks and (q, m.priority) in blocks:
                    _place_blocks_before(blocks, q, m.priority, m.seq)
                if m.body is None:
                    q.push_spilled(m, self._read_bodies)  # a plain ready message: its body stays in the log
                else:
                    q.push_ready(m)
        for (q, _), rest in blocks.items():
            for block in rest:
                place_block(q, block)
        self._after_replay_schedules(now)
        self._after_replay_chords(now)

    # -- leadership terms ------------------------------------------------------------------
    def _replay_epoch(self, p, lsn: int) -> None:
        epoch, start = p[0], p[1]
        self.epoch = max(epoch, self.epoch)
        kept = [e for e in self.epochs if e[0] != epoch]
        kept.append((epoch, start))
        kept.sort()
        self.epochs = tuple(kept[-MAX_EPOCHS_KEPT:])

    def begin_epoch(self, epoch: int) -> int:
        """Promotion: log EPOCH ``epoch`` (a new term starting at its own lsn); returns that lsn."""
        start = self.last_lsn + 1
        lsn = self._log(R.EPOCH, [epoch, start])
        self._replay_epoch([epoch, start], lsn)
        return lsn

    def epoch_end(self, epoch: int) -> int:
        """The last lsn of term ``epoch`` in this state's log (``epoch_end``)."""
        return epoch_end(self.epochs, epoch, self.last_lsn)

    def _read_needed_bodies(self, survivors: list, now: float) -> None:
        """Replay left every body in the log; read back, in one pass, those of the messages that
        will not be plain ready messages in a Packed block (in flight at the crash, delayed,
        with headers or a TTL, or in a queue delivering round-robin across tenants)."""
        need = {}
        for m in survivors:
            if m.body is None and (
                m.state == INFLIGHT or m.attempts or m.headers is not None or m.expires is not None
                or (m.ready_at is not None and m.ready_at > now) or m.queue.tenanted
            ):
                need[m.lsn or m.seq] = m
        if need:
            for lsn, (mid, body) in self._read_bodies(sorted(need)).items():
                m = need[lsn]
                m.body = body
                if m.id is None:  # taken out of a checkpoint's block: its id is in the log too
                    m.id = mid

    def _frame_from_log(self, frame_lsn: int, lsn: int):
        """``(lsn, items, ts)`` of the PUBLISH_FRAME at ``frame_lsn``, read from the log: record
        ``lsn``, one of its PUBLISH_NEXT records, came in a replay that did not start with it.
        (A frame and its items are written in one batch, so a replay from a checkpoint or a
        follower's batches never part them; this is the defensive way back.)"""
        reader = self._body_reader
        if reader is not None:
            try:
                t, raw = reader([frame_lsn])[frame_lsn]
            except (LookupError, OSError, ValueError):
                t = None
            if t == R.PUBLISH_FRAME:
                p = cbor2.loads(raw)
                return frame_lsn, cbor2.loads(p[2])[2], p[1]
        raise ValueError(f"log record {lsn} (PUBLISH_NEXT) is an item of the PUBLISH_FRAME at lsn {frame_lsn}, "
                         "which the log does not hold")

    def _peek_seq(self) -> int:
        nxt = next(self._seq)
        self._seq = itertools.count(nxt)
        return nxt - 1

    def _message_from(self, p, lsn, in_log: bool = False) -> Message:
        """``in_log``: record ``lsn`` is a PUBLISH, MESSAGE, DEAD or MOVE, whose body the log
        gives back by lsn (broker/state/spill.py); schedule and chord records carry theirs in
        another shape and keep it."""
        seq, qname, mid, body, prio, headers, attempts, ready_at, expires, ts = p[:10]  # 11th: dedupe key
        if in_log and self._body_reader is not None:
            body = None  # still in the log at `lsn`: read back only if it must be in memory (_read_needed_bodies)
        m = Message(seq, mid, self.queue(qname), body, prio, headers, attempts, ready_at, expires, ts)
        if lsn != seq:
            m.lsn = lsn
        return m

    def live_messages(self, packed: list | None = None):
        """Every message the broker still holds: ready, delayed and in flight.  Given a list
        ``packed``, the ready messages in Packed blocks are not made into objects: the blocks
        are appended to it instead."""
        for q in self.queues.values():
            if packed is None:
                yield from q.iter_ready()
            else:
                packed.extend(q.packed_blocks())
                for m in q.iter_ready(unpacked=False):
                    yield m
        for _, _, m in self._delayed:
            if m.state == DELAYED:
                yield m
        for d in self.inflight.values():
            yield d.msg
        yield from self.parked_messages()

    def _compact_block(self, block, through_lsn: int) -> int:
        n = 0
        lsns = block.lsns if block.lsns is not None else block.seqs
        if not len(block) or min(lsns[block.head:]) > through_lsn:
            return 0
        if block.data is None:
            # Spilled, and its records are about to go: read it back (one segment's worth of
            # blocks at most, as compaction rewrites one segment at a time); spilled again
            # once the MESSAGE records below are written.
            block.load()
            if self._body_reader is not None and block.queue.new_blocks is not None:
                block.queue.new_blocks.append(block)
        for i in range(block.head, len(block.seqs)):
            if block.lsn(i) <= through_lsn:
                block.set_lsn(i, self._log(R.MESSAGE, R.message_payload(self._block_message(block, i))))
                n += 1
        return n

    def _block_message(self, block, i: int):
        """Entry i of a Packed block as a Message."""
        return block.message(i)

    def compact(self, through_lsn: int) -> int:
        """Rewrite forward everything the log still needs from records <= through_lsn.

        Emits a MESSAGE record for every live message whose full state was last
        written at or before ``through_lsn``, the options and pause state of
        every declared or paused queue, and every queue's counters.  Once these
        records are durable, segments ending at or before ``through_lsn`` hold
        nothing needed and may be deleted.  Returns how many messages moved.
        """
        if not self.log_enabled:
            return 0
        n = 0
        packed = []
        for m in list(self.live_messages(packed)):
            if (m.lsn or m.seq) <= through_lsn:
                self._rewrite(m)
                n += 1
        for block in packed:  # ready messages without an object each: their lsn is kept in the block
            n += self._compact_block(block, through_lsn)
        self._compact_rest(through_lsn)
        return n

    def _rewrite(self, m) -> None:
        """A MESSAGE record with ``m``'s full state.  One in flight is written with the attempt
        it is on taken off, then delivered again (DELIVER), so that a replay from here knows it
        is in flight, as a replay of the older records does (a PURGE after the copy dropped it)."""
        if m.state == INFLIGHT and m.attempts:
            m.attempts -= 1
            m.lsn = self._log(R.MESSAGE, R.message_payload(m))
            m.attempts += 1
            self._log(R.DELIVER, m.seq)
        else:
            m.lsn = self._log(R.MESSAGE, R.message_payload(m))

    def _compact_rest(self, through_lsn: int) -> None:
        """What compaction and a checkpoint both rewrite besides the messages."""
        self._compact_results(through_lsn)
        self._compact_workflow(through_lsn)
        self._compact_exchanges()
        self._compact_unique()
        for q in self.queues.values():
            if q.owner is not None:
                self._log(R.DECLARE, [q.name, q.options.to_wire(), True])
            elif q.declared:
                self._log(R.DECLARE, [q.name, q.options.to_wire()])
            if q.paused:
                self._log(R.PAUSE, [q.name, True])
        self._compact_flow()
        for epoch, start in self.epochs:  # the terms, with where they began (a deposed leader needs them)
            self._log(R.EPOCH, [epoch, start])
        self._log(
            R.COUNTERS,
            {q.name: [getattr(q, f) for f in R.COUNTER_FIELDS] for q in self.queues.values()},
        )

    # -- checkpoints (see "Checkpoints" at the top) -----------------------------------------
    def checkpoint(self) -> int:
        """Write the whole state as a checkpoint; returns the lsn of its first record (0 with
        the log off).  Once every record of it is durable, start-up may read the log from that
        lsn on (``WriteAheadLog.save_checkpoint``).  Nothing is deleted: the bodies of the
        blocks stay in their records, which compaction rewrites forward as before."""
        if not self.log_enabled:
            return 0
        # The dedupe window (producers' resends dropped): what the PUBLISH records before the
        # checkpoint would have told a replay.
        window = [[k, mid, at] for k, (mid, at) in self.dedupe._keys.items()]
        first = self._log(R.CHECKPOINT, ["begin", window])
        packed = []
        for m in list(self.live_messages(packed)):
            self._rewrite(m)
        for block in packed:
            if len(block):
                self._log(R.CHECKPOINT, ["block", block.queue.name, block.priority, *packed_index(block)])
        self._compact_rest(first)
        return first

    def _replay_checkpoint(self, ctx: ReplayContext, p, lsn: int, now: float) -> None:
        kind = p[0]
        if kind == "begin":
            ctx.loading = lsn == ctx.checkpoint
            if ctx.loading:
                for key, mid, at in p[1]:
                    self.dedupe.remember(key, mid, at, now)
        elif kind == "block" and ctx.loading:
            _, qname, priority, seqs, ts, lsns = p
            ctx.blocks.add(packed_from_index(self.queue(qname), priority, seqs, ts, lsns, self._read_bodies))
