"""Repeated failover under load (issue 16): a soak, not a CI test.

    python bench/failover_soak.py               # 20 kills, --election-ttl 2
    python bench/failover_soak.py --kills 5 --ttl 3

A real etcd (Debian's etcd-server) and three brokerd processes with ``--election etcd://...``
and ``--sync-replicas 1`` on loopback ports, each with its own data dir.  Meanwhile:
  * a producer, one Client given all three addresses, publishes to queue ``soak`` and waits
    for each confirm (a confirm means: on the leader's disk and one follower's);
  * two consumers (each a Client given all three addresses) ack everything from ``soak`` and ``ticks``;
  * a schedule ``soak-tick`` fires every second into ``ticks`` (catchup=all, so a tick that
    fell due during a failover is fired by the new leader; its message id is ``name@tick``).
Each round: ``kill -9`` the leader, wait for the first publish confirmed by the new one (the
failover time), restart the killed one on its data dir (it comes back and follows).

At the end: every confirmed publish was delivered at least once (none lost), duplicates are
counted, and every tick from the first to the schedule's last fired exactly once (a tick whose
first delivery, attempts == 1, arrives twice was fired twice).  Prints failover p50/max and
the command line.  The same run, smaller, is tests/e2e/test_failover_soak.py.
"""

from __future__ import annotations

import argparse
import collections
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the standard
    # library's http: replace that entry with the project root.
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tests.support.etcd import EtcdProcess, elected_broker, etcd_binary, leads, stats_value, wait_until  # noqa: E402

WAIT = 30.0  # seconds: the bound on each wait (an election, a catch-up, the final drain)
SCHEDULE = "soak-tick"
EVERY = 1  # seconds between ticks of the schedule
SETTLE_CONFIRMS = 20  # confirmed publishes on a leader before it is killed (the load is on)


