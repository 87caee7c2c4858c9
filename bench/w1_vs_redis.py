"""W1 side by side: brokerd against Redis Streams, in one run, as ratios.  A benchmark, not a test.

    python bench/w1_vs_redis.py                 # 50,000 x 100 B, each case REPEAT=3 times, medians
    python bench/w1_vs_redis.py -n 20000 --repeat 1
    python bench/w1_vs_redis.py --protocol 1    # brokerd clients held to protocol version 1 (no batched frames)

W1 (issue 18): 100-byte messages, one producer process and one consumer process, confirms waited
for, end to end = n / (first publish -> n-th message consumed), CLOCK_MONOTONIC shared by the
processes.  The cases, run one after the other (never two at once: the machine has 2 cores):

* brokerd ``--fsync always`` and ``--fsync never``: ``bench/core.py``'s throughput phase (a
  ``Client.consume`` consumer with prefetch 100 acking each delivery; a producer publishing with
  ``confirm=False`` and one ``wait_for_confirms()`` at the end).
* Redis Streams, the workload of ``../shared/peers/bench/w1_redis.py --mode stream`` (the one
  behind the issue's figures): the producer ``XADD``s in non-transactional pipelines of 100 and
  waits for each pipeline's replies; the consumer ``XREADGROUP COUNT 100`` then one ``XACK`` per
  message, pipelined per batch.  Three persistence settings: AOF ``everysec``, AOF ``always``,
  and no AOF (``appendonly no``, no RDB snapshots either during the run).  redis-py 8.1.0 as in
  the peers' requirements.txt (``pip install redis==8.1.0``).

This script starts its own ``redis-server`` (from PATH; ``apt-get install redis-server``) on a free
127.0.0.1 port with a temporary directory, so it never touches another Redis, and stops it by
pid at the end.  The targets (issue 18): always >= 1.2x AOF everysec and >= 1.5x AOF always;
never >= 1.3x no AOF.  The last line is the command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STREAM, GROUP = "w1:s", "g"
REDIS_BATCH = 100  # the peers' pipeline depth and XREADGROUP COUNT


# --- Redis ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server: 127.0.0.1, a free port, its own directory; stopped by pid."""

    def __init__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="w1-redis-")
        self.port = free_port()
        # save "": no RDB snapshot during a run (the peers' default config snapshots after
        # 10,000 changes in 60 s, which forks mid-run); AOF is switched per case with CONFIG SET.
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--save", "",
             "--appendonly", "no", "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis("127.0.0.1", self.port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)

    def client(self):
        import redis

        return redis.Redis("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _payload(i: int, size: int = 100) -> bytes:
    head = b"%08d:" % i
    return head + b"x" * (size - len(head))


def _redis_consumer(port, n, ready, out):
    import redis

    c = redis.Redis("127.0.0.1", port)
    got = 0
    ready.set()
    while got < n:
        resp = c.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=REDIS_BATCH, block=5000)
        if not resp:
            continue
        msgs = resp[0][1]
        p = c.pipeline(transaction=False)
        for mid, _fields in msgs:
            p.xack(STREAM, GROUP, mid)
        p.execute()
        got += len(msgs)
    out.put((time.monotonic(), _cpu()))


def _redis_producer(port, n, out):
    import redis

    c = redis.Redis("127.0.0.1", port)
    t0 = time.monotonic()
    for s in range(0, n, REDIS_BATCH):
        p = c.pipeline(transaction=False)
        for i in range(s, min(n, s + REDIS_BATCH)):
            p.xadd(STREAM, {"b": _payload(i)})
        p.execute()
    out.put((t0, time.monotonic(), _cpu()))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_w1(server: RedisServer, n: int, aof: str) -> tuple[float, dict]:
    c = server.client()
    c.delete(STREAM)
    if aof == "off":
        c.config_set("appendonly", "no")
    else:
        c.config_set("appendonly", "yes")
        c.config_set("appendfsync", aof)
        for _ in range(100):  # CONFIG SET appendonly yes starts a rewrite: wait for it, as the peers do
            info = c.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                break
            time.sleep(0.1)
    c.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ctx = mp.get_context("fork")
    ready, cq, pq = ctx.Event(), ctx.Queue(), ctx.Queue()
    cons = ctx.Process(target=_redis_consumer, args=(server.port, n, ready, cq))
    cons.start()
    ready.wait(10)
    time.sleep(0.2)  # the consumer is blocked in XREADGROUP, as in the peers' script
    cpu0 = _proc_cpu(server.proc.pid)
    prod = ctx.Process(target=_redis_producer, args=(server.port, n, pq))
    prod.start()
    t0, _, prod_cpu = pq.get(timeout=300)
    t_end, cons_cpu = cq.get(timeout=300)
    server_cpu = _proc_cpu(server.proc.pid) - cpu0
    prod.join()
    cons.join()
    c.delete(STREAM)
    c.config_set("appendonly", "no")
    return n / (t_end - t0), {"server": server_cpu, "producer": prod_cpu, "consumer": cons_cpu}


