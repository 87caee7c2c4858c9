"""The web page's load time with 10,000 recent tasks.  A benchmark, not a test.

    python bench/web.py                      # 10,000 tasks, 20 page loads
    python bench/web.py --tasks 10000 --loads 20 --broker-args="--fsync never"

It starts its own brokerd (``python -m broker --host 127.0.0.1 --port 0
--http-port 0 --data-dir <tmp>``, as bench/http.py does), sends it the events
a worker would for ``--tasks`` tasks (task-received, task-started,
task-succeeded, or task-failed with a traceback for one in ten) over the real
protocol (EMIT_EVENTS, in batches of 300 events), plus a worker-online and
messages in a few queues, some dead-lettered.  Then it times ``--loads``
page loads, each as a browser does it: ``GET /`` (server-rendered, with the
50 newest tasks), then the page's first poll, ``GET /api/overview?html=1``
and ``GET /api/tasks?html=1&limit=50`` (what app.js fetches every second).
Reported: p50 and p99 of the whole load and of each request, and the worst
filter (a task name that matches nothing, so every task is scanned).  The last
line printed is the command.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("bench_http", HERE / "http.py")  # its Broker and timed_get
bench_http = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_http)

from client import wire  # noqa: E402
from tests.support.wireclient import Raw  # noqa: E402

TRACEBACK = ('Traceback (most recent call last):\n  File "tasks.py", line 12, in charge\n'
             '    raise ValueError("card declined")\nValueError: card declined\n')


def fill(c: Raw, tasks: int) -> None:
    host = "bench@host"
    c.ok(wire.OP_EMIT_EVENTS, host, [{"type": "worker-online", "freq": 3600.0, "pool": 8, "active": 0,
                                      "processed": 0, "loadavg": [0.5, 0.4, 0.3]}])
    batch, rids = [], []
    t0 = time.time() - tasks * 0.01
    for i in range(tasks):
        ts = t0 + i * 0.01
        tid = f"bench-{i:06d}"
        name = f"shop.tasks.{('charge', 'email', 'resize', 'report')[i % 4]}"
        batch.append({"type": "task-received", "uuid": tid, "ts": ts, "name": name,
                      "args": f"({i}, 'customer-{i % 97}')", "kwargs": "{}", "queue": "default", "retries": 0})
        batch.append({"type": "task-started", "uuid": tid, "ts": ts + 0.001})
        if i % 10 == 9:
            batch.append({"type": "task-failed", "uuid": tid, "ts": ts + 0.004, "runtime": 0.003,
                          "exception": "ValueError('card declined')", "traceback": TRACEBACK})
        else:
            batch.append({"type": "task-succeeded", "uuid": tid, "ts": ts + 0.004, "runtime": 0.003,
                          "result": repr(i * 2)})
        if len(batch) >= 300:
            rids.append(c.request(wire.OP_EMIT_EVENTS, host, batch))
            batch = []
    if batch:
        rids.append(c.request(wire.OP_EMIT_EVENTS, host, batch))
    for r in rids:
        assert c.reply(r)[0] == wire.OP_OK
    for q in ("default", "emails", "reports", "images"):
        for i in range(20):
            c.ok(wire.OP_PUBLISH, q, f"{q}-{i}".encode(), f"{q}-{i}", 0, None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--broker-args", default="")
    args = ap.parse_args(argv)
    get = bench_http.timed_get
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        b = bench_http.Broker(shlex.split(args.broker_args), tmp)
        try:
            c = Raw(b.port)
            t0 = time.perf_counter()
            fill(c, args.tasks)
            setup = time.perf_counter() - t0
            get(b.http_port, "/api/tasks?limit=1000")  # warm up
            paths = ("/", "/api/overview?html=1", "/api/tasks?html=1&limit=50")
            per = {p: [] for p in paths}
            sizes = {}
            loads = []
            for _ in range(args.loads):
                total = 0.0
                for p in paths:
                    dt, sizes[p] = get(b.http_port, p)
                    per[p].append(dt)
                    total += dt
                loads.append(total)
            worst = [get(b.http_port, "/api/tasks?html=1&name=no.such.task")[0] for _ in range(args.loads)]
            task = [get(b.http_port, f"/task/bench-{args.tasks - 1:06d}")[0] for _ in range(args.loads)]
            c.close()
        finally:
            b.stop()
    ms = lambda xs, p: bench_http.pct(xs, p) * 1000  # noqa: E731
    print(f"{args.tasks} recent tasks ({3 * args.tasks} events, sent in {setup:.2f}s); {args.loads} sequential page loads")
    print(f"  page load (GET / + first poll)   p50 {ms(loads, 50):7.1f} ms   p99 {ms(loads, 99):7.1f} ms")
    for p in paths:
        print(f"    GET {p:<28} p50 {ms(per[p], 50):7.1f} ms   p99 {ms(per[p], 99):7.1f} ms   {sizes[p] / 1024:6.1f} KiB")
    print(f"  GET /api/tasks?name=<no match>   p50 {ms(worst, 50):7.1f} ms   p99 {ms(worst, 99):7.1f} ms   (scans every task)")
    print(f"  GET /task/<id>                   p50 {ms(task, 50):7.1f} ms   p99 {ms(task, 99):7.1f} ms   (children: scans every task)")
    cmd = ["python", "bench/web.py", "--tasks", str(args.tasks), "--loads", str(args.loads)]
    if args.broker_args:
        cmd.append(f"--broker-args={args.broker_args}")
    print("command:", shlex.join(cmd))


if __name__ == "__main__":
    main()
