"""Confirms on protocol version 2 (protocol.md §5.47) when the log fails: a CONFIRM_RANGE covers only
publishes whose records are on disk; the others get LOG_FAILED, one ERROR each, as their OKs would."""

from __future__ import annotations

import errno

import trio

from broker.runtime.durability import _refuse_confirms
from broker.wal import FaultPlan
from client import wire
from tests.support.inprocess import replayed_state, serve_with_fault
from tests.support.wireclient import Raw


def test_a_held_range_marker_becomes_its_publishs_error_like_an_ok():
    box = {3: [[wire.OP_CONFIRM_RANGE, 7, 7], [wire.OP_OK, 8, 2],
               [wire.OP_DELIVER, 1, 5, "q", "m", b"x", 0, 1, None]]}
    assert _refuse_confirms(box, "disk full") == {3: [
        [wire.OP_ERROR, 7, "LOG_FAILED", "disk full"], [wire.OP_ERROR, 8, "LOG_FAILED", "disk full"],
        [wire.OP_DELIVER, 1, 5, "q", "m", b"x", 0, 1, None]]}


async def test_a_full_disk_confirms_by_range_only_what_is_on_disk(tmp_path, nursery):
    server, port = await serve_with_fault(tmp_path, nursery, FaultPlan(fail_write_after_bytes=6000, errno=errno.ENOSPC))

    def produce():
        c = Raw(port, version=2)
        assert c.hello[2]["version"] == 2
        confirmed, refused = [], []
        for i in range(40):  # batches of 3 until the disk is full, and some after
            ids = [f"b{i}-{k}" for k in range(3)]
            f = c.call(wire.OP_PUBLISH_BATCH, [["q", b"z" * 40, mid] for mid in ids])
            if f[0] == wire.OP_CONFIRM_RANGE:
                confirmed += ids
            else:
                assert f[0] == wire.OP_ERROR and f[2] == "LOG_FAILED", f
                refused += ids
        return confirmed, refused

    confirmed, refused = await trio.to_thread.run_sync(produce)
    assert confirmed and refused
    server.wal.wal.close()
    have = {m.id for m in replayed_state(tmp_path / "data").live_messages()}
    assert set(confirmed) <= have  # nothing confirmed that is not stored