# --- brokerd ------------------------------------------------------------------------------------------
def brokerd_w1(n: int, fsync: str, protocol: int | None) -> tuple[float, dict]:
    from bench import core

    ns = argparse.Namespace(n=n, size=100, prefetch=100, window=0, rate=0, tenants=0, rate_limit="",
                            memory=0, queue=core.QUEUE, protocol=protocol, followers=0)
    t = core.throughput(ns, ["--fsync", fsync])
    return t["end_to_end_msgs_per_s"], {"server": t["broker_cpu_s"], "producer": t["producer_cpu_s"],
                                        "consumer": t["consumer_cpu_s"]}


# --- the run --------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50_000, help="messages per case (default 50000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each case; the median is shown (default 3)")
    ap.add_argument("--protocol", type=int, choices=[1, 2], default=None,
                    help="hold the brokerd clients to this protocol version (default: the newest both speak)")
    ap.add_argument("--with-protocol-1", action="store_true",
                    help="also run brokerd with clients held to protocol 1 (no batched frames), to show what batching gives")
    args = ap.parse_args(argv)
    cases = [
        ("brokerd --fsync always", lambda: brokerd_w1(args.n, "always", args.protocol)),
        ("brokerd --fsync never", lambda: brokerd_w1(args.n, "never", args.protocol)),
    ]
    if args.with_protocol_1:
        cases += [
            ("brokerd always, protocol 1", lambda: brokerd_w1(args.n, "always", 1)),
            ("brokerd never, protocol 1", lambda: brokerd_w1(args.n, "never", 1)),
        ]
    server = RedisServer()
    try:
        cases += [
            ("redis streams AOF everysec", lambda: redis_w1(server, args.n, "everysec")),
            ("redis streams AOF always", lambda: redis_w1(server, args.n, "always")),
            ("redis streams no AOF", lambda: redis_w1(server, args.n, "off")),
        ]
        runs: dict[str, list[float]] = {name: [] for name, _ in cases}
        cpus: dict[str, list[dict]] = {name: [] for name, _ in cases}
        for i in range(args.repeat):  # interleaved, so a slow spell of the machine hits every case
            for name, fn in cases:
                rate, cpu = fn()
                runs[name].append(rate)
                cpus[name].append(cpu)
                print(f"  run {i + 1}/{args.repeat} {name:28s} {rate:>9,.0f} msgs/s   CPU-s server "
                      f"{cpu['server']:.2f} producer {cpu['producer']:.2f} consumer {cpu['consumer']:.2f}", flush=True)
    finally:
        server.stop()
    med = {name: statistics.median(v) for name, v in runs.items()}
    print(f"W1: {args.n:,} msgs of 100 B, 1 producer + 1 consumer process, confirms waited for; "
          f"median of {args.repeat}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    for name, v in med.items():
        print(f"  {name:28s} {v:>9,.0f} msgs/s   (runs: {', '.join(f'{x:,.0f}' for x in runs[name])})")
    ratios = [
        ("always / AOF everysec", med["brokerd --fsync always"] / med["redis streams AOF everysec"], 1.2),
        ("always / AOF always", med["brokerd --fsync always"] / med["redis streams AOF always"], 1.5),
        ("never / no AOF", med["brokerd --fsync never"] / med["redis streams no AOF"], 1.3),
    ]
    if args.with_protocol_1:
        ratios += [
            ("always, protocol 1 / everysec", med["brokerd always, protocol 1"] / med["redis streams AOF everysec"], 1.2),
            ("always, protocol 1 / AOF always", med["brokerd always, protocol 1"] / med["redis streams AOF always"], 1.5),
            ("never, protocol 1 / no AOF", med["brokerd never, protocol 1"] / med["redis streams no AOF"], 1.3),
        ]
    for label, r, target in ratios:
        print(f"  ratio {label:32s} {r:5.2f}x   (target >= {target}x: {'met' if r >= target else 'NOT met'})")
    # On a loaded machine every process waits for a core, so throughput reflects the CPU all three
    # processes need together.  On an idle 2-core machine the busiest one bounds it: its median
    # CPU-seconds per run is printed too, as n / that = the rate it alone would allow.
    print("  busiest process (median CPU-s per run; clients include their start-up):")
    for name in runs:
        busy = statistics.median(max(c.values()) for c in cpus[name])
        which = max(cpus[name][0], key=cpus[name][0].get)
        print(f"    {name:28s} {busy:6.2f} s ({which}) -> at most {args.n / busy:>9,.0f} msgs/s on idle cores")
    print(json.dumps({"n": args.n, "medians": med, "ratios": {k: round(r, 3) for k, r, _ in ratios}}))
    cmd = ["python", "bench/w1_vs_redis.py", "-n", str(args.n), "--repeat", str(args.repeat)]
    if args.protocol:
        cmd += ["--protocol", str(args.protocol)]
    if args.with_protocol_1:
        cmd += ["--with-protocol-1"]
    print("reproduce:  " + shlex.join(cmd))


if __name__ == "__main__":
    main()