class Soak:
    """The group, the producer, the consumer and the schedule; ``run(kills)`` then ``report()``."""

    def __init__(self, tmp: Path, ttl: int, prefix: str = "/soak", log=print):
        self.tmp, self.ttl, self.prefix, self.log = Path(tmp), ttl, prefix, log
        self.etcd: EtcdProcess | None = None
        self.brokers: list = []
        self.stop = threading.Event()  # the consumer (and the producer) stop
        self.stop_publishing = threading.Event()  # the producer alone stops
        self.lock = threading.Lock()
        self.confirmed: list[tuple[float, bytes, tuple]] = []  # (monotonic, body, connected_to)
        self.delivered: collections.Counter = collections.Counter()  # body -> deliveries
        self.fresh_ticks: collections.Counter = collections.Counter()  # tick id -> deliveries with attempts 1
        self.all_ticks: collections.Counter = collections.Counter()  # tick id -> deliveries
        self.errors: list[str] = []  # what the load threads met (refusals during failovers are expected)
        self.failovers: list[float] = []
        self.threads: list[threading.Thread] = []
        self.schedule: dict = {}

    # -- the group -----------------------------------------------------------------------------
    def start(self) -> None:
        self.etcd = EtcdProcess(self.tmp / "etcd").start()
        for name in ("a", "b", "c"):
            b = elected_broker(self.tmp / name, self.etcd, self.prefix, self.ttl, "--sync-replicas", "1").start()
            self.brokers.append(b)
            if name == "a":
                wait_until(lambda: leads(b), WAIT, "the first brokerd to be elected")
        leader = self.leader()
        for b in self.brokers:
            if b is not leader:
                wait_until(lambda: stats_value(b, "replication_leader") == leader.address, WAIT,
                           f"{b.address} to follow {leader.address}")
        self.url = "brokerd://" + ",".join(b.address for b in self.brokers)
        from client import Client

        with Client(self.url, timeout=10) as c:
            c.schedule_put(SCHEDULE, {"every": EVERY, "queue": "ticks", "body": b"tick", "catchup": "all"})
        for target, args in ((self._produce, ()), (self._consume, ("soak",)), (self._consume, ("ticks",))):
            t = threading.Thread(target=target, args=args, daemon=True)
            t.start()
            self.threads.append(t)

    def leader(self, but=None):
        return wait_until(lambda: next((b for b in self.brokers if b is not but and leads(b)), None), WAIT,
                          "a leader to be elected")

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
        for b in self.brokers:
            b.kill()
        if self.etcd is not None:
            self.etcd.stop()

    # -- the load ------------------------------------------------------------------------------
    def _produce(self) -> None:
        from client import Client

        i = 0
        c = Client(self.url, timeout=5, reconnect=WAIT)
        try:
            while not (self.stop.is_set() or self.stop_publishing.is_set()):
                body = b"m%d" % i
                i += 1
                try:
                    c.publish("soak", body)
                except Exception as exc:  # noqa: BLE001 -- an unconfirmed publish; counted, not lost
                    self._error(f"publish {body!r}: {exc!r}")
                    continue
                with self.lock:
                    self.confirmed.append((time.monotonic(), body, c.connected_to))
        finally:
            c.close()

    def _consume(self, queue: str) -> None:
        """Consume ``queue`` and ack each delivery; after a lost connection, consume again (the
        client reconnects to whoever leads; what was in flight comes back redelivered)."""
        from client import Client

        c = Client(self.url, timeout=5, reconnect=WAIT)
        try:
            while not self.stop.is_set():
                try:
                    with c.consume(queue, prefetch=50) as cons:
                        while not self.stop.is_set():
                            d = cons.get(0.2)
                            if d is None:
                                continue
                            with self.lock:
                                if queue == "ticks":
                                    self.all_ticks[d.id] += 1
                                    if d.attempts == 1:
                                        self.fresh_ticks[d.id] += 1
                                else:
                                    self.delivered[d.body] += 1
                            d.ack()
                except Exception as exc:  # noqa: BLE001 -- the connection died: consume again
                    self._error(f"consume {queue}: {exc!r}")
                    time.sleep(0.05)
        finally:
            c.close()

    def _error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def _confirms(self) -> int:
        with self.lock:
            return len(self.confirmed)

    # -- the kills -----------------------------------------------------------------------------
    def run(self, kills: int) -> None:
        for n in range(1, kills + 1):
            leader = self.leader()
            mark = self._confirms()
            wait_until(lambda: self._confirms() >= mark + SETTLE_CONFIRMS, WAIT, f"confirms on {leader.address}")
            for b in self.brokers:  # every follower caught up: the kill finds an in-sync group
                if b is not leader:
                    wait_until(lambda: stats_value(b, "replication_leader") == leader.address, WAIT,
                               f"{b.address} to follow {leader.address}")
            dead = ("127.0.0.1", leader.port)
            leader.kill()
            killed = time.monotonic()
            new = self.leader(but=leader)

            def confirmed_after():
                with self.lock:
                    return next((t for t, _, to in reversed(self.confirmed) if t > killed and to != dead), None) \
                        if self.confirmed and self.confirmed[-1][0] > killed else None

            first = wait_until(confirmed_after, WAIT, f"a publish confirmed by the new leader {new.address}")
            with self.lock:  # the earliest confirm after the kill, not the latest
                first = min(t for t, _, to in self.confirmed if t > killed and to != dead)
            self.failovers.append(first - killed)
            self.log(f"kill {n}: kill -9 {leader.address} -> first confirmed publish on {new.address} "
                     f"{self.failovers[-1]:.3f} s")
            leader.restart()  # the same port and data dir: it comes back and follows the new leader

    def finish(self) -> dict:
        """Stop publishing and firing, drain, and check the promises; the figures as a dict."""
        from client import Client

        leader = self.leader()
        with Client(self.url, timeout=10) as c:
            c.schedule_pause(SCHEDULE)
            self.schedule = next(e for e in c.schedule_list() if e["name"] == SCHEDULE)
        self.stop_producing()
        with self.lock:
            want = {body for _, body, _ in self.confirmed}

        def drained():
            with self.lock:
                return not (want - set(self.delivered)) and len(self.all_ticks) >= self.schedule["fired"]

        try:
            wait_until(drained, WAIT, "every confirmed publish and every tick to be delivered")
        except AssertionError:
            pass  # reported below as lost
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
        with self.lock:
            lost = sorted(want - set(self.delivered))
            dup = sum(k - 1 for k in self.delivered.values() if k > 1)
            ticks = {float(i.rsplit("@", 1)[1]) for i in self.all_ticks}
            fired_twice = sorted(i for i, k in self.fresh_ticks.items() if k > 1)
            tick_dup = sum(k - 1 for k in self.all_ticks.values() if k > 1)
        first, last = (min(ticks), self.schedule["last_tick"]) if ticks else (None, None)
        expected = round((last - first) / EVERY) + 1 if ticks else 0
        missing = [first + k * EVERY for k in range(expected) if round(first + k * EVERY, 3) not in
                   {round(t, 3) for t in ticks}] if ticks else []
        return {
            "leader": leader.address, "confirmed": len(want), "lost": lost, "duplicates": dup,
            "ticks": len(ticks), "ticks_expected": expected, "ticks_missing": missing,
            "ticks_fired_twice": fired_twice, "tick_redeliveries": tick_dup, "schedule_fired": self.schedule["fired"],
            "failovers": list(self.failovers), "errors": len(self.errors),
            "error_kinds": sorted({e.split(":", 1)[0] + ": " + e.split(":", 1)[-1][:160] for e in self.errors})[:5],
        }

    def stop_producing(self) -> None:
        # the producer is the first thread; the consumer keeps draining until finish() stops it
        self.stop_publishing.set()
        self.threads[0].join(WAIT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill -9 of the leader, each then restarted (default 20)")
    ap.add_argument("--ttl", type=int, default=2, help="--election-ttl of the brokers, seconds (default 2)")
    args = ap.parse_args(argv)
    if etcd_binary() is None:
        print("etcd is not installed: apt-get install etcd-server", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="brokerd-soak-") as tmp:
        soak = Soak(Path(tmp), args.ttl, log=lambda s: print(s, flush=True))
        try:
            soak.start()
            soak.run(args.kills)
            r = soak.finish()
        except BaseException:
            for b in soak.brokers:  # what each brokerd said last: the why of a failed round
                print(f"--- brokerd {b.address} (data dir {b.data_dir.name}), last lines:", file=sys.stderr)
                print("\n".join(b.log[-40:]), file=sys.stderr)
            raise
        finally:
            soak.close()
    times = sorted(r["failovers"])
    print(f"confirmed publishes {r['confirmed']}: lost {len(r['lost'])}, delivered twice or more {r['duplicates']}")
    print(f"ticks {r['ticks']} of {r['ticks_expected']} (schedule says fired {r['schedule_fired']}): "
          f"missing {len(r['ticks_missing'])}, fired twice {len(r['ticks_fired_twice'])}, "
          f"redelivered {r['tick_redeliveries']}")
    print(f"load errors {r['errors']} (refusals and lost connections while no leader was elected), e.g.:")
    for e in r["error_kinds"]:
        print("  " + e)
    if r["lost"][:5] or r["ticks_missing"][:5] or r["ticks_fired_twice"][:5]:
        print(f"  lost {r['lost'][:5]} missing {r['ticks_missing'][:5]} twice {r['ticks_fired_twice'][:5]}")
    print(f"failover (kill -9 of the leader -> first confirmed publish on the new one), {len(times)} kills, "
          f"--election-ttl {args.ttl}: p50 {statistics.median(times):.3f} s, max {times[-1]:.3f} s")
    print("command: python " + " ".join(shlex.quote(a) for a in ["bench/failover_soak.py", *(argv or sys.argv[1:])]))
    ok = not r["lost"] and not r["ticks_missing"] and not r["ticks_fired_twice"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
