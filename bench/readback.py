"""A deep queue's bodies read back from the log (issue 18, queues deeper than memory): the broker
state's CPU per message popped from Packed blocks kept in memory against the same blocks spilled
(ids and bodies left in the log, read back by lsn when delivery reaches them, as after a restart
from a checkpoint or past --max-memory).  In-process, no sockets: a real WriteAheadLog in a
temporary directory (fsync never), ``-n`` plain publishes of ``--size`` bytes to one queue, then
``pop_ready`` until it is empty.  A benchmark, not a test; prints medians of ``--repeat`` runs.

    python bench/readback.py                 # 200,000 x 100 B, 5 runs of each
    python bench/readback.py -n 100000 --size 1000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cbor2  # noqa: E402

from broker.state import BrokerState  # noqa: E402
from broker.wal import WriteAheadLog  # noqa: E402


def run(n: int, size: int, spill: bool, profile: bool = False) -> float:
    """Microseconds of CPU per message popped."""
    with tempfile.TemporaryDirectory(prefix="brokerd-bench-readback-") as d:
        wal = WriteAheadLog(d, fsync="never")
        list(wal.open())
        s = BrokerState()
        s.enable_log()
        s.set_body_reader(wal.read_payloads)
        s.connect(1)
        s.declare("q", None, 0.0)
        body = b"x" * size

        def write():
            for t, p in s.take_records():
                wal.append(t, cbor2.dumps(p))
            wal.write_batch(wal.take_batch())
            s.take_outbox()

        for i in range(n):
            s.publish(1, "q", body, None, 0, 1000.0)
            if i % 5000 == 4999:
                write()
        write()
        if spill:
            s.spill_all = True
            s.spill(wal.written_lsn, everything=True)
        q = s.queues["q"]
        prof = cProfile.Profile() if profile else None
        popped = 0
        t0 = time.process_time()
        if prof:
            prof.enable()
        while q.pop_ready() is not None:
            popped += 1
        if prof:
            prof.disable()
        t = time.process_time() - t0
        wal.close()
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return t / popped * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=200_000, help="messages (default 200000)")
    ap.add_argument("--size", type=int, default=100, help="body bytes (default 100)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each; medians printed (default 5)")
    ap.add_argument("--profile", action="store_true", help="then one spilled run under cProfile")
    a = ap.parse_args()
    mem, spilled = [], []
    for _ in range(a.repeat):  # interleaved, so both see the same neighbours
        mem.append(run(a.n, a.size, False))
        spilled.append(run(a.n, a.size, True))
    m, s = statistics.median(mem), statistics.median(spilled)
    print(f"{a.n:,} x {a.size} B popped: in memory {m:.2f} us CPU per msg, spilled (read back) {s:.2f} us "
          f"(+{s - m:.2f}); runs {' / '.join(f'{x:.2f}' for x in mem)} and {' / '.join(f'{x:.2f}' for x in spilled)}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if a.profile:
        run(a.n, a.size, True, profile=True)
    print(f"command: python bench/readback.py -n {a.n} --size {a.size} --repeat {a.repeat}")


if __name__ == "__main__":
    main()
