#!/usr/bin/env python3
"""W2 and W3 with Celery itself: on brokerd vs on Redis, and our own SDK for reference (issue 13 figures).

W2: ``-n`` (10,000) no-op tasks, enqueued with ``task.delay(i)`` by this process while one worker
    runs them.  Figures: *enqueue* = n / (first delay -> last delay returned); *end to end* =
    n / (first delay -> the worker finished the n-th task), the worker stamping
    ``time.monotonic()`` into a file when its in-process counter reaches n (same machine, same
    clock).  Every result is stored (a result backend is configured in every setup).
W3: ``--calls`` (1,000) sequential ``noop.delay(i).get()`` after 20 warm-up calls; p50/p99/mean ms.

Setups, run adjacent (one after another, same machine), each with its own fresh servers:
  celery-redis    Celery 5, broker_url = result_backend = redis://   (``celery worker --pool solo -c 1``)
  celery-brokerd  Celery 5, broker_url = result_backend = brokerd:// (same worker command)
  sdk-brokerd     our SDK (client.app.App) and ``brokerd-worker -P threads -c 1`` (one task at a
                  time, as solo; the SDK worker has no solo pool)

This module is also the app both workers import (``celery -A bench.celery_w2w3`` /
``brokerd-worker bench.celery_w2w3:sdk_app``), configured from W2W3_* variables.
Not a test: it prints figures and the command that reproduces them.

    python bench/celery_w2w3.py                       # all three setups, W2 and W3
    python bench/celery_w2w3.py --setups celery-brokerd celery-redis -n 2000 --calls 300
"""

from __future__ import annotations

import os
import threading
import time

SETUP = os.environ.get("W2W3_SETUP", "")
URL = os.environ.get("W2W3_URL", "")
N = int(os.environ.get("W2W3_N", "0"))
DONE = os.environ.get("W2W3_DONE", "")
QUEUE = "w2w3"

_lock = threading.Lock()
_count = 0


def _tick(i):
    """The no-op body: count timed tasks; stamp the clock when the n-th is done."""
    global _count
    if i < 0:
        return i  # warm-up
    with _lock:
        _count += 1
        c = _count
    if c == N and DONE:
        with open(DONE + ".tmp", "w") as fh:
            fh.write(repr(time.monotonic()))
        os.replace(DONE + ".tmp", DONE)  # whole or absent, never half-written to the reader
    return i


if SETUP.startswith("celery"):
    from celery import Celery

    try:  # where kombu cannot find a transport by URL scheme, importing the package registers it
        import client.celery  # noqa: F401
    except ImportError:
        pass
    app = Celery("w2w3", broker=URL, backend=URL)
    app.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)

    @app.task(name="w2w3.noop")
    def noop(i):
        return _tick(i)

elif SETUP == "sdk-brokerd":
    from client.app import App

    sdk_app = App("w2w3", broker=URL, task_default_queue=QUEUE)

    @sdk_app.task(name="w2w3.noop")
    def noop(i):
        return _tick(i)


# ------------------------------------------------------------------------------ the driver

