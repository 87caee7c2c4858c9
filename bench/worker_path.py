"""The worker's own CPU per no-op task, in one process, without brokerd or pool processes (issue 18): the
steady A/B figure for the worker's side of W2 on a shared machine.  A benchmark, not a test.

    python bench/worker_path.py                  # 20,000 no-op tasks, median of 5 runs
    python bench/worker_path.py -n 20000 --repeat 3 --profile

What the default worker (``--pool processes -c 2``, adaptive credit, task events on) does for each task
of ``bench/tasks.py``'s W2 run, with its real code: the client's reader thread taking DELIVER_BATCH
frames of 16 bench.noop deliveries and the OK replies to its RESULT_SETs (``Session.receive`` and the
wake-ups, "reader"); the main loop taking the deliveries (decode, check, task-received event),
handing them to two pool processes (``ProcessPool.dispatch``: jobs written to a socketpair),
taking their outcomes (``ProcessPool.on_ready``: the task's outcome, its RESULT_SET with the delivery's
tag and its events) and flushing once per turn, as ``client/worker/mainloop.py`` does ("main").  The
pool processes are stood in for: their side is read and answered here untimed (``Runner.execute`` of
a no-op task is a separate cost, ~30-40 us in its own process).  The broker is a ``Session`` fed the
replies brokerd would send; what the worker writes is dropped.  Prints the median CPU seconds per
``-n`` tasks of the two parts.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import select
import socket
import statistics
import sys
import time
import uuid
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from client import wire  # noqa: E402
from client.app import App, make_envelope  # noqa: E402
from client.session import ConsumerHandle, ConsumerState, Session  # noqa: E402
from client.worker.channel import Channel  # noqa: E402
from client.worker.pools import process as pp  # noqa: E402
from client.worker.runtime import Worker  # noqa: E402

QUEUE = "bench.tasks"
PER_BATCH = 16  # deliveries per DELIVER_BATCH frame (one read of the reader thread)
HOST = "brokerd@bench"

app = App("bench", broker="127.0.0.1:1", task_default_queue=QUEUE)


@app.task(name="bench.noop")
def noop(*args):
    return None


class Client:
    """The blocking client's pipelined interface (what ``Channel`` uses) over a bare ``Session``."""

    def __init__(self, session):
        self.session = session
        self.sent = 0

    def submit(self, call, waiter):
        return call.begin(self.session, waiter)

    def flush(self):
        self.sent += len(self.session.data_to_send(time.monotonic()))


