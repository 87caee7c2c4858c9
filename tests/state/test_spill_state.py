"""Spilling in the pure state (broker/state/spill.py): blocks leave memory only once written,
compaction reads them back and rewrites them, and a log that cannot give a body back fails
the log (LOG_FAILED) without losing the message."""

import cbor2
import pytest

from broker.errors import LogFailed
from broker.state import BrokerState
from broker.state import log_records as R
from broker.state.queue import PACK_AFTER
from client.wire import OP_DELIVER


class FakeLog:
    """The records the state emitted, by lsn, as WriteAheadLog.read_payloads hands them back."""

    def __init__(self, state):
        self.state = state
        self.records = {}
        self.written = 0
        self.broken = False

    def write(self):
        for rtype, payload in self.state.take_records():
            self.written += 1
            self.records[self.written] = (rtype, cbor2.dumps(payload))

    def read(self, lsns):
        if self.broken:
            raise LookupError(f"log records {lsns[:1]} are not in the data dir")
        return {n: self.records[n] for n in lsns}


def spilling_state(body_bytes=100):
    s = BrokerState(boot_id="b")
    s.enable_log()
    log = FakeLog(s)
    s.set_body_reader(log.read)
    s.configure_spill(body_bytes)
    s.connect(1)
    return s, log


def deliveries(s):
    return [f for fs in s.take_outbox().values() for f in fs if f[0] == OP_DELIVER]


def test_a_block_spills_only_once_written_and_comes_back_whole():
    s, log = spilling_state()
    # the first PACK_AFTER stay objects (a short queue); the 50 behind them are packed
    bodies = [bytes([i % 256]) * (100 + i) for i in range(PACK_AFTER + 50)]
    for i, b in enumerate(bodies):
        s.publish(0, "q", b, None if i % 2 else f"id-{i}", 0, 1.0)
    assert s.spill(log.written) == 0  # nothing written yet: nothing may leave memory
    log.write()
    assert s.spill(log.written) > 0
    assert s.spill_statistics()["spilled_messages"] == 50
    s.consume(1, ["q"], 1000, 2.0)
    got = deliveries(s)
    assert [f[5] for f in got] == bodies
    assert [f[4] for f in got][::2] == [f"id-{i}" for i in range(0, PACK_AFTER + 50, 2)]
    assert s.spill_reads == 1  # the whole block in one read


def spilled_block():
    """PACK_AFTER objects and, behind them, one spilled block of 10: (state, log, messages)."""
    s, log = spilling_state()
    n = PACK_AFTER + 10
    for i in range(n):
        s.publish(0, "q", b"%03d" % i * 50, None, 0, 1.0)
    log.write()
    s.spill(log.written)
    return s, log, n


def test_compaction_rewrites_a_spilled_block_and_it_spills_again():
    s, log, n = spilled_block()
    assert s.spill_statistics()["spilled_messages"] == 10
    moved = s.compact(log.written)
    assert moved == n
    log.write()
    rewritten = [k for k, (t, _) in log.records.items() if t == R.MESSAGE]
    assert len(rewritten) == n
    for k in range(1, n + 1):
        del log.records[k]  # the old segment is deleted once the rewrite is written
    assert s.spill(log.written) > 0 and s.spill_statistics()["spilled_messages"] == 10
    s.consume(1, ["q"], 1000, 2.0)
    assert [f[5] for f in deliveries(s)] == [b"%03d" % i * 50 for i in range(n)]


def test_a_body_the_log_cannot_give_back_fails_the_log_and_the_message_stays():
    s, log = spilling_state()
    for i in range(PACK_AFTER + 1):
        s.publish(0, "q", b"x" * 500, f"m-{i}", 0, 1.0)
    log.write()
    s.spill(log.written)
    log.broken = True
    with pytest.raises(LogFailed, match="cannot read queued message bodies back"):
        s.consume(1, ["q"], 1000, 2.0)
    assert s.log_failed and s.queues["q"].ready_count == 1  # the objects went; the spilled one stays
    log.broken = False
    assert [m.id for m in s.queues["q"].iter_ready()] == [f"m-{PACK_AFTER}"]


def test_compaction_uses_the_records_read_ahead_and_reads_nothing_on_the_loop():
    s, log, n = spilled_block()
    lsns = s.compaction_reads(log.written)
    assert len(lsns) == 10  # the spilled block's entries, all of them
    assert s.compaction_reads(min(lsns) - 1) == []  # a compaction before them loads no block
    s.prefetched = log.read(lsns)  # what Durability reads in a thread first
    log.broken = True  # any read of the log now would fail the log
    assert s.compact(log.written) == n
    assert not s.log_failed
    s.prefetched = None
    log.broken = False
    log.write()
    s.consume(1, ["q"], 1000, 2.0)
    assert [f[5] for f in deliveries(s)] == [b"%03d" % i * 50 for i in range(n)]
