"""Write-ahead-log figures for brokerd.  A benchmark, not a test.

    python bench/wal.py                          # all figures, defaults below
    python bench/wal.py --queued 1000000 --cycles 10000000

Prints:

1. **fsync behaviour under ``--fsync always``** while one producer pipelines
   publishes and one consumer acks (prefetch 100): fsyncs per second and log
   records per fsync, from brokerd's own STATS counters.
2. **Recovery**: brokerd with ``--queued`` 100-byte messages waiting is
   stopped (SIGTERM) and started again; start-up time is measured from spawn
   to "ready", and brokerd's own "recovered N log records ... in S s" line is
   quoted.  Disk bytes per queued message = the data directory's size / N.
3. **Compaction**: ``--cycles`` publish+ack cycles with nothing left queued;
   the data directory's size at the end (and its peak, sampled).

Every brokerd it starts listens on 127.0.0.1 and is stopped by its pid.  The
last line printed is the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import Client  # noqa: E402
from tests.support.broker import BrokerProcess  # noqa: E402

RECOVERED = re.compile(r"recovered (\d+) log records from (\d+) segments in ([\d.]+)s")


class Broker(BrokerProcess):
    """The shared launcher (tests/support/broker.py) with recovery-sized bounds."""

    def __init__(self, data_dir: str, *args: str):
        super().__init__(data_dir, "--log-level", "info", *args)

    def start(self) -> float:
        """Seconds from spawn to "ready": a recovery of a large log takes a while."""
        super().start(timeout=600)
        return self.started_in

    def stop(self):
        self.terminate(120)

    @property
    def lines(self) -> list[str]:
        return self.log


def dir_bytes(path: str) -> int:
    total = 0
    for p in Path(path).glob("*.wal"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # deleted by compaction while we looked
            pass
    return total


def stats(address: str) -> dict:
    with Client(address) as c:
        text = c.admin("STATS")
    out = {}
    for line in text.splitlines()[1:-1]:
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[0]] = parts[1].strip()
    return out


def produce(address, n, body, queue="bench"):
    with Client(address) as c:
        for i in range(n):
            c.publish(queue, body, confirm=False)
            if i % 20000 == 19999:
                c.wait_for_confirms()
        c.wait_for_confirms()


def consume(address, n, queue="bench", prefetch=100):
    with Client(address) as c:
        got = 0
        for d in c.consume([queue], prefetch=prefetch):
            d.ack()
            got += 1
            if got >= n:
                break


def fsync_figures(tmp, n, size):
    b = Broker(os.path.join(tmp, "fsync"), "--fsync", "always")
    b.start()
    try:
        before = stats(b.address)
        t0 = time.monotonic()
        cons = threading.Thread(target=consume, args=(b.address, n))
        cons.start()
        produce(b.address, n, b"x" * size)
        cons.join()
        dt = time.monotonic() - t0
        after = stats(b.address)
    finally:
        b.stop()
    fsyncs = int(after["wal_fsyncs"]) - int(before["wal_fsyncs"])
    records = int(after["wal_records_written"]) - int(before["wal_records_written"])
    print(f"fsync=always, {n:,} msgs of {size} B published (pipelined) and acked (prefetch 100), in-process threads:")
    print(f"  {n / dt:,.0f} msgs/s end to end, {fsyncs / dt:,.0f} fsyncs/s, {records / max(fsyncs, 1):.1f} records per fsync"
          f" ({records:,} records, {fsyncs:,} fsyncs in {dt:.2f} s)")


def recovery_figures(tmp, queued, size):
    d = os.path.join(tmp, "recovery")
    b = Broker(d, "--fsync", "never")
    b.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=produce, args=(b.address, queued // 4, b"y" * size)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fill = time.monotonic() - t0
    b.stop()
    disk = dir_bytes(d)
    b2 = Broker(d, "--fsync", "never")
    startup = b2.start()
    try:
        line = next((ln for ln in b2.lines if RECOVERED.search(ln)), "")
        st = stats(b2.address)
    finally:
        b2.stop()
    m = RECOVERED.search(line)
    print(f"recovery with {int(st['ready']):,} queued messages of {size} B (filled in {fill:.1f} s):")
    print(f"  start-up {startup:.2f} s from spawn to ready; brokerd: replayed {int(m.group(1)):,} records from "
          f"{m.group(2)} segments in {m.group(3)} s")
    print(f"  disk {disk / 1e6:,.1f} MB = {disk / queued:,.0f} bytes per queued message ({size} B body)")


def compaction_figures(tmp, cycles, size):
    d = os.path.join(tmp, "compaction")
    b = Broker(d, "--fsync", "never", "--segment-bytes", str(16 * 1024 * 1024))
    b.start()
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.wait(0.5):
            peak = max(peak, dir_bytes(d))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        chunk = 100_000
        done = 0
        while done < cycles:
            k = min(chunk, cycles - done)
            cons = threading.Thread(target=consume, args=(b.address, k, "cycle", 500))
            cons.start()
            produce(b.address, k, b"z" * size, "cycle")
            cons.join()
            done += k
        dt = time.monotonic() - t0
        st = stats(b.address)
    finally:
        stop.set()
        b.stop()
    end = dir_bytes(d)
    history = cycles * (size + 60)
    print(f"compaction: {cycles:,} publish+ack cycles of {size} B in {dt:.0f} s ({cycles / dt:,.0f}/s), nothing left queued:")
    print(f"  log on disk at the end {end / 1e6:,.1f} MB, peak {max(peak, end) / 1e6:,.1f} MB "
          f"(history written ~{history / 1e9:,.2f} GB; {st.get('wal_compactions')} compactions, "
          f"{st.get('wal_segments_deleted')} segments deleted)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="messages for the fsync figures")
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--queued", type=int, default=1_000_000, help="messages queued for the recovery figure (0: skip)")
    ap.add_argument("--cycles", type=int, default=10_000_000, help="publish+ack cycles for compaction (0: skip)")
    args = ap.parse_args(argv)
    print(f"brokerd bench/wal.py: python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    tmp = tempfile.mkdtemp(prefix="brokerd-wal-bench-", dir=os.environ.get("TMPDIR"))
    try:
        if args.n:
            fsync_figures(tmp, args.n, args.size)
        if args.queued:
            recovery_figures(tmp, args.queued, args.size)
        if args.cycles:
            compaction_figures(tmp, args.cycles, args.size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("reproduce: ", shlex.join(["python", "bench/wal.py", "-n", str(args.n), "--size", str(args.size),
                                     "--queued", str(args.queued), "--cycles", str(args.cycles)]))


if __name__ == "__main__":
    main()
