"""/metrics scrape time with many queues.  A benchmark, not a test.

    python bench/http.py                     # 1,000 queues, a message each, 50 scrapes
    python bench/http.py --queues 10000 --scrapes 20
    python bench/http.py --broker-args="--fsync never"

It starts its own brokerd (``python -m broker --host 127.0.0.1 --port 0
--http-port 0 --data-dir <tmp>``; ports read from its log), publishes one
confirmed message to each of ``--queues`` queues, then times ``--scrapes``
sequential ``GET /metrics`` (a new connection each, as Prometheus does after
an idle keep-alive) and as many ``GET /api/queues``.  Reported: p50, p99 and
max wall time per request as the client sees it, and the response size.  The
broker is stopped by its pid at the end.  The last line printed is the
command that reproduces the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and this
# file would shadow the standard library's ``http``: drop it before importing.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import http.client  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from client import wire  # noqa: E402
from tests.support.broker import BrokerProcess  # noqa: E402
from tests.support.wireclient import Raw  # noqa: E402



def Broker(extra: list[str], data_dir: str) -> BrokerProcess:
    try:
        return BrokerProcess(data_dir, *extra).start(timeout=30)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def timed_get(port: int, path: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    dt = time.perf_counter() - t0
    conn.close()
    assert r.status == 200, (path, r.status)
    return dt, len(body)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queues", type=int, default=1000)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--broker-args", default="")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        b = Broker(shlex.split(args.broker_args), tmp)
        try:
            c = Raw(b.port)
            t0 = time.perf_counter()
            rid = 0
            for i in range(args.queues):  # pipelined: send all, then read the confirms
                rid += 1
                c.send([wire.OP_PUBLISH, rid, f"bench.q{i:05d}", b"x", None, 0, None])
            for r in range(1, rid + 1):
                assert c.reply(r)[0] == wire.OP_OK
            setup = time.perf_counter() - t0
            timed_get(b.http_port, "/metrics")  # warm up (first-request imports)
            results = {}
            for path in ("/metrics", "/api/queues"):
                times, size = [], 0
                for _ in range(args.scrapes):
                    dt, size = timed_get(b.http_port, path)
                    times.append(dt)
                results[path] = (times, size)
            c.close()
        finally:
            b.stop()
    print(f"{args.queues} queues with a message each (set up in {setup:.2f}s); {args.scrapes} sequential requests each")
    for path, (times, size) in results.items():
        print(
            f"  GET {path:<12} p50 {statistics.median(times) * 1000:7.1f} ms   p99 {pct(times, 99) * 1000:7.1f} ms"
            f"   max {max(times) * 1000:7.1f} ms   {size / 1024:7.1f} KiB"
        )
    cmd = ["python", "bench/http.py", "--queues", str(args.queues), "--scrapes", str(args.scrapes)]
    if args.broker_args:
        cmd.append(f"--broker-args={args.broker_args}")
    print("command:", shlex.join(cmd))


if __name__ == "__main__":
    main()
