"""The log writer's hand-off to its thread (issue 18): ``IoThread.run`` against
``trio.to_thread.run_sync``, CPU and wall time per call of a function that does nothing.  Under
``--fsync always`` every group commit pays one hand-off (W1: ~500 per 50,000 messages).  A
benchmark, not a test.

    python bench/iothread.py              # 5,000 calls each, alternated 3 times
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from broker.runtime.iothread import IoThread  # noqa: E402


def noop() -> None:
    pass


async def measure(n: int, rounds: int) -> None:
    io = IoThread()
    for _ in range(rounds):
        for name, call in (("trio.to_thread.run_sync", trio.to_thread.run_sync), ("IoThread.run", io.run)):
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await call(noop)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            print(f"  {name:<24} {cpu / n * 1e6:6.1f} us CPU  {wall / n * 1e6:6.1f} us wall per call")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="calls per measure (default 5000)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations (default 3)")
    a = ap.parse_args()
    print(f"hand-off of a no-op call to a thread, {a.n:,} calls, both threads' CPU:")
    trio.run(measure, a.n, a.rounds)
    print(f"command: python bench/iothread.py -n {a.n} --rounds {a.rounds}")


if __name__ == "__main__":
    main()
