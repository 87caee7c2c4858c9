"""Where the broker's time goes in W1 (issue 18): bench/core.py's producer and consumer roles
(50,000 x 100 B, prefetch 100, confirms waited for) against one brokerd run under cProfile
(``python -m cProfile -o PROF -m broker --fsync always``, a temporary data dir, stopped by pid
with SIGTERM so the profile is written), then the top 25 by cumulative and by own time.
A benchmark, not a test.

    python bench/w1_profile.py                       # --fsync always, profile in /tmp/w1-broker.prof
    python bench/w1_profile.py --fsync never -n 20000
"""

from __future__ import annotations

import argparse
import json
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0  # seconds for brokerd to print "ready" on a loaded 2-core machine
RUN_TIMEOUT = 900.0  # seconds for one producer/consumer run under the profiler, else broken


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=50_000, help="messages (default 50000)")
    ap.add_argument("--fsync", default="always", help="brokerd --fsync (default always)")
    ap.add_argument("--out", default="/tmp/w1-broker.prof", help="the profile file (default /tmp/w1-broker.prof)")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="w1-profile-")
    b = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", a.out, "-m", "broker", "--host", "127.0.0.1",
                          "--port", "0", "--data-dir", d + "/data", "--fsync", a.fsync],
                         cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        port, t0 = None, time.monotonic()
        while port is None and time.monotonic() - t0 < READY_TIMEOUT:
            line = b.stderr.readline()
            if not line:
                raise SystemExit("brokerd exited before it was ready")
            m = re.search(r"ready: listening on [\d.]+:(\d+)", line)
            port = m and m.group(1)
        if port is None:
            raise SystemExit("brokerd was not ready in time")
        threading.Thread(target=b.stderr.read, daemon=True).start()  # keep its log pipe drained
        common = ["--address", f"127.0.0.1:{port}", "-n", str(a.n), "--size", "100", "--prefetch", "100",
                  "--queue", "bench.w1", "--window", "0", "--rate", "0", "--tenants", "0", "--rate-limit", ""]
        core = str(ROOT / "bench" / "core.py")
        cons = subprocess.Popen([sys.executable, core, "--role", "consumer", *common], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        if cons.stdout.readline().strip() != "ready":
            raise SystemExit("the consumer did not subscribe")
        prod = subprocess.Popen([sys.executable, core, "--role", "producer", *common], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        p = json.loads(prod.communicate(timeout=RUN_TIMEOUT)[0].strip().splitlines()[-1])
        c = json.loads(cons.communicate(timeout=RUN_TIMEOUT)[0].strip().splitlines()[-1])
        print(f"W1 under the profiler: {a.n / (c['last_delivery'] - p['first_publish']):,.0f} msgs/s (slowed by cProfile)")
    finally:
        b.send_signal(signal.SIGTERM)
        b.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)
    stats = pstats.Stats(a.out)
    for key in ("cumulative", "tottime"):
        print(f"==== top 25 by {key}")
        stats.sort_stats(key).print_stats(25)  # 25: the first ~8 by cumulative are runpy and trio frames
    print("command: python bench/w1_profile.py -n", a.n, "--fsync", a.fsync)


if __name__ == "__main__":
    main()
