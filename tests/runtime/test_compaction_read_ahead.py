"""Compaction reads the spilled blocks it rewrites in a thread, before it runs on the loop
(broker/runtime/durability.py ``_read_ahead``, broker/state/spill.py ``compaction_reads``): a
segment's worth of bodies, from disk if not cached, no longer stalls every connection.
Durability over a real log, driven by hand."""

import threading

import trio

from broker.config import Config
from broker.runtime.durability import Durability
from broker.state.core import BrokerState
from broker.state.queue import PACK_AFTER
from broker.wal.log import WriteAheadLog


async def test_compaction_reads_spilled_bodies_in_a_thread_not_on_the_loop(tmp_path, monkeypatch):
    wal = WriteAheadLog(str(tmp_path), fsync="never", segment_bytes=64 * 1024)
    list(wal.open())
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    loop_reads = []

    def reader(lsns):
        if threading.current_thread() is threading.main_thread():
            loop_reads.append(len(lsns))
        return wal.read_payloads(lsns)

    state.set_body_reader(reader)
    state.configure_spill(500)  # bodies of 500 bytes or more wait in the log
    dur = Durability(wal, state, Config(port=0, data_dir=str(tmp_path), fsync="never"))
    n = PACK_AFTER + 200
    for i in range(n):
        state.publish(1, "q", bytes([i % 256]) * 600, f"m-{i}", 0, 1.0)
    dur.submit(state.take_records(), {}, lambda box: None)
    await dur._locked(dur._write_pending)
    assert state.spill(wal.written_lsn) > 0
    assert len(wal.segments()) >= 2  # the first segment holds spilled messages compaction must rewrite
    read_ahead = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        read_ahead.append(getattr(fn, "__name__", fn))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    monkeypatch.setattr(dur, "needs_compaction", lambda: True)
    await dur._after_write()
    assert dur.compactions == 1 and "_read_ahead" in read_ahead
    assert loop_reads == []  # every body it rewrote came from the read-ahead
    assert state.prefetched is None  # not kept past the compaction
    state.connect(2)
    state.consume(2, ["q"], 10_000, 2.0)
    got = [f[5] for fs in state.take_outbox().values() for f in fs if f[0] == 66]
    assert got == [bytes([i % 256]) * 600 for i in range(n)]
    wal.close()
