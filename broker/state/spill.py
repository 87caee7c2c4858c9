"""Queues deeper than memory: ready messages whose bodies live only in the log.

Part of ``BrokerState`` (a mixin sharing its fields); pure like the rest of broker/state/:
the log is reached through one callable the runtime hands in (``set_body_reader``:
``lsns -> {lsn: (record type, payload bytes)}``, ``WriteAheadLog.read_payloads``).

What spills is a whole ``Packed`` block (broker/state/queue.py: up to 1024 plain ready
messages of one queue and priority): its ids and bodies are dropped from memory once every
one of its records is written (``spill(written_lsn)``), and read back in one go when
delivery reaches the block (``Packed.load``).  A block spills

* at once, when its bodies are ``spill_body_bytes`` or larger (big bodies never wait in
  memory for a consumer), and
* whatever its bodies, while ``spill_all`` is set: the runtime sets it while the broker's
  resident memory is past ``max_memory`` (the watermark).

Compaction reads a spilled block back to rewrite it (``ReplayMixin._compact_block``); it is
spilled again once the rewritten records are written.  The runtime reads those records in a
thread first (``compaction_reads``, ``prefetched``), so the read is not made on the event loop.  Messages with headers, a delay, a TTL
or an attempt behind them are objects (``Message``) and keep their bodies in memory.
"""

from __future__ import annotations

import cbor2

from broker.errors import LogFailed
from broker.state import log_records as R
from broker.state.queue import SPILL_NEVER


class SpillMixin:
    def _init_spill(self) -> None:
        self._body_reader = None  # set by the runtime when a log is attached
        # lsn -> (type, payload bytes) the runtime read ahead in a thread (compaction_reads);
        # None when there is none.  Records never change, so any of them may be used.
        self.prefetched: dict | None = None
        self.spill_body_bytes = SPILL_NEVER
        self.spill_all = False
        # figures (STATS): blocks and bytes left in the log now; reads back since start
        self.spill_reads = 0
        self.spill_read_bytes = 0

    def set_body_reader(self, read) -> None:
        """``read(lsns) -> {lsn: (type, payload bytes)}`` of written log records: from now on
        bodies may be left in the log (see the module's docstring)."""
        self._body_reader = read

    def configure_spill(self, body_bytes: int) -> None:
        """Bodies of ``body_bytes`` or more are left in the log once written (0: never)."""
        self.spill_body_bytes = body_bytes if body_bytes > 0 else SPILL_NEVER
        for q in self.queues.values():
            self._spill_setup(q)

    def _spill_setup(self, q) -> None:
        """A new queue: its blocks are watched for spilling if the log can take them."""
        if self._body_reader is not None:
            q.spill_body_bytes = self.spill_body_bytes
            if q.new_blocks is None:
                q.new_blocks = []

    def _read_bodies(self, lsns: list) -> dict:
        """``lsn -> (id, body)`` of messages whose PUBLISH/MESSAGE record is ``lsn`` (or whose
        PUBLISH_FRAME / PUBLISH_NEXT record is: the body is then in the frame's bytes, read once
        for all of its items asked for)."""
        records = self._read_records(lsns)
        out = {}
        n = 0
        loads = cbor2.loads
        wrapped = (R.DEAD, R.MOVE)  # their payload holds the message's record as its item 1
        frame_t, next_t = R.PUBLISH_FRAME, R.PUBLISH_NEXT
        in_frames = None  # lsn -> (frame lsn, item)
        for lsn, (t, raw) in records.items():
            n += len(raw)
            if t == frame_t or t == next_t:
                if in_frames is None:
                    in_frames = {}
                k = 0 if t == frame_t else loads(raw)
                in_frames[lsn] = (lsn - k, k)
                continue
            p = loads(raw)
            if t in wrapped:
                p = p[1]
            out[lsn] = (p[2], p[3])
        if in_frames:
            frames = {f for f, _ in in_frames.values()}
            missing = sorted(f for f in frames if f not in records)
            if missing:
                more = self._read_records(missing)
                n += sum(len(raw) for _, raw in more.values())
                records = {**records, **more}
            items = {}
            for f in frames:
                t, raw = records[f]
                if t != frame_t:
                    self.fail_log(f"log record {f} should be a PUBLISH_FRAME (its PUBLISH_NEXT records name it) "
                                  f"but is of type {R.NAMES.get(t, t)}")
                    raise LogFailed(self.log_failed)
                items[f] = loads(loads(raw)[2])[2]
            for lsn, (f, k) in in_frames.items():
                item = items[f][k]
                out[lsn] = (item[2], item[1])
        self.spill_reads += 1
        self.spill_read_bytes += n
        return out

    def compaction_reads(self, through_lsn: int) -> list:
        """The lsns ``compact(through_lsn)`` will read back: every entry left in each spilled
        block that has one at or before ``through_lsn`` (``_compact_block`` loads the block
        whole).  The runtime reads them in a thread first (``prefetched``), so that compaction
        does not read the log on the event loop."""
        out = []
        if self._body_reader is None:
            return out
        for q in self.queues.values():
            for block in q.packed_blocks():
                if block.data is not None or not len(block):
                    continue
                lsns = block.lsns if block.lsns is not None else block.seqs
                if min(lsns[block.head:]) <= through_lsn:
                    out.extend(lsns[block.head:])
        return out

    def _read_records(self, lsns: list) -> dict:
        pre = self.prefetched
        if pre is not None:  # read in a thread before (compaction_reads): what it holds needs no read now
            got, rest = {}, []
            for lsn in lsns:
                r = pre.get(lsn)
                if r is None:
                    rest.append(lsn)
                else:
                    got[lsn] = r
            if not rest:
                return got
            got.update(self._read_records_now(rest))
            return got
        return self._read_records_now(lsns)

    def _read_records_now(self, lsns: list) -> dict:
        try:
            return self._body_reader(lsns)
        except (LookupError, OSError, ValueError) as exc:
            # The log cannot give back what it was given (a segment deleted or damaged by
            # hand, a disk error): a disk fault, so the log is failed as for a write error.
            self.fail_log(f"cannot read queued message bodies back from the log: {exc}")
            raise LogFailed(self.log_failed) from None

    def spill(self, written_lsn: int, everything: bool = False) -> int:
        """Leave in the log the bodies of blocks that qualify (big bodies; all while ``spill_all``)
        and whose records are all written (lsn <= ``written_lsn``).  Looks at the blocks made
        since the last call, or at every block with ``everything``.  Returns bytes freed."""
        if self._body_reader is None:
            return 0
        freed = 0
        read = self._read_bodies
        spill_all = self.spill_all
        for q in self.queues.values():
            blocks = q.packed_blocks() if everything else q.new_blocks
            if not blocks:
                continue
            keep = []
            for block in blocks:
                if block.data is None or not len(block) or not (spill_all or block.big):
                    continue  # spilled, drained, or stays in memory (a pass with everything finds it)
                lsns = block.lsns if block.lsns is not None else block.seqs
                if max(lsns[block.head:]) > written_lsn:
                    keep.append(block)  # not all written yet: look again after the next write
                    continue
                freed += block.spill(read)
            q.new_blocks = keep
        return freed

    def spill_statistics(self) -> dict:
        blocks = spilled = 0
        for q in self.queues.values():
            for block in q.packed_blocks():
                if block.data is None:
                    blocks += 1
                    spilled += len(block)
        return {"spilled_messages": spilled, "spilled_blocks": blocks, "spill_reads": self.spill_reads,
                "spill_read_bytes": self.spill_read_bytes}
