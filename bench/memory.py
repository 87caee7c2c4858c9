"""Queues deeper than memory (issue 18 item 3): the broker's memory per queued message,
throughput at a deep queue against an empty one, and recovery time.  A benchmark, not a test.

    python bench/memory.py                               # 1,000,000 x 100 B queued
    python bench/memory.py -n 2000000 --size 1000 --broker-args="--max-memory 2G"
    python bench/memory.py -n 1000000 --rate 100000      # + e2e throughput deep vs empty
    python bench/memory.py -n 1000000 --rate 50000 --repeat 3   # each flow 3 times, medians
    python bench/memory.py -n 1000000 --recovery         # + restart: seconds to "ready"
    python bench/memory.py -n 10000000 --direct          # recovery only, of a log written in-process

What it does: starts its own brokerd (``python -m broker --host 127.0.0.1 --port 0
--data-dir <tmp> ARGS``, tests/support/broker.py), reads its VmRSS from /proc/<pid>/status
before and after one producer process publishes ``-n`` messages (confirmed) that nobody
consumes, and reports bytes per message beyond the body.  With ``--rate K`` it first moves K
messages producer -> consumer through a side queue while the broker is empty, then again with
the ``-n`` messages queued (``--repeat R``: R times each, medians), and then drains K messages
from the deep queue itself.  Besides messages per second (first publish -> last delivery: on a
shared machine, mostly a measure of the neighbours) it gives the broker's CPU-seconds per message
in each flow (from /proc/<pid>/stat): the steadier figure for "does depth cost the broker".  With
``--recovery`` it stops the broker (SIGTERM) and times the restart to "ready" (the replay of
the log; with ``--rate``, then drains K more from the deep queue, whose bodies a restart from a
checkpoint reads back from the log).  The broker is stopped by its pid at the end; the last line is the command.

``--direct`` measures recovery alone at depths a producer process takes too long to fill: it
writes the log in-process (the broker state and the write-ahead log, as brokerd does, ``-n``
publishes of ``--size`` bytes to one queue, then the checkpoint a clean stop writes), then
times brokerd's start on it, a clean stop (SIGTERM: a new checkpoint) and a second start.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.core import Broker, last_json, spawn  # noqa: E402

DEEP = "bench.memory.deep"
SIDE = "bench.memory.side"


class _Args:
    """What bench/core.py's child processes read from their command line."""

    def __init__(self, n, size, prefetch=100):
        self.n, self.size, self.prefetch = n, size, prefetch
        self.window = 0
        self.rate = 0
        self.tenants = 0
        self.rate_limit = ""


def flow(address: str, queue: str, k: int, size: int, produce: bool = True, broker=None) -> tuple:
    """Move k messages through ``queue`` (a consumer process, and a producer process unless
    ``produce`` is false: the consumer drains what is queued); returns (messages per second,
    the broker's CPU-seconds meanwhile or None without ``broker``, the clients' CPU-seconds)."""
    a = _Args(k, size)
    cpu0 = broker.cpu_seconds() if broker is not None else None
    cons = spawn("consumer", address, a, queue=queue)
    if cons.stdout.readline().strip() != "ready":
        raise SystemExit("the consumer did not subscribe")
    if produce:
        p = last_json(spawn("producer", address, a, queue=queue), "producer", 1800)
        c = last_json(cons, "consumer", 1800)
        rate, clients = k / (c["last_delivery"] - p["first_publish"]), p["cpu_s"] + c["cpu_s"]
    else:
        c = last_json(cons, "consumer", 1800)
        rate, clients = k / (c["last_delivery"] - c["first_delivery"]), c["cpu_s"]
    return rate, (broker.cpu_seconds() - cpu0 if broker is not None else None), clients


def flows(broker, queue: str, k: int, size: int, repeat: int) -> list:
    """``repeat`` runs of ``flow`` through ``queue``, one after the other."""
    return [flow(broker.address, queue, k, size, broker=broker) for _ in range(repeat)]


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def queued(broker, queue: str) -> int:
    from client.producer import Client

    with Client(broker.address, name="bench-memory-probe") as c:
        return c.stats(queue)["ready"]


