"""The core benchmark of brokerd and its sync client.  A benchmark, not a test.

    python bench/core.py                      # 100,000 x 100 B, prefetch 100, memory at 1,000,000
    python bench/core.py -n 200000 --size 1000 --prefetch 50 --memory 0
    python bench/core.py --broker-args="--fsync never"
    python bench/core.py --tenants 1000 --rate-limit 100000/s   # flow control on (issue 15)
    python bench/core.py --followers 2 --memory 0   # 2 followers, --sync-replicas 2 (issue 16)

What it measures (see bench/README.md):

1. **Throughput and latency.**  It starts its own brokerd
   (``python -m broker --host 127.0.0.1 --port 0 --data-dir <tmp>``), then a
   consumer process (``Client.consume(prefetch)``, acking every delivery) and
   a producer process (``publish(confirm=False)``, ``wait_for_confirms()`` at
   the end).  Each body starts with the ``time.monotonic()`` of its publish;
   both processes read the same CLOCK_MONOTONIC, so the consumer computes
   publish-to-delivery latency directly.  End-to-end msgs/s is n divided by
   the time from the first publish to the n-th delivery.
2. **Broker memory per queued message.**  A fresh brokerd; its VmRSS from
   ``/proc/<pid>/status`` before and after one producer publishes ``--memory``
   messages (confirmed) that nobody consumes; reported as bytes per message
   beyond the body itself.

Each broker is stopped by its pid at the end.  The last line printed is the
command that reproduces the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.broker import BrokerProcess  # noqa: E402

STAMP = struct.Struct("<d")  # the body starts with the publish time (time.monotonic())
QUEUE = "bench.core"


# --- the broker -----------------------------------------------------------------------
def Broker(extra_args: list[str], data_dir: str) -> BrokerProcess:
    """``python -m broker`` on 127.0.0.1, a free port and a temporary data dir (tests/support/broker.py)."""
    try:
        return BrokerProcess(data_dir, *extra_args).start(timeout=30)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


# --- the two roles (run as child processes) ------------------------------------------------
def flow_headers(tenants: int, rate_limit: str) -> list[dict] | None:
    """Headers that switch brokerd's flow control on (protocol.md §5.2.1): messages spread
    round-robin over ``tenants`` tenants, all of one task limited to ``rate_limit``."""
    if not tenants and not rate_limit:
        return None
    base = {"x-task": "bench.task", "x-rate-limit": rate_limit} if rate_limit else {}
    return [dict(base, **{"x-tenant": f"tenant-{i}"}) for i in range(tenants)] if tenants else [base]


def run_producer(address: str, n: int, size: int, queue: str, window: int, rate: float = 0,
                 headers: list[dict] | None = None) -> dict:
    from client.producer import Client

    pad = b"x" * (size - STAMP.size)
    pack = STAMP.pack
    now = time.monotonic
    with Client(address, name="bench-producer") as c:
        t0 = now()
        publish = c.publish
        if headers:
            plain, k = publish, len(headers)
            count = iter(range(1 << 62))

            def publish(queue, body, confirm):
                return plain(queue, body, headers=headers[next(count) % k], confirm=confirm)
        if rate:
            # Paced: publish in small bursts to stay on the line n = rate * elapsed.
            i = 0
            while i < n:
                due = min(n, int((now() - t0) * rate) + 1)
                while i < due:
                    publish(queue, pack(now()) + pad, confirm=False)
                    i += 1
                time.sleep(0.0005)
        elif window:
            for i in range(n):
                publish(queue, pack(now()) + pad, confirm=False)
                if i % window == window - 1:
                    c.wait_for_confirms()
        else:
            for _ in range(n):
                publish(queue, pack(now()) + pad, confirm=False)
        t_sent = now()
        c.wait_for_confirms()
        t1 = now()
    return {"first_publish": t0, "all_sent": t_sent, "all_confirmed": t1, "cpu_s": _cpu()}


def run_consumer(address: str, n: int, queue: str, prefetch: int) -> dict:
    from client.producer import Client

    lat = [0.0] * n
    unpack = STAMP.unpack_from
    now = time.monotonic
    with Client(address, name="bench-consumer") as c:
        consumer = c.consume([queue], prefetch=prefetch)
        print("ready", flush=True)
        got = 0
        t_first = None
        for d in consumer:
            t = now()
            if t_first is None:
                t_first = t
            lat[got] = t - unpack(d.body)[0]
            d.ack()
            got += 1
            if got == n:
                break
        t_last = now()
        consumer.cancel()
    lat.sort()
    return {
        "first_delivery": t_first,
        "last_delivery": t_last,
        "p50": lat[n // 2],
        "p99": lat[min(n - 1, int(n * 0.99))],
        "max": lat[-1],
        "cpu_s": _cpu(),
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(args) -> None:
    if args.protocol:  # hold the client to one protocol version (protocol.md §10), to compare them
        import client.session

        client.session.OFFERED_VERSIONS = (args.protocol,)
    if args.role == "producer":
        out = run_producer(args.address, args.n, args.size, args.queue, args.window, args.rate,
                           flow_headers(args.tenants, args.rate_limit))
    else:
        out = run_consumer(args.address, args.n, args.queue, args.prefetch)
    print(json.dumps(out), flush=True)


def spawn(role: str, address: str, args, **extra) -> subprocess.Popen:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--role", role, "--address", address,
        "-n", str(extra.get("n", args.n)), "--size", str(args.size), "--prefetch", str(args.prefetch),
        "--queue", extra.get("queue", QUEUE), "--window", str(args.window),
        "--rate", str(extra.get("rate", args.rate)),
        "--tenants", str(args.tenants), "--rate-limit", args.rate_limit,
    ]
    if getattr(args, "protocol", None):
        cmd += ["--protocol", str(args.protocol)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def last_json(proc: subprocess.Popen, what: str, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"the {what} process failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def address(broker: BrokerProcess, args) -> str:
    """The broker's address for the clients: brokerds://...?ca= under --tls, with the bench
    user's credentials under --auth."""
    login = f"bench:{args.auth_token}@" if getattr(args, "auth_token", None) else ""
    if getattr(args, "tls_ca", None):
        return f"brokerds://{login}127.0.0.1:{broker.port}?ca={args.tls_ca}"
    return f"brokerd://{login}{broker.address}" if login else broker.address


