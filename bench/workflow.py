"""Schedules, groups and chords: the figures of the workflow issue.  A benchmark, not a test.

    python bench/workflow.py

1. **Schedule lateness under load**: an entry every 0.1 s fires for
   ``--seconds`` while a producer floods no-op tasks through one worker beside
   it; a dedicated idle consumer of the schedule's queue records, for each
   firing, receive time minus the tick it belongs to (the ``x-tick`` header):
   brokerd's firing delay plus delivery.  p50/p99 and the load's rate.
2. **A 1,000-member group and a 1,000-member chord** of no-op tasks through
   one worker (processes pool): seconds from send to the last result.
3. **Tick cost against the number of schedule entries** (pure state, no
   sockets): the cost of ``BrokerState.tick`` with N idle entries, and how
   many entries firing in the same tick fit in 1 ms.

It starts its own brokerd and worker on 127.0.0.1 and stops them by pid; the
last line printed is the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tasks import QUEUE, Broker, WorkerProc, app, noop  # noqa: E402
from client import Client  # noqa: E402
from client.app import make_envelope  # noqa: E402
from client.canvas import chord, group  # noqa: E402


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def lateness(broker: Broker, seconds: float) -> None:
    c = Client(broker.address)
    c.schedule_put("bench-tick", {"every": 0.1, "queue": "sched", "body": {"task": "bench.noop", "args": [], "kwargs": {}}})
    stop = threading.Event()
    flood = {"n": 0}

    def producer():
        with Client(broker.address) as p:
            body = __import__("cbor2").dumps(make_envelope("bench.noop", "x", (), {}))
            while not stop.is_set():
                for _ in range(500):
                    p.publish(QUEUE, body, confirm=False)
                p.wait_for_confirms()
                flood["n"] += 500

    lates = []
    t = threading.Thread(target=producer)
    t.start()
    t0 = time.time()
    consumer = c.consume(["sched"], prefetch=100)
    while time.time() - t0 < seconds:
        d = consumer.get(timeout=1.0)
        if d is None:
            continue
        lates.append(time.time() - d.headers["x-tick"])
        d.ack()
    stop.set()
    t.join()
    rate = flood["n"] / (time.time() - t0)
    c.schedule_remove("bench-tick")
    c.close()
    print(f"schedule lateness (every 0.1 s, {len(lates)} firings over {seconds:g} s, beside {rate:,.0f} task publishes/s"
          f" through one worker): p50 {pct(lates, 50) * 1000:.2f} ms, p99 {pct(lates, 99) * 1000:.2f} ms,"
          f" max {max(lates) * 1000:.2f} ms")


def group_and_chord(broker: Broker, n: int) -> None:
    app.conf.broker_url = broker.address
    with Client(broker.address) as c:  # drop the flood left by the lateness phase
        c.purge(QUEUE)
    sigs = [noop.s(i) for i in range(n)]
    t0 = time.monotonic()
    res = group(sigs).apply_async().get(timeout=300)
    g = time.monotonic() - t0
    assert len(res) == n
    t0 = time.monotonic()
    chord([noop.s(i) for i in range(n)], noop.s())().get(timeout=300)
    ch = time.monotonic() - t0
    print(f"{n:,}-member group: {g:.2f} s from send to the last result ({n / g:,.0f} tasks/s, sends pipelined);"
          f" {n:,}-member chord: {ch:.2f} s to its body's result")


def tick_cost() -> None:
    from broker.state import BrokerState

    t0 = 1_800_000_000.0
    print("tick cost against schedule entries (pure state):")
    for n in (1_000, 10_000, 100_000, 1_000_000):
        s = BrokerState()
        rnd = random.Random(1)
        for i in range(n):
            s.schedule_put(f"e{i}", {"every": 86400.0, "anchor": t0 + rnd.random() * 86400, "body": b"x"}, t0)
        now = t0 + 10
        ticks = 2000
        start = time.perf_counter()
        for k in range(ticks):
            s.tick(now + k * 0.001)
        idle = (time.perf_counter() - start) / ticks
        print(f"  {n:>9,} entries (about {n / 86400:.3f} due per ms): {idle * 1e6:,.1f} µs per tick")
    # a burst: N entries due in the same tick
    for n in (100, 1_000, 10_000):
        s = BrokerState()
        for i in range(n):
            s.schedule_put(f"b{i}", {"every": 60.0, "anchor": t0 + 60, "body": b"x"}, t0)
        start = time.perf_counter()
        s.tick(t0 + 60)
        dt = time.perf_counter() - start
        print(f"  {n:>9,} entries firing in one tick: {dt * 1000:,.2f} ms ({n / (dt * 1000):,.0f} firings per ms)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--broker-args", default="")
    args = ap.parse_args(argv)
    print(f"brokerd bench/workflow.py: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, broker args {args.broker_args or 'none'}")
    tmp = tempfile.mkdtemp(prefix="brokerd-wf-bench-")
    broker = Broker(shlex.split(args.broker_args), os.path.join(tmp, "data"))
    worker = WorkerProc(broker.address, "processes", 2, 64, "warning", os.path.join(tmp, "worker.log"))
    try:
        lateness(broker, args.seconds)
        group_and_chord(broker, args.members)
    finally:
        worker.stop()
        broker.stop()
    tick_cost()
    print("reproduce: ", shlex.join(["python", "bench/workflow.py", "--seconds", str(args.seconds),
                                     "--members", str(args.members)] + (["--broker-args", args.broker_args] if args.broker_args else [])))


if __name__ == "__main__":
    main()