def child_side(fd, outcome) -> int:
    """Answer every job a stand-in pool process was sent (untimed): its outcome frames, written back."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            break
        data += chunk
        if len(chunk) < 1 << 20:
            break
    out = []
    pos = 0
    while pos < len(data):
        (n,) = pp.FRAME.unpack_from(data, pos)
        for job in pp._load(data[pos + 4: pos + 4 + n]):
            blob = pp._outcome_payload(job[0], outcome, 2.5e-05, job[2], HOST)
            out.append(pp.FRAME.pack(len(blob)) + blob)
        pos += 4 + n
    if out:
        os.write(fd, b"".join(out))
    return len(out)


def run(n: int, prof=None) -> dict:
    now = time.time()
    sess = Session(None, name="w", heartbeat=0.0, now=time.monotonic(), id_prefix="b")
    sess.version = 2
    cs = ConsumerState([QUEUE], 64)
    p = sess.consume([QUEUE], 64, state=cs, slots=2)
    sess.receive([[wire.OP_OK, p.rid, 7]], time.monotonic())
    sess.data_to_send(0.0)
    client = Client(sess)
    w = Worker(app, queues=[QUEUE], concurrency=2, pool="processes", configure_logging=False, hostname=HOST)
    w.client = client
    w._gen = 1
    w._channel = Channel(client, 1, w.sink, w.result_ttl)
    w._consumer = ConsumerHandle(client, cs)
    w._direct = cs.buffer
    w.poller = select.poll()
    pool = w.pool = pp.ProcessPool(w, 2)
    others = []
    for i in range(2):  # two stand-in pool processes: a socketpair each, the far end answered here
        a, b = socket.socketpair()
        c = pp._Child()
        c.pid, c.fd, c.pidfd, c.index, c.label = 0, a.detach(), None, i + 1, f"bench-{i + 1}"
        os.set_blocking(c.fd, False)
        c.buf, c.jobs, c.done, c.assigned, c.idle_since = bytearray(), deque(), 0, 0, time.monotonic()
        pool.children[c.fd] = c
        pool.idle.append(c)
        fd = b.detach()
        os.set_blocking(fd, False)
        others.append((c, fd))
    outcome = (pp.S_ACK, "SUCCESS", None, None, None, None)
    tids = [str(uuid.uuid4()) for _ in range(n)]
    batches = []
    for start in range(0, n, PER_BATCH):
        items = [[start + i + 1, QUEUE, tids[start + i], cbor2.dumps(make_envelope("bench.noop", tids[start + i], (), {})),
                  0, 1, None] for i in range(min(PER_BATCH, n - start))]
        batches.append(wire.encode([wire.OP_DELIVER_BATCH, 7, items]))
    reader = wire.FrameReader()
    cpu = {"reader": 0.0, "main": 0.0}
    clock = time.process_time
    last_rid = sess.last_rid
    if prof is not None:
        prof.enable()
    for data in batches:
        # the reader thread: the deliveries, then brokerd's replies to what the worker sent so far
        rid = sess.last_rid
        replies = wire.encode_many([[wire.OP_OK, r, {"acked": True}] for r in range(last_rid + 1, rid + 1)
                                    if r in sess.pending]) if rid > last_rid else b""  # brokerd's: untimed
        t = clock()
        reader.feed(data)
        for obj in sess.receive(reader.frames(), time.monotonic()):
            if getattr(obj, "waiter", None) is not None:
                obj.waiter.release()
        if replies:
            last_rid = rid
            reader.feed(replies)
            for obj in sess.receive(reader.frames(), time.monotonic()):
                if getattr(obj, "waiter", None) is not None:
                    obj.waiter.release()
        t2 = clock()
        cpu["reader"] += t2 - t
        # the main loop: one turn takes the deliveries and dispatches, the next ones take outcomes
        w._take_deliveries()
        while w.backlog or w.running:
            if w.backlog:
                pool.dispatch(w.backlog, w.running, time.monotonic())
            t3 = clock()
            cpu["main"] += t3 - t2
            for c, fd in others:  # the pool processes' side: untimed
                child_side(fd, outcome)
            t2 = clock()
            for c, _ in others:
                if c.jobs:
                    pool.on_ready(c.fd)
            mono = time.monotonic()
            w.beat_if_due(mono)
            w.events.wait(mono, None)
            w.flush()
            w.credit_wait()
        cpu["main"] += clock() - t2
    if prof is not None:
        prof.disable()
    w.flush(force=True)
    for c, fd in others:
        os.close(c.fd)
        os.close(fd)
    assert w.stats.processed == n, (w.stats.processed, n)
    del now
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20_000, help="tasks (default 20000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the median is printed (default 5)")
    ap.add_argument("--profile", action="store_true", help="cProfile one more run and print where the time goes")
    a = ap.parse_args()
    run(2000)  # warm up
    runs = [run(a.n) for _ in range(a.repeat)]
    totals = [r["main"] + r["reader"] for r in runs]
    med = statistics.median_low(totals)
    mid = runs[totals.index(med)]
    print(f"worker path: {med:.3f} CPU-s per {a.n:,} tasks, {med / a.n * 1e6:.1f} us per task (median of {a.repeat}; "
          f"runs {', '.join(f'{t:.3f}' for t in totals)})")
    print("  " + ", ".join(f"{k} {v / a.n * 1e6:.1f} us" for k, v in mid.items()))
    print(f"command: python bench/worker_path.py -n {a.n} --repeat {a.repeat}")
    if a.profile:
        prof = cProfile.Profile()
        run(a.n, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
