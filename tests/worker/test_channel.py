"""The worker's pipelined results (``client.worker.channel``): a RESULT_SET brokerd refuses, or one whose
connection is lost, lands in the sink as ``(("result", task_id, state, value, meta), error)`` (what
``Worker.check_sink`` logs and keeps for a later connection); one answered OK leaves nothing behind."""

from __future__ import annotations

import time
from collections import deque

from client import wire
from client.errors import ConnectionLost, StaleDelivery
from client.session import Session
from client.worker.channel import Channel


class _Client:
    """The blocking client's pipelined interface, over a bare Session (no socket)."""

    def __init__(self):
        self.session = Session(None, name="w", heartbeat=0.0, now=time.monotonic(), id_prefix="t")
        self.session.version = 2

    def submit(self, call, waiter):
        return call.begin(self.session, waiter)

    def flush(self):
        self.session.data_to_send(time.monotonic())

    def answer(self, frames):
        """brokerd's replies, woken as the client's reader thread does."""
        for obj in self.session.receive(frames, time.monotonic()):
            waiter = getattr(obj, "waiter", None)
            if waiter is not None:
                waiter.release()


def test_refused_and_lost_results_reach_the_sink_and_answered_ones_do_not():
    client, sink = _Client(), deque()
    ch = Channel(client, 1, sink, ttl=60)
    ch.result(None, "ok-1", "SUCCESS", 5, None)
    ch.result(None, "bad-1", "FAILURE", None, {"exc_type": "ValueError"})
    ch.flush()
    rids = sorted(client.session.pending)
    pendings = [client.session.pending[r] for r in rids]
    client.answer([[wire.OP_OK, rids[0], {"acked": False}],
                   [wire.OP_ERROR, rids[1], "STALE_DELIVERY", "delivery 3 was already settled"]])
    assert len(sink) == 1
    what, err = sink.popleft()
    assert what == ("result", "bad-1", "FAILURE", None, {"exc_type": "ValueError"})
    assert isinstance(err, StaleDelivery) and err.code == "STALE_DELIVERY"
    assert all(p.waiter.p is None for p in pendings)  # the waiter let go of its Pending (no cycle left)

    ch.result(None, "lost-1", "SUCCESS", [1, 2], None)
    client.answer([])
    for obj in client.session.connection_lost(None, address="127.0.0.1:1"):
        if getattr(obj, "waiter", None) is not None:
            obj.waiter.release()
    assert [(what, type(err)) for what, err in sink] == [(("result", "lost-1", "SUCCESS", [1, 2], None), ConnectionLost)]
