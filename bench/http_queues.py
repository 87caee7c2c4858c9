"""How long the HTTP endpoints stall brokerd's event loop with many queues.  A benchmark, not a test.

    python bench/http_queues.py                      # 50,000 queues, 5 fetches per endpoint
    python bench/http_queues.py --queues 20000 --fetches 10 --broker-args="--fsync never"

It starts its own brokerd (as bench/http.py does), publishes one 1-byte
message to each of ``--queues`` queues over the real protocol (pipelined,
then every confirm collected), and then, for each endpoint, fetches it
``--fetches`` times while a second connection sends binary PINGs back to back.
HTTP runs inside brokerd's event loop, so a PING's round trip is at least as
long as whatever the loop was busy with: the worst PING during an endpoint's
fetches is that endpoint's stall.  Reported per endpoint: the worst and p50
PING, the fetch time and the response size.  The last line printed is the
command.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import tempfile
import threading
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

ENDPOINTS = ("/", "/api/overview?html=1", "/api/overview", "/metrics", "/api/queues")


def fill(port: int, queues: int) -> None:
    """One 1-byte message in each of ``queues`` queues, pipelined in windows of 1,000."""
    c = Raw(port)
    try:
        for start in range(0, queues, 1000):
            rids = [c.request(wire.OP_PUBLISH, f"q{i:06d}", b"x", None, 0, None)
                    for i in range(start, min(queues, start + 1000))]
            for r in rids:
                assert c.reply(r)[0] == wire.OP_OK
    finally:
        c.close()


class Pinger:
    """PINGs back to back on their own connection; ``during(a, b)``: the round trips overlapping [a, b]."""

    def __init__(self, port: int):
        self.c = Raw(port)
        self.times: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()  # (start, end) of each PING
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        c = self.c
        while not self.stop.is_set():
            t0 = time.perf_counter()
            rid = c.request(wire.OP_PING)
            while not any(f[1] == rid for f in c.pending if f[0] == wire.OP_OK):
                c._read(120.0)  # a stalled loop answers late, never not at all
            c.pending.clear()
            with self.lock:
                self.times.append((t0, time.perf_counter()))
            time.sleep(0.001)  # leave the loop (and the 2 cores) mostly to the fetches

    def during(self, a: float, b: float) -> list[float]:
        """Round trips of the PINGs that overlapped [a, b]; waits for one that ended after b."""
        deadline = time.perf_counter() + 120.0
        while time.perf_counter() < deadline:
            with self.lock:
                if self.times and self.times[-1][1] > b:
                    return [e - s for s, e in self.times if e >= a and s <= b]
            time.sleep(0.01)
        raise TimeoutError("no PING answered within 120 s")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.c.close()


def measure(http_port: int, pinger: Pinger, path: str, fetches: int) -> dict:
    fetch_times, size = [], 0
    a = time.perf_counter()
    for _ in range(fetches):
        dt, size = bench_http.timed_get(http_port, path)
        fetch_times.append(dt)
    pings = pinger.during(a, time.perf_counter())
    return {"worst_ping": max(pings), "p50_ping": bench_http.pct(pings, 50), "pings": len(pings),
            "fetch_p50": bench_http.pct(fetch_times, 50), "fetch_max": max(fetch_times), "size": size}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queues", type=int, default=50_000)
    ap.add_argument("--fetches", type=int, default=5)
    ap.add_argument("--broker-args", default="--fsync never")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-http-queues-") as tmp:
        b = bench_http.Broker(shlex.split(args.broker_args), tmp)
        try:
            t0 = time.perf_counter()
            fill(b.port, args.queues)
            setup = time.perf_counter() - t0
            pinger = Pinger(b.port)
            try:
                idle = measure(b.http_port, pinger, "/healthz", args.fetches)
                results = {p: measure(b.http_port, pinger, p, args.fetches) for p in ENDPOINTS}
            finally:
                pinger.close()
        finally:
            b.stop()
    print(f"{args.queues} queues of one message each (published in {setup:.1f}s); "
          f"{args.fetches} fetches per endpoint while PINGs run back to back")
    print(f"  {'endpoint':<24} {'worst PING':>11} {'p50 PING':>9} {'fetch p50':>10} {'fetch max':>10} {'size':>10}")
    for p, r in [("/healthz (baseline)", idle), *results.items()]:
        print(f"  {p:<24} {r['worst_ping'] * 1000:8.1f} ms {r['p50_ping'] * 1000:6.1f} ms "
              f"{r['fetch_p50'] * 1000:7.1f} ms {r['fetch_max'] * 1000:7.1f} ms {r['size'] / 1024:7.1f} KiB")
    cmd = ["python", "bench/http_queues.py", "--queues", str(args.queues), "--fetches", str(args.fetches),
           f"--broker-args={args.broker_args}"]
    print("command:", shlex.join(cmd))


if __name__ == "__main__":
    main()
