"""What an EMIT costs in the broker state, against a plain PUBLISH.  A benchmark, not a test.

    python bench/exchanges.py            # 20,000 emits per case
    python bench/exchanges.py -n 100000

The pure state (broker/state), log on, no sockets: the routing and copying
cost that EMIT adds, per message.  Cases: PUBLISH to one queue; EMIT to a
fanout exchange of 3 queues; EMIT to a direct exchange holding 10,000
bindings (one matches); EMIT to a topic exchange of 1,000 distinct patterns
(one ``#``) with a repeated key (cached) and with a new key every time (every
pattern matched).  Messages are drained between rounds so queues stay small.
The last line printed is the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.state import BrokerState  # noqa: E402


def fresh() -> BrokerState:
    s = BrokerState()
    s.enable_log()
    s.connect(1)
    return s


def run(label: str, s: BrokerState, n: int, op) -> None:
    t0 = time.perf_counter()
    for i in range(n):
        op(i)
        if i % 1000 == 999:  # keep the queues and the record list small
            s.take_records()
            for q in s.queues.values():
                q.take_all_ready()
    dt = time.perf_counter() - t0
    print(f"{label:58s} {dt / n * 1e6:8.2f} us/op")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20_000)
    n = ap.parse_args(argv).n

    s = fresh()
    run("PUBLISH to one queue", s, n, lambda i: s.publish(1, "q", b"x" * 100, None, 0, 0.0))

    s = fresh()
    for q in ("a", "b", "c"):
        s.bind(1, "fan", q, "", "fanout")
    run("EMIT fanout, 3 queues (3 copies)", s, n, lambda i: s.emit(1, "fan", "", b"x" * 100, None, 0, 0.0))

    s = fresh()
    for k in range(10_000):
        s.bind(1, "direct", "q", f"k{k}", "direct")
    run("EMIT direct, 10,000 bindings, 1 match", s, n, lambda i: s.emit(1, "direct", "k5", b"x" * 100, None, 0, 0.0))

    s = fresh()
    for k in range(999):
        s.bind(1, "topic", f"q{k % 10}", f"app.{k}.*.done", "topic")
    s.bind(1, "topic", "all", "#", "topic")
    run("EMIT topic, 1,000 patterns, repeated key (cached)", s, n,
        lambda i: s.emit(1, "topic", "task.succeeded", b"x" * 100, None, 0, 0.0))
    m = max(1, n // 20)
    run(f"EMIT topic, 1,000 patterns, a new key each time (n={m})", s, m,
        lambda i: s.emit(1, "topic", f"task.k{i}", b"x" * 100, None, 0, 0.0))
    print(f"reproduce: python bench/exchanges.py -n {n}")


if __name__ == "__main__":
    main()