# --- followers (--followers N) -------------------------------------------------------------
LAG_SAMPLE_S = 0.1  # seconds between reads of the leader's STATS for the follower lag


def start_followers(broker: BrokerProcess, n: int, tmp: str) -> list[BrokerProcess]:
    """``n`` brokerds with ``--follow <leader>``, each on its own data dir, and wait until the
    leader counts them in sync (its publishes are confirmed only once ``n`` have fsynced)."""
    followers = [Broker(["--follow", broker.address], os.path.join(tmp, f"follower{i}")) for i in range(n)]
    deadline = time.monotonic() + 30
    while _stat(broker, "replication_followers_in_sync") != str(n):
        if time.monotonic() > deadline:
            raise SystemExit(f"the {n} followers were not in sync within 30 s")
        time.sleep(0.05)
    return followers


def _stat(broker: BrokerProcess, key: str) -> str:
    for line in broker.admin("STATS\n").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == key:
            return parts[1].strip()
    return ""


class LagSampler:
    """Reads the leader's STATS every LAG_SAMPLE_S while the run goes: the largest follower lag
    seen, in records and in seconds (replication_follower.<addr> lsn=.. lag_records=.. lag_seconds=..)."""

    def __init__(self, broker: BrokerProcess):
        import threading

        self.broker, self.records, self.seconds, self.samples = broker, 0, 0.0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(LAG_SAMPLE_S):
            try:
                text = self.broker.admin("STATS\n")
            except OSError:
                continue
            self.samples += 1
            for line in text.splitlines():
                if line.startswith("replication_follower.") and "lag_records=" in line:
                    fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                    self.records = max(self.records, int(fields["lag_records"]))
                    self.seconds = max(self.seconds, float(fields["lag_seconds"]))

    def close(self):
        self.stop.set()
        self.thread.join(5)


