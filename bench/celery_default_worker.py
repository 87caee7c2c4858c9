#!/usr/bin/env python3
"""W2's comparison (issue 18): Celery's *default* worker on Redis against brokerd's default worker,
in one run.  A benchmark, not a test.

    python bench/celery_default_worker.py              # 10,000 no-op tasks each
    python bench/celery_default_worker.py -n 5000

Celery: ``celery worker`` with every default (the prefork pool, concurrency = the CPU count,
prefetch multiplier 4), broker and result backend on a private ``redis-server`` (127.0.0.1, a free
port, its own directory; stopped by pid).  Its producer, ``delay()``, waits for Redis on every
call (~1,100 a second here), which would bound an end-to-end figure; so the ``-n`` tasks are
enqueued first, then the worker starts, and its rate is the time from the first result stored to
the n-th (this process counts the result keys every 2 ms): the worker's own speed, a figure that
favours Celery.  brokerd: ``bench/tasks.py`` with every default (its producer is fast enough that
the end-to-end figure is the worker's), run right after, so the ratio is from one run.

Needs ``celery`` and ``redis`` (``pip install celery redis``) and ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

READY_TIMEOUT = 60.0  # seconds for the Celery worker's first result
RUN_TIMEOUT = 600.0  # seconds for all results, else the run is broken

# -- the Celery app both this process and the worker import (configured from the environment) ----
_port = os.environ.get("CDW_REDIS_PORT")
if _port:
    from celery import Celery

    app = Celery("cdw", broker=f"redis://127.0.0.1:{_port}/0", backend=f"redis://127.0.0.1:{_port}/1")
    app.conf.worker_hijack_root_logger = False

    @app.task(name="cdw.noop")
    def noop(i):
        return None


def run_celery(n: int) -> dict:
    from bench.w1_vs_redis import RedisServer

    server = RedisServer()
    env = dict(os.environ, CDW_REDIS_PORT=str(server.port), PYTHONPATH=str(ROOT))
    os.environ["CDW_REDIS_PORT"] = str(server.port)
    worker = None
    try:
        import importlib

        import bench.celery_default_worker as me

        me = importlib.reload(me)  # now configured with the port
        import redis

        results = redis.Redis("127.0.0.1", server.port, db=1)
        t0 = time.monotonic()
        for i in range(n):
            me.noop.delay(i)
        enqueue = n / (time.monotonic() - t0)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.celery_default_worker", "worker", "--loglevel", "warning"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        started = time.monotonic()
        first = last = None
        while True:
            now = time.monotonic()
            count = results.dbsize()
            if first is None and count > 0:
                first = now
            if count >= n:
                last = now
                break
            if worker.poll() is not None:
                raise SystemExit(f"the Celery worker exited ({worker.returncode}): {worker.stderr.read()[-2000:]}")
            if (first is None and now - started > READY_TIMEOUT) or now - started > RUN_TIMEOUT:
                raise SystemExit(f"the Celery worker stored {count} of {n} results in {now - started:.0f} s")
            time.sleep(0.002)
        return {"enqueue": enqueue, "rate": (n - 1) / (last - first), "from_start": n / (last - started)}
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        server.stop()


def run_brokerd(n: int) -> float:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tasks.py"), "-n", str(n), "--pools", "processes", "-c",
         str(os.cpu_count() or 2), "--prefetch-multiplier", "0", "--confirmed", "10", "--latency", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    ).stdout
    m = re.search(r"^  tasks/s\s+([\d,]+)", out, re.M)
    if m is None:
        raise SystemExit(f"bench/tasks.py printed no end-to-end figure:\n{out[-2000:]}")
    return float(m.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="no-op tasks per setup (default 10000)")
    a = ap.parse_args()
    c = run_celery(a.n)
    b = run_brokerd(a.n)
    print(f"W2, {a.n:,} no-op tasks, every default, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"  Celery {__import__('celery').__version__} on Redis, prefork worker  {c['rate']:>9,.0f} tasks/s  "
          f"(first result -> n-th; {c['from_start']:,.0f}/s from the worker's start; enqueued first at {c['enqueue']:,.0f}/s)")
    print(f"  brokerd, its default worker            {b:>9,.0f} tasks/s  (bench/tasks.py end to end)")
    print(f"  ratio                                  {b / c['rate']:>9.1f}x   (target >= 10x)")
    print(f"command: python bench/celery_default_worker.py -n {a.n}")


if __name__ == "__main__":
    main()
