"""brokerd's CPU per task for task events: taking them (``emit_events``: ring, history, graphs)
and persisting the history (``broker.runtime.history``).  In-process, no sockets.  A benchmark.

    python bench/task_events.py            # 10,000 tasks x 3 events, best of 7
    python bench/task_events.py -n 50000

Each task is reported as the Python worker reports it: task-received (name, args, kwargs, queue),
task-started, task-succeeded (runtime, result), one event per batch (the worst case: workers
batch up to 50 ms of events).  CPU time (process_time), best of the repeats.  Then the changed
histories are taken and appended to a history file in a temporary directory, as the server's
writer does every 2 s: CPU per task and bytes per task on disk.  To compare with another
checkout, run that checkout's copy of this file (it reports what its tree has).  The last line
printed is the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker.state import BrokerState  # noqa: E402


def batches(n: int) -> list:
    out = []
    for i in range(n):
        tid = f"id{i}"
        out.append([{"type": "task-received", "uuid": tid, "name": f"proj.t{i % 7}", "args": f"({i}, 'a')",
                     "kwargs": "{}", "queue": "celery", "ts": 1.0}])
        out.append([{"type": "task-started", "uuid": tid, "ts": 1.0, "pid": 5}])
        out.append([{"type": "task-succeeded", "uuid": tid, "runtime": 0.01, "result": "3", "ts": 1.0}])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="tasks (default 10000)")
    ap.add_argument("-r", "--repeat", type=int, default=7, help="repeats; the best is shown (default 7)")
    a = ap.parse_args()
    best = None
    st = None
    for _ in range(a.repeat):
        st = BrokerState()
        bs = batches(a.n)
        t = time.process_time()
        for k, b in enumerate(bs):
            st.emit_events(0, "w@h", b, 1.0 + k * 1e-4)
        el = time.process_time() - t
        best = el if best is None else min(best, el)
    print(f"emit_events: {best / a.n * 1e6:.2f} us CPU per task ({best / (3 * a.n) * 1e6:.2f} per event)")
    if hasattr(st, "history_changes"):
        from broker.runtime.history import HistoryFile
        with tempfile.TemporaryDirectory(prefix="brokerd-bench-") as d:
            hf = HistoryFile(d)
            changes = st.history_changes()
            t = time.process_time()
            hf.append(changes)
            el = time.process_time() - t
            print(f"history append: {el / a.n * 1e6:.2f} us CPU per task, {os.path.getsize(hf.path) / a.n:.0f} B per task "
                  f"on disk")
    print(f"reproduce: python bench/task_events.py -n {a.n} -r {a.repeat}")


if __name__ == "__main__":
    main()