# --- the phases -------------------------------------------------------------------------------
def throughput(args, broker_args: list[str]) -> dict:
    followers, lag = [], None
    with tempfile.TemporaryDirectory(prefix="brokerd-bench-") as tmp:
        if args.followers:
            broker_args = broker_args + ["--sync-replicas", str(args.followers)]
        broker = Broker(broker_args, os.path.join(tmp, "leader"))
        try:
            if args.followers:
                followers = start_followers(broker, args.followers, tmp)
            cons = spawn("consumer", address(broker, args), args)
            line = cons.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit("the consumer did not subscribe")
            cpu0 = broker.cpu_seconds()
            lag = LagSampler(broker) if followers else None
            prod = spawn("producer", address(broker, args), args)
            p = last_json(prod, "producer", 600)
            c = last_json(cons, "consumer", 600)
            cpu1 = broker.cpu_seconds()
        finally:
            if lag is not None:
                lag.close()
            for f in followers:
                f.stop()
            broker.stop()
            for b in [broker, *followers] if followers else []:  # a follower that left says why here
                for line in b.log:
                    if "WARNING" in line or "ERROR" in line:
                        print(f"  brokerd {b.address}: {line}", file=sys.stderr)
    elapsed = c["last_delivery"] - p["first_publish"]
    return {
        "followers": args.followers,
        "lag_records_max": lag.records if lag else 0,
        "lag_seconds_max": lag.seconds if lag else 0.0,
        "lag_samples": lag.samples if lag else 0,
        "n": args.n,
        "end_to_end_msgs_per_s": args.n / elapsed,
        "elapsed_s": elapsed,
        "publish_per_s": args.n / (p["all_confirmed"] - p["first_publish"]),
        "latency_p50_ms": c["p50"] * 1e3,
        "latency_p99_ms": c["p99"] * 1e3,
        "latency_max_ms": c["max"] * 1e3,
        "broker_cpu_s": cpu1 - cpu0,
        "producer_cpu_s": p["cpu_s"],
        "consumer_cpu_s": c["cpu_s"],
    }


