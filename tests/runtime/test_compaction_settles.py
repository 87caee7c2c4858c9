"""Compaction as the running broker does it (Durability's own trigger over a real log), against
a model of the queued messages: whatever the mix of big and small bodies, acks, redeliveries
and restarts (clean, with a checkpoint, or a crash), recovery yields exactly the messages still
queued, and after each step the writer settles: no pass starts on compaction's own writes.

The writer task is driven by hand, one write and one ``_after_write`` at a time, as
tests/runtime/test_checkpoint_due.py does.
"""

from __future__ import annotations

import shutil
import tempfile

import cbor2
import trio
from hypothesis import HealthCheck, example, given, settings, strategies as st

from broker.config import Config
from broker.runtime.durability import Durability
from broker.state.core import BrokerState
from broker.wal.log import WriteAheadLog
from client.wire import OP_DELIVER

P, C = 1, 2
SEGMENT = 4096  # bytes: a few big bodies fill one
BIG = b"B" * 3000
SMALL = b"s" * 20


class Node:
    """One broker's log and state, opened as broker/boot.py opens them."""

    def __init__(self, directory: str):
        self.dir = directory
        self.wal = WriteAheadLog(directory, fsync="never", segment_bytes=SEGMENT)
        config = Config(port=0, data_dir=directory)
        self.state = s = BrokerState()
        s.enable_log()
        s.set_body_reader(self.wal.read_payloads)
        s.configure_spill(config.spill_body_bytes)
        records = self.wal.open(use_checkpoint=True)
        s.replay(((r.lsn, r.type, cbor2.loads(r.payload)) for r in records), 1.0, checkpoint=self.wal.replay_from)
        s.align_lsn(self.wal.next_lsn - 1)
        s.spill(self.wal.written_lsn, everything=True)
        self.dur = Durability(self.wal, s, config)
        self.dur.segment_bytes = SEGMENT  # the trigger's headroom, as --segment-bytes sets it
        s.connect(P)
        s.connect(C)
        self.held: list = []  # (tag, id) delivered, not yet acked

    async def settle(self) -> None:
        """Write what the state logged and let compaction run until it starts nothing more."""
        dur, wal, state = self.dur, self.wal, self.state
        limit = 2 * len(wal.segments()) + 20  # a sweep is one pass a segment, and its deletes
        for _ in range(limit):
            if state.records:
                dur.submit(state.take_records(), {}, lambda box: None)
            if wal.pending_count:
                await dur._locked(dur._write_pending)
            await dur._after_write()
            for f in state.take_outbox().get(C, []):
                if f[0] == OP_DELIVER:
                    self.held.append((f[2], f[4]))
            if not wal.pending_count and not state.records and not dur._deletes:
                return
        raise AssertionError(
            f"compaction never settles: {dur.compactions} passes, log of {len(wal.segments())} segments "
            f"({sum(x.size_bytes for x in wal.segments())} bytes)"
        )

    async def stop(self, clean: bool) -> None:
        if clean:
            await self.dur.close(checkpoint=True)
        else:  # kill -9: everything was written (settle), nothing more happens
            self.wal.close()


ops = st.lists(
    st.tuples(st.sampled_from(["big", "small", "consume", "ack", "nack", "clean", "crash"]), st.integers(1, 8)),
    max_size=50,
)
# The loop: big bodies queued, a restart, then small publishes acked one by one.
LOOP = [("big", 8)] * 4 + [("clean", 1), ("consume", 2)] + [("small", 1), ("ack", 1)] * 12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(ops=LOOP)
@given(ops=ops)
def test_recovery_after_any_compactions_yields_the_queued_messages(ops):
    directory = tempfile.mkdtemp(prefix="brokerd-compact-")
    try:
        trio.run(_run, directory, ops)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _run(directory: str, ops) -> None:
    node = Node(directory)
    model: set = set()
    n = 0
    for op, k in ops:
        s = node.state
        if op in ("big", "small"):
            for _ in range(k):
                n += 1
                mid = f"{op}{n}"
                s.publish(P, "q" if n % 3 else "r", BIG if op == "big" else SMALL, mid, n % 2, 1.0)
                model.add(mid)
        elif op == "consume":
            s.consume(C, ["q", "r"], k, 1.0)
        elif op in ("ack", "nack") and node.held:
            for tag, mid in node.held[:k]:
                if op == "ack":
                    s.ack(C, tag, 1.0)
                    model.discard(mid)
                else:
                    s.nack(C, tag, 1.0, requeue=True)
            del node.held[:k]
        elif op in ("clean", "crash"):
            await node.settle()
            await node.stop(op == "clean")
            node = Node(directory)
            assert sorted(m.id for m in node.state.live_messages()) == sorted(model), f"after a {op} restart"
            continue
        await node.settle()
    await node.stop(False)
    node = Node(directory)
    assert sorted(m.id for m in node.state.live_messages()) == sorted(model)
    node.wal.close()
