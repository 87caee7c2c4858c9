"""The cost of one task-list request on brokerd's event loop (``BrokerState.tasks_page``).  A benchmark.

    python bench/page_tasks.py            # 10,000 tasks (MAX_TASKS), three events each

Fills a BrokerState with -n tasks as a worker reports them (task-received, -started,
-succeeded), then times the page's requests: newest first, the last page, sorted by runtime,
and a search over args.  Best of five each; the first request after new events also builds the
summaries, shown as "cold".  The last line printed is the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker.state import BrokerState  # noqa: E402

T0 = 1_700_000_000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="tasks in the history (default 10000)")
    a = ap.parse_args()
    st = BrokerState()
    for i in range(a.n):
        t = T0 + i
        st.emit_events(0, "w@h", [
            {"type": "task-received", "uuid": f"id{i}", "name": f"proj.t{i % 7}", "args": f"({i}, 'arg{i}')",
             "kwargs": "{}", "queue": "celery", "ts": t},
            {"type": "task-started", "uuid": f"id{i}", "ts": t + 0.1},
            {"type": "task-succeeded", "uuid": f"id{i}", "runtime": (i % 13) / 10, "result": f"r{i}", "ts": t + 1}], t)
    t = time.perf_counter()
    st.tasks_page(T0)
    print(f"cold (summaries built): {(time.perf_counter() - t) * 1000:.1f} ms")
    for label, kw in (("newest first", {}), ("last page", {"offset": a.n - 50}), ("sorted by runtime", {"sort": "runtime"}),
                      ("search in args", {"search": f"arg{a.n - 1}"})):
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            st.tasks_page(T0, **kw)
            ts.append(time.perf_counter() - t)
        print(f"{label}: {min(ts) * 1000:.1f} ms")
    print(f"reproduce: python bench/page_tasks.py -n {a.n}")


if __name__ == "__main__":
    main()