def _driver():
    import argparse
    import shlex
    import shutil
    import signal
    import socket
    import statistics
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.support.broker import BrokerProcess

    # seconds: a worker that is not up by then is broken (a cold import on a busy 2-core box takes ~5 s)
    worker_ready_timeout = 60.0
    # seconds a single W3 call may take before the run is called broken, not slow
    call_timeout = 30.0
    setups_all = ["celery-redis", "celery-brokerd", "sdk-brokerd"]

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", nargs="+", default=setups_all, choices=setups_all)
    ap.add_argument("-n", type=int, default=10000, help="W2 tasks")
    ap.add_argument("--calls", type=int, default=1000, help="W3 calls")
    ap.add_argument("--broker-args", default="", help="extra brokerd flags, e.g. '--fsync never'")
    args = ap.parse_args()

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    class Redis:
        def __init__(self, d):
            self.port = free_port()
            exe = shutil.which("redis-server")
            if exe is None:
                sys.exit("redis-server is not installed (apt-get install -y redis-server)")
            self.proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", d,
                                          "--save", "", "--appendonly", "no"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            return
                except OSError:
                    time.sleep(0.05)
            self.stop()
            sys.exit("redis-server did not start")

        def stop(self):
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(10)

    def run_setup(setup: str, workload: str, tmp: str) -> dict:
        """Fresh servers and one worker for one workload of one setup; returns its figures."""
        servers = []
        if setup == "celery-redis":
            r = Redis(tmp)
            servers.append(r.stop)
            url = f"redis://127.0.0.1:{r.port}/0"
        else:
            b = BrokerProcess(Path(tmp) / "brokerd", *shlex.split(args.broker_args)).start()
            servers.append(b.terminate)
            url = f"brokerd://{b.address}" if setup.startswith("celery") else b.address
        done = os.path.join(tmp, "done")
        n = args.n if workload == "W2" else 10**9
        env = dict(os.environ, W2W3_SETUP=setup, W2W3_URL=url, W2W3_N=str(n), W2W3_DONE=done,
                   PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        os.environ.update(W2W3_SETUP=setup, W2W3_URL=url, W2W3_N=str(n), W2W3_DONE=done)
        if setup.startswith("celery"):
            cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_w2w3", "worker", "--pool=solo",
                   "--concurrency=1", "--loglevel=WARNING", "--without-mingle", "--without-gossip",
                   "-Q", QUEUE]
        else:
            cmd = [sys.executable, "-m", "client.worker_cli", "bench.celery_w2w3:sdk_app", "-b", url,
                   "-Q", QUEUE, "-P", "threads", "-c", "1", "-l", "warning"]
        # a fresh module per setup: this driver imports the app module as the producer
        import importlib
        sys.modules.pop("bench.celery_w2w3", None)
        mod = importlib.import_module("bench.celery_w2w3")
        logpath = os.path.join(tmp, "worker.log")
        w = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=open(logpath, "w"),
                             stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            try:
                mod.noop.delay(-1).get(timeout=worker_ready_timeout)
            except Exception as e:
                raise SystemExit(f"{setup}: worker not ready ({type(e).__name__}: {e}); see {logpath}:\n"
                                 + open(logpath).read()[-2000:])
            if workload == "W2":
                t0 = time.monotonic()
                for i in range(args.n):
                    mod.noop.delay(i)
                t_enq = time.monotonic()
                deadline = t_enq + max(120.0, args.n / 50)  # a floor of 50 tasks/s, else broken
                while not os.path.exists(done):
                    if time.monotonic() > deadline or w.poll() is not None:
                        raise SystemExit(f"{setup}: the {args.n}th task never finished; see {logpath}")
                    time.sleep(0.02)
                t_end = float(open(done).read())
                return {"enqueue/s": args.n / (t_enq - t0), "e2e/s": args.n / (t_end - t0),
                        "seconds": t_end - t0}
            for i in range(20):
                mod.noop.delay(i).get(timeout=call_timeout)
            lat = []
            for i in range(args.calls):
                t = time.perf_counter()
                r = mod.noop.delay(i).get(timeout=call_timeout)
                lat.append((time.perf_counter() - t) * 1000)
                assert r == i, (r, i)
            q = statistics.quantiles(lat, n=100)
            return {"p50 ms": q[49], "p99 ms": q[98], "mean ms": statistics.mean(lat)}
        finally:
            os.killpg(w.pid, signal.SIGTERM)
            try:
                w.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait(5)
            close = getattr(getattr(mod, "app", None), "close", None) or getattr(
                getattr(mod, "sdk_app", None), "close", None)
            if close:
                close()
            for stop in servers:
                stop()

    def problem(setup):
        if setup == "celery-brokerd":
            probe = ("try:\n import client.celery\nexcept ImportError: pass\n"
                     "from kombu.transport import resolve_transport; resolve_transport('brokerd')")
            if subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True).returncode:
                return "Celery has no brokerd:// transport here (client/celery/ not on this branch?)"
        return None

    results = {}
    for setup in args.setups:
        if why := problem(setup):
            print(f"{setup}: not run: {why}", flush=True)
            continue
        for workload in ("W2", "W3"):
            with tempfile.TemporaryDirectory(prefix="w2w3-") as tmp:
                results[(setup, workload)] = fig = run_setup(setup, workload, tmp)
            print(f"{setup:<16}{workload}  " + "  ".join(f"{k} {v:,.2f}" for k, v in fig.items()), flush=True)

    print(f"\nW2: {args.n:,} no-op tasks through one worker, one at a time; W3: delay().get() x {args.calls:,}")
    print(f"{'setup':<16}{'enqueue/s':>11}{'e2e/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for setup in args.setups:
        w2, w3 = results.get((setup, "W2"), {}), results.get((setup, "W3"), {})
        cell = lambda d, k: f"{d[k]:,.0f}" if k in d and k.endswith("/s") else (f"{d[k]:.2f}" if k in d else "-")
        print(f"{setup:<16}{cell(w2, 'enqueue/s'):>11}{cell(w2, 'e2e/s'):>9}"
              f"{cell(w3, 'p50 ms'):>9}{cell(w3, 'p99 ms'):>9}")
    print("\nreproduce: " + shlex.join(["python", "bench/celery_w2w3.py", *sys.argv[1:]]))


if __name__ == "__main__":
    _driver()