def direct(n: int, size: int, broker_args: list, tmp: str, after: int = 0) -> None:
    """``--direct``: recovery of ``n`` queued messages from a log written in-process; with
    ``after``, that many more publishes follow the checkpoint (what a kill -9 leaves: the start
    replays them one record at a time)."""
    import gc

    import cbor2

    from broker.state import BrokerState
    from broker.wal import WriteAheadLog
    from tests.support.broker import BrokerProcess

    data_dir = os.path.join(tmp, "data")
    t0 = time.monotonic()
    gc.disable()  # one long-lived object per block; the collector would rescan them all
    wal = WriteAheadLog(data_dir, fsync="never")
    list(wal.open())
    state = BrokerState()
    state.enable_log()
    state.connect(1)
    state.declare(DEEP, None, 0.0)
    body = b"x" * size

    def write():
        for t, p in state.take_records():
            wal.append(t, cbor2.dumps(p))
        wal.write_batch(wal.take_batch())
        state.take_outbox()

    # As the SDK's producer publishes: PUBLISH_BATCH frames of 100, each logged as it came
    # (a PUBLISH_FRAME and 99 PUBLISH_NEXT records) where this checkout does that.
    try:
        from broker.handlers.binary import handle
        from client.wire import OP_PUBLISH_BATCH, RawFrame
    except ImportError:  # a checkout from before: one PUBLISH record per message
        RawFrame = None

    def publish(start: int, count: int) -> None:
        if RawFrame is None:
            for _ in range(count):
                state.publish(1, DEEP, body, None, 0, 1000.0)
            return
        for s in range(start, start + count, 100):
            frame = [OP_PUBLISH_BATCH, s, [[DEEP, body, f"m{i}", 0, None] for i in range(s, min(start + count, s + 100))]]
            handle(state, 1, [*frame, RawFrame(cbor2.dumps(frame))], 1000.0)

    for s in range(0, n, 5000):
        publish(s, min(5000, n - s))
        write()
    first = state.checkpoint()  # what a clean stop writes
    write()
    wal.sync()
    wal.save_checkpoint(first)
    for s in range(n, n + after, 5000):  # records past the checkpoint: a crash, not a clean stop, ended the broker
        publish(s, min(5000, n + after - s))
        write()
    write()
    wal.sync()
    wal.close()
    del state
    gc.enable()
    log_bytes = sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir) if f.endswith(".wal"))
    print(f"log         {n + after:,} queued msgs of {size} B written in-process in {time.monotonic() - t0:.0f} s "
          f"({log_bytes / 2**20:,.0f} MiB of log, a checkpoint after {n:,}"
          f"{f', then {after:,} publish records: a crash, no clean stop' if after else ''})")
    broker = BrokerProcess(data_dir, *broker_args)
    try:
        for what in ("start", "after a clean stop"):
            broker.start(timeout=3600)
            cpu = broker.cpu_seconds()
            line = next(line for line in reversed(broker.log) if "recovered" in line)
            print(f"recovery    {what}: ready after {broker.started_in:.1f} s, {cpu:.1f} CPU-s, "
                  f"RSS {broker.rss() / 2**20:.0f} MiB; {queued(broker, DEEP):,} queued\n"
                  f"            ({line.split('brokerd: ', 1)[-1]})")
            if what == "start":
                t0 = time.monotonic()
                broker.terminate(timeout=600)
                print(f"clean stop  {time.monotonic() - t0:.1f} s (writes the checkpoint of {n:,} queued)")
    finally:
        broker.kill()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000, help="messages left queued (default 1000000)")
    ap.add_argument("--size", type=int, default=100, help="body bytes, >= 8 (default 100)")
    ap.add_argument("--rate", type=int, default=0, metavar="K",
                    help="also move K messages end to end at an empty broker and at the deep one (default 0: skip)")
    ap.add_argument("--repeat", type=int, default=1, metavar="R",
                    help="with --rate: R runs at the empty broker and R at the deep one, medians shown (default 1)")
    ap.add_argument("--recovery", action="store_true", help="also restart the broker and time its recovery")
    ap.add_argument("--broker-args", default="", help='extra brokerd flags, e.g. --broker-args="--fsync never"')
    ap.add_argument("--direct", action="store_true",
                    help="only recovery, of a log written in-process (see above)")
    ap.add_argument("--after", type=int, default=0, metavar="K",
                    help="with --direct: K more publishes after the checkpoint, as a kill -9 leaves them")
    args = ap.parse_args(argv)
    broker_args = shlex.split(args.broker_args)
    print(f"brokerd bench/memory.py: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, broker args {broker_args or 'none'}")
    if args.direct:
        with tempfile.TemporaryDirectory(prefix="brokerd-bench-memory-") as tmp:
            direct(args.n, args.size, broker_args, tmp, args.after)
        cmd = ["python", "bench/memory.py", "-n", str(args.n), "--size", str(args.size), "--direct"]
        if args.after:
            cmd += ["--after", str(args.after)]
        if broker_args:
            cmd += [f"--broker-args={shlex.join(broker_args)}"]
        print("command:", shlex.join(cmd))
        return
    with tempfile.TemporaryDirectory(prefix="brokerd-bench-memory-") as tmp:
        broker = Broker(broker_args, tmp)
        try:
            from client.producer import Client

            with Client(broker.address, name="bench-memory-probe") as c:
                c.declare(DEEP)
            empty = flows(broker, SIDE, args.rate, args.size, args.repeat) if args.rate else None
            time.sleep(0.2)  # let the broker go idle before the baseline (a reading, not synchronisation)
            before = broker.rss()
            t0 = time.monotonic()
            last_json(spawn("producer", broker.address, _Args(args.n, args.size), queue=DEEP), "producer", 7200)
            fill_s = time.monotonic() - t0
            after = broker.rss()
            n = queued(broker, DEEP)
            per = (after - before) / args.n
            print(f"memory      {n:,} queued msgs of {args.size} B (published in {fill_s:.1f} s, {args.n / fill_s:,.0f}/s)")
            print(f"  broker RSS        {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
            if per >= args.size:
                print(f"  per message       {per:>8.0f} B  ({per - args.size:.0f} B beyond the {args.size} B body)")
            else:  # less than the body: the bodies stayed in the log segments (spilled), only the index is in memory
                print(f"  per message       {per:>8.0f} B  (less than the {args.size} B body: bodies spilled to the log)")
            if args.rate:
                time.sleep(0.2)
                deep = flows(broker, SIDE, args.rate, args.size, args.repeat)
                drain, cpu_m, _ = flow(broker.address, DEEP, args.rate, args.size, produce=False, broker=broker)
                k = args.rate
                e_rate, d_rate = _median([r for r, _, _ in empty]), _median([r for r, _, _ in deep])
                e_cpu, d_cpu = _median([c for _, c, _ in empty]), _median([c for _, c, _ in deep])
                e_cl, d_cl = _median([c for _, _, c in empty]), _median([c for _, _, c in deep])
                runs = f" (median of {args.repeat})" if args.repeat > 1 else ""
                print(f"throughput  {k:,} msgs of {args.size} B through a side queue, 1 producer + 1 consumer{runs}")
                print(f"  empty broker      {e_rate:>10,.0f} msgs/s   broker {e_cpu / k * 1e6:5.1f} us CPU per msg, "
                      f"clients {e_cl / k * 1e6:5.1f} us")
                print(f"  {n:,} queued  {d_rate:>10,.0f} msgs/s   broker {d_cpu / k * 1e6:5.1f} us CPU per msg, "
                      f"clients {d_cl / k * 1e6:5.1f} us")
                print(f"  deep / empty      {d_rate / e_rate:>10.2f}x wall clock; by the broker's CPU per msg "
                      f"{e_cpu / d_cpu:.2f}x  (load average {os.getloadavg()[0]:.1f})")
                if args.repeat > 1:
                    print("  runs (msgs/s)     empty " + " / ".join(f"{r:,.0f}" for r, _, _ in empty)
                          + ", deep " + " / ".join(f"{r:,.0f}" for r, _, _ in deep))
                print(f"  drain deep queue  {drain:>10,.0f} msgs/s   broker {cpu_m / k * 1e6:5.1f} us CPU per msg "
                      f"(first {k:,} of the deep queue, consumer only)")
            if args.recovery:
                left = queued(broker, DEEP)
                t0 = time.monotonic()
                broker.stop()  # SIGTERM: a clean stop writes a checkpoint (broker/state/replay.py)
                stop_s = time.monotonic() - t0
                broker.start(broker.port, timeout=3600)  # recovery of a deep log takes long
                cpu = broker.cpu_seconds()  # the new process so far: its start-up, replay included
                from_ckpt = any("from the checkpoint" in line for line in broker.log)
                print(f"recovery    {left:,} queued: ready after {broker.started_in:.1f} s, {cpu:.1f} CPU-s "
                      f"(spawn to 'ready', replay included{', from a checkpoint' if from_ckpt else ''}); "
                      f"{queued(broker, DEEP):,} queued after; RSS {broker.rss() / 2**20:.1f} MiB; "
                      f"the clean stop took {stop_s:.1f} s")
                if args.rate:  # after a restart from a checkpoint every queued body is read back from the log
                    back, cpu_b, _ = flow(broker.address, DEEP, args.rate, args.size, produce=False, broker=broker)
                    print(f"  drain after it    {back:>10,.0f} msgs/s   broker {cpu_b / args.rate * 1e6:5.1f} us CPU per msg "
                          f"(first {args.rate:,} after the restart: bodies read back from the log)")
        finally:
            broker.stop()
    cmd = ["python", "bench/memory.py", "-n", str(args.n), "--size", str(args.size)]
    if args.rate:
        cmd += ["--rate", str(args.rate)]
        if args.repeat > 1:
            cmd += ["--repeat", str(args.repeat)]
    if args.recovery:
        cmd += ["--recovery"]
    if broker_args:
        cmd += [f"--broker-args={shlex.join(broker_args)}"]
    print("command:", shlex.join(cmd))


if __name__ == "__main__":
    main()
