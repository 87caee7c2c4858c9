"""W2's broker side in one process, bytes in and bytes out (issue 18): the steady A/B figure for the
broker's CPU per task on a shared machine.  A benchmark, not a test.

    python bench/w2_wire.py                 # 10,000 no-op tasks, median of 5 runs
    python bench/w2_wire.py -n 20000 --repeat 3

What brokerd does for each task of ``bench/tasks.py``'s W2 run, without trio or sockets: the
producer's PUBLISH_BATCH frames (100 bench.noop envelopes, each with its resend key, as the SDK
sends them) and the worker's frames as the default worker sends them (a RESULT_SET with its
delivery's tag and ttl per task; EMIT_EVENTS with task-received, task-started and task-succeeded
per task, one frame per read) are fed as bytes to a ``FrameReader``, handled as
``broker/runtime/connection.py`` handles them, and flushed as ``Server.flush`` does: every log
record CBOR-encoded and appended to a real ``WriteAheadLog`` buffer (``Durability._append_backlog``,
nothing written to disk), every frame encoded for its connection (protocol version 2), and every
two seconds' worth of tasks the changed task histories encoded as ``broker/runtime/history.py``
does.  The clients' own encoding and decoding is not timed.  Prints the median CPU seconds of
``--repeat`` runs per ``-n`` tasks and the split between decoding, handling, records, frames and
the history.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from broker.handlers.binary import DURABLE_OPS, handle  # noqa: E402
from broker.runtime.history import HistoryFile  # noqa: E402
from broker.state import BrokerState  # noqa: E402
from client.envelope import make_envelope  # noqa: E402
from client.wire import (  # noqa: E402
    OP_CONFIRM_RANGE, OP_CONSUME, OP_DELIVER, OP_DELIVER_BATCH, OP_EMIT_EVENTS, OP_OK, OP_PUBLISH_BATCH,
    OP_RESULT_SET, FrameReader, encode_batched, encode_many,
)

P, C = 1, 2  # producer and worker connection ids
QUEUE = "bench.tasks"
PER_READ = 16  # the worker's frames handled per read (bench/tasks.py runs show ~20 per batch)
HISTORY_EVERY = 2000  # tasks between two history appends (~2 s of W2 at its current rate)


class Clock:
    def __init__(self):
        self.parts = dict.fromkeys(("decode", "handle", "records", "frames", "history"), 0.0)

    def add(self, part, t0):
        t = time.process_time()
        self.parts[part] += t - t0
        return t


def run(n: int, wal) -> Clock:
    from broker.runtime.durability import Durability

    tids = [str(uuid.uuid4()) for _ in range(n)]
    bodies = [cbor2.dumps(make_envelope("bench.noop", t, (), {})) for t in tids]
    producer_bytes = []
    rid = 10
    for start in range(0, n, 100):
        items = [[QUEUE, bodies[i], tids[i], 0, {"dedupe": f"abcdef123456-{i}"}] for i in range(start, min(n, start + 100))]
        producer_bytes.append(encode_many([[OP_PUBLISH_BATCH, rid, items]]))
        rid += 1
    s = BrokerState()
    s.connect(P)
    s.connect(C)
    s.enable_log()
    s.last_lsn = wal.next_lsn - 1

    class Config:
        fsync = "always"
        fsync_interval_ms = 1000
        segment_bytes = 64 << 20
        data_dir = "."

    dur = Durability.__new__(Durability)  # only what _append_backlog needs
    from collections import deque

    dur.wal, dur.state, dur._backlog, dur.recent, dur._recent_bytes = wal, s, deque(), deque(), 0
    dur._publish_bytes = dur._publishes = 0
    dur._memory_warned = False
    try:  # as the broker's: a PUBLISH_BATCH with the bytes it came in as (logged from them)
        readers = {P: FrameReader(keep_raw=True), C: FrameReader()}
    except TypeError:  # a checkout from before
        readers = {P: FrameReader(), C: FrameReader()}
    now = time.time()
    handle(s, C, [OP_CONSUME, 1, [QUEUE], 32, {"slots": 2}], now)
    s.take_effects()
    wal.take_batch()
    clock = Clock()
    got = []  # (tag, task id) delivered to the worker, not yet run
    wrid = 100
    done = 0
    since_history = 0
    hostname = "brokerd@bench"

    def serve(cid, data):
        t = time.process_time()
        r = readers[cid]
        r.feed(data)
        frames = r.frames()
        t = clock.add("decode", t)
        held = []
        settling = False  # as the connection does: a run of RESULT_SETs refills consumers once after it
        for f in frames:
            if settling and f[0] != OP_RESULT_SET:
                settling = False
                s.release_settles(now)
            if f[0] == OP_RESULT_SET and not settling and hasattr(s, "hold_settles"):
                settling = True
                s.hold_settles()
            reply = handle(s, cid, f, now)
            if f[0] in DURABLE_OPS:
                if f[0] == OP_PUBLISH_BATCH and reply[0] == OP_OK and reply[2] is None:
                    reply = [OP_CONFIRM_RANGE, reply[1], reply[1]]
                held.append(reply)
            else:
                s.send_to(cid, reply)
        if settling:
            s.release_settles(now)
        t = clock.add("handle", t)
        eff = s.take_effects()
        if eff.records:
            dur._backlog.extend(eff.records)
            dur._append_backlog()
            wal.take_batch()
        t = clock.add("records", t)
        out = {}
        for to, frames in eff.frames.items():
            out[to] = encode_batched(frames)
        if held:
            encode_batched(held)
        clock.add("frames", t)
        for f in eff.frames.get(C, ()):
            if f[0] == OP_DELIVER:
                got.append((f[2], f[4]))

    pi = 0
    while done < n:
        if pi < len(producer_bytes) and len(got) < 200:
            serve(P, producer_bytes[pi])
            pi += 1
            continue
        batch, got[:] = got[:PER_READ], got[PER_READ:]
        events = []
        frames = []
        for tag, tid in batch:
            events.append({"type": "task-received", "uuid": tid, "ts": now, "name": "bench.noop", "args": "()",
                           "kwargs": "{}", "queue": QUEUE, "retries": 0})
        for tag, tid in batch:
            events.append({"type": "task-started", "uuid": tid, "ts": now, "pid": 12345})
            events.append({"type": "task-succeeded", "uuid": tid, "ts": now, "runtime": 2.5e-05, "result": "None"})
            frames.append([OP_RESULT_SET, wrid, tid, "SUCCESS", None, None, {"ttl": 86400, "tag": tag}])
            wrid += 1
        frames.append([OP_EMIT_EVENTS, wrid, hostname, events])
        wrid += 1
        serve(C, encode_many(frames))
        done += len(batch)
        since_history += len(batch)
        if since_history >= HISTORY_EVERY or done >= n:
            since_history = 0
            t = time.process_time()
            HistoryFile.encode(s.history_changes())
            clock.add("history", t)
        now += 0.001
    return clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="tasks (default 10000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the median is printed (default 5)")
    a = ap.parse_args()
    from broker.wal import WriteAheadLog

    try:
        from broker.boot import tune_gc
    except ImportError:  # a checkout from before it (an A/B run): Python's defaults, as its brokerd ran
        pass
    else:
        tune_gc()  # as a serving brokerd runs
    runs = []
    with tempfile.TemporaryDirectory(prefix="brokerd-w2wire-") as tmp:
        for i in range(a.repeat):
            wal = WriteAheadLog(str(Path(tmp) / f"wal{i}"), fsync="never")
            for _ in wal.open():
                pass
            runs.append(run(a.n, wal))
            wal.close()
    totals = [sum(c.parts.values()) for c in runs]
    med = statistics.median(totals)
    mid = runs[totals.index(med)]
    print(f"w2 wire: {med:.3f} CPU-s per {a.n:,} tasks, {med / a.n * 1e6:.0f} us per task (median of {a.repeat}; "
          f"least {min(totals):.3f}; runs {', '.join(f'{t:.3f}' for t in totals)})")
    print("  " + ", ".join(f"{k} {v / a.n * 1e6:.1f} us" for k, v in mid.parts.items()))
    print(f"command: python bench/w2_wire.py -n {a.n} --repeat {a.repeat}")


if __name__ == "__main__":
    main()