def memory(args, broker_args: list[str]) -> dict:
    n = args.memory
    with tempfile.TemporaryDirectory(prefix="brokerd-bench-") as tmp:
        broker = Broker(broker_args, tmp)
        try:
            # One warm-up round trip so the baseline includes a live connection's cost.
            from client.producer import Client

            with Client(address(broker, args), name="bench-memory-probe") as c:
                c.declare(QUEUE + ".memory", max_attempts=25)
            time.sleep(0.2)  # let the broker go idle before the baseline reading (not synchronisation)
            before = broker.rss()
            prod = spawn("producer", address(broker, args), args, n=n, queue=QUEUE + ".memory")
            p = last_json(prod, "producer", 1800)
            after = broker.rss()
            with Client(address(broker, args), name="bench-memory-probe") as c:
                ready = c.stats(QUEUE + ".memory")["ready"]
        finally:
            broker.stop()
    per_msg = (after - before) / n
    return {
        "queued": ready,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_msg": per_msg,
        "bytes_beyond_body": per_msg - args.size,
        "publish_only_per_s": n / (p["all_confirmed"] - p["first_publish"]),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100_000, help="messages in the throughput run (default 100000)")
    ap.add_argument("--size", type=int, default=100, help="body bytes, >= 8 (default 100)")
    ap.add_argument("--prefetch", type=int, default=100, help="consumer prefetch (default 100)")
    ap.add_argument("--memory", type=int, default=1_000_000, metavar="N", help="messages queued for the memory figure; 0 skips it (default 1000000)")
    ap.add_argument("--window", type=int, default=0, help="wait_for_confirms every this many publishes; 0: once at the end (default 0)")
    ap.add_argument("--rate", type=float, default=0, help="publishes/s for the throughput run; 0: as fast as possible (default 0). "
                    "Unpaced, the queue grows and latency is mostly queueing; pace below capacity to see transit latency")
    ap.add_argument("--tenants", type=int, default=0, help="spread the messages over this many tenants (x-tenant); 0: none (default)")
    ap.add_argument("--rate-limit", default="", help='limit the one task the messages carry (x-task) to this rate, e.g. "100000/s"; default none')
    ap.add_argument("--broker-args", default="", help='extra brokerd flags, e.g. --broker-args="--fsync never"')
    ap.add_argument("--followers", type=int, default=0, metavar="N",
                    help="start N followers (--follow) and give the leader --sync-replicas N: every confirm waits "
                         "for N followers' fsync; prints the largest follower lag seen (default 0)")
    ap.add_argument("--tls", action="store_true", help="TLS between the clients and brokerd (certificates made for the run)")
    ap.add_argument("--auth", action="store_true", help="brokerd with a users file; the clients log in as a user "
                    "granted publish and consume on every queue (each frame is checked against its grants)")
    ap.add_argument("--protocol", type=int, choices=[1, 2], default=None,
                    help="the protocol version the clients offer (default: every version they speak; "
                         "1: no batched frames, as clients before issue 18)")
    ap.add_argument("--role", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--queue", default=QUEUE, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size < STAMP.size:
        ap.error(f"--size must be at least {STAMP.size} (the timestamp)")
    if args.role:
        child(args)
        return
    broker_args = shlex.split(args.broker_args)
    if args.tls:
        from tests.support.certs import make_pki  # the test certificates: a CA and a 127.0.0.1 server cert

        pki = make_pki(tempfile.mkdtemp(prefix="brokerd-bench-pki-"))
        broker_args += ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key]
        args.tls_ca = pki.ca
    if args.auth:
        from client.userfile import hash_token, new_token, user_entry

        args.auth_token = new_token()
        users = os.path.join(tempfile.mkdtemp(prefix="brokerd-bench-users-"), "users.toml")
        with open(users, "w") as fh:
            fh.write(user_entry("bench", hash_token(args.auth_token), {"publish": ["*"], "consume": ["*"]}))
        broker_args += ["--users-file", users]
    print(f"brokerd bench/core.py: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, broker args {broker_args or 'none'}")
    ncpu = os.cpu_count() or 1
    t = throughput(args, broker_args)
    pace = f"paced at {args.rate:,.0f}/s" if args.rate else "unpaced"
    print(f"throughput  {t['n']:,} msgs of {args.size} B, prefetch {args.prefetch}, 1 producer ({pace}) + 1 consumer process")
    print(f"  end to end        {t['end_to_end_msgs_per_s']:>10,.0f} msgs/s  ({t['elapsed_s']:.2f} s, first publish -> last delivery)")
    print(f"  producer          {t['publish_per_s']:>10,.0f} publishes/s  (confirm=False, all confirmed)")
    print(f"  latency p50       {t['latency_p50_ms']:>10.2f} ms  (publish -> delivery{'' if args.rate else '; unpaced, so mostly time queued'})")
    print(f"  latency p99       {t['latency_p99_ms']:>10.2f} ms  (max {t['latency_max_ms']:.1f} ms)")
    print(
        f"  CPU seconds       broker {t['broker_cpu_s']:.2f}, producer {t['producer_cpu_s']:.2f}, "
        f"consumer {t['consumer_cpu_s']:.2f}  (of {ncpu * t['elapsed_s']:.2f} core-seconds on {ncpu} cores; "
        "producer and consumer include start-up)"
    )
    if args.followers:
        print(f"  followers         {args.followers}, --sync-replicas {args.followers}; largest lag seen "
              f"{t['lag_records_max']:,} records, {t['lag_seconds_max']:.3f} s ({t['lag_samples']} STATS samples)")
    if args.memory:
        m = memory(args, broker_args)
        print(f"memory      {m['queued']:,} queued msgs of {args.size} B")
        print(f"  broker RSS        {m['rss_before_mb']:.1f} MiB -> {m['rss_after_mb']:.1f} MiB")
        print(f"  per message       {m['bytes_per_msg']:>10.0f} B  ({m['bytes_beyond_body']:.0f} B beyond the {args.size} B body)")
        print(f"  publish only      {m['publish_only_per_s']:>10,.0f} publishes/s  (nobody consuming)")
    cmd = ["python", "bench/core.py", "-n", str(args.n), "--size", str(args.size), "--prefetch", str(args.prefetch), "--memory", str(args.memory)]
    if args.followers:
        cmd += ["--followers", str(args.followers)]
    if args.tls:
        cmd += ["--tls"]
    if args.auth:
        cmd += ["--auth"]
        broker_args = [a for a in broker_args if not a.endswith("users.toml") and a != "--users-file"]
    if args.window:
        cmd += ["--window", str(args.window)]
    if args.protocol:
        cmd += ["--protocol", str(args.protocol)]
    if args.rate:
        cmd += ["--rate", f"{args.rate:g}"]
    if args.tenants:
        cmd += ["--tenants", str(args.tenants)]
    if args.rate_limit:
        cmd += ["--rate-limit", args.rate_limit]
    if broker_args:
        cmd.append(f"--broker-args={shlex.join(broker_args)}")
    print("reproduce:  " + shlex.join(cmd))


if __name__ == "__main__":
    main()
